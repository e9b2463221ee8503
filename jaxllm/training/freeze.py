"""Train some parameters, freeze the rest: masks over a parameter tree and an optimiser that
keeps no state for frozen leaves.

A *mask* is a pytree of bools with the parameters' structure (True = trained). Build one from a
predicate on path strings (``"trf_blocks_11/att/W_query/kernel"``)::

    mask = trainable_mask(params, lambda p: p.startswith(("trf_blocks_11/", "final_norm/", "out_head/")))
    optimizer = freeze_optimizer(make_optimizer(cfg), mask)

``freeze_optimizer`` is ``optax.multi_transform``: the trained leaves go through the optimiser,
the frozen ones through ``optax.set_to_zero()``, and optax masks the frozen leaves out of the
inner optimiser's state (they appear as empty ``MaskedNode``s), so Adam's moments exist only for
trained parameters. Frozen parameters still get gradients from ``jax.grad`` unless the loss
stops them: ``stop_frozen_gradients(loss_fn, mask)`` does, so XLA can skip computing them (and a
gradient-norm metric counts only the trained leaves).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

import jax
import numpy as np
import optax

from jaxllm.nn.lora import LoRAConfig, add_lora, apply_with_lora, is_lora_path, lora_mask, merge, raschka


def path_str(path) -> str:
    """A jax key path (from ``jax.tree_util.tree_flatten_with_path``) -> ``"a/b_0/kernel"``; list
    and tuple entries by index (``"a/0/k"``)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def trainable_mask(params, predicate: Callable[[str], bool]):
    """params pytree -> pytree of bool, ``predicate(path_str)`` at every leaf (True = trained)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: bool(predicate(path_str(path))), params)


def _labels(mask):
    return jax.tree_util.tree_map(lambda trained: "train" if trained else "frozen", mask)


def freeze_optimizer(optimizer: optax.GradientTransformation, mask) -> optax.GradientTransformation:
    """``optimizer`` on the leaves where ``mask`` is True, zero updates and no state elsewhere.

    ``mask``: a bool pytree shaped like the params, or a function ``params -> mask``. Weight decay
    inside ``optimizer`` touches only trained leaves, so frozen ones stay bit-for-bit unchanged."""
    if callable(mask):
        labels = lambda params: _labels(mask(params))  # noqa: E731
    else:
        if not any(jax.tree_util.tree_leaves(mask)):
            raise ValueError("the trainable mask is False everywhere: nothing would be trained")
        labels = _labels(mask)
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def lora_optimizer(optimizer: optax.GradientTransformation, params) -> optax.GradientTransformation:
    """``optimizer`` on the LoRA leaves of ``params`` only (``jaxllm.nn.lora.add_lora``); every other
    leaf gets a zero update and no state."""
    mask = lora_mask(params)
    if not any(jax.tree_util.tree_leaves(mask)):
        raise ValueError("params hold no LoRA weights: call add_lora (or load_lora) first")
    return freeze_optimizer(optimizer, mask)


def stop_frozen_gradients(loss_fn: Callable, mask) -> Callable:
    """``loss_fn(params, batch, key)`` -> the same loss with ``lax.stop_gradient`` on every leaf
    where ``mask`` is False: their gradients are exact zeros and XLA need not compute them."""

    def wrapped(params, *args, **kwargs):
        params = jax.tree_util.tree_map(lambda p, trained: p if trained else jax.lax.stop_gradient(p),
                                        params, mask)
        return loss_fn(params, *args, **kwargs)

    return wrapped


def count_params(params, mask=None) -> int:
    """Number of scalars in ``params`` (arrays or ``jax.ShapeDtypeStruct``s), or only in the leaves
    where ``mask`` is True."""
    sizes = jax.tree_util.tree_map(lambda p: int(np.prod(np.shape(p), dtype=np.int64)), params)
    if mask is not None:
        sizes = jax.tree_util.tree_map(lambda n, trained: n if trained else 0, sizes, mask)
    return int(sum(jax.tree_util.tree_leaves(sizes)))


FINE_TUNING_MODES = ("lora", "last_block", "head", "full")


def trainable_predicate(config, mode: str) -> Callable[[str], bool]:
    """``predicate(path) -> bool`` over ``"a/b/kernel"`` path strings: True where fine-tuning mode
    ``mode`` trains a language model ``config`` (its interface names the blocks, head and norm):

    * ``head``: the head only; ``last_block``: the last block, the final norm (if the model has
      one) and the head -- the book's recipe; ``full``: everything;
    * ``lora``: only the LoRA factors ``jaxllm.nn.lora.add_lora`` put next to the weights (the
      head's included); everything else, the head's own kernel and bias too, stays frozen.
    """
    mode = mode.replace("-", "_")
    if mode not in FINE_TUNING_MODES:
        raise ValueError(f"mode must be one of {FINE_TUNING_MODES}, got {mode!r}")
    head = set(config.head_names)
    last_block = head | {config.block_names[-1]} | set(config.final_norm_names)

    def predicate(path: str) -> bool:
        top = path.split("/")[0]
        if mode == "full":
            return True
        if mode == "head":
            return top in head
        if mode == "last_block":
            return top in last_block
        return is_lora_path(path)

    return predicate


@dataclasses.dataclass(frozen=True)
class AdapterTraining:
    """A language model trained through LoRA adapters alone (``--mode lora`` of ``finetune instruct``
    and ``finetune lm``): ``params`` hold the adapters (B = 0, so the model starts as the one it
    adapts), ``model.logits`` computes with them, ``optimizer`` and ``loss`` train them and nothing
    else, ``merged`` folds them into the weights for what reads a plain model (the KV-cached
    decoder, ``window_nll``, a checkpoint read as a base)."""

    lora: LoRAConfig
    params: Any
    model: Any

    @classmethod
    def start(cls, config, params, *, rank: int, alpha: float, key) -> "AdapterTraining":
        lora = raschka(rank=rank, alpha=alpha)
        return cls(lora, add_lora(params, lora, key), types.SimpleNamespace(logits=apply_with_lora(config.logits, lora)))

    def optimizer(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
        return lora_optimizer(optimizer, self.params)

    def loss(self, loss_fn: Callable) -> Callable:
        return stop_frozen_gradients(loss_fn, lora_mask(self.params))

    def merged(self, params) -> Any:
        return merge(params, self.lora)
