"""A language model turned classifier (Raschka ch. 6): the vocabulary head is swapped for a new
``Linear(d_model, num_classes)`` and the class logits are read at the **last real token**.

Both model families take ``num_classes`` in their config: GPT-2's ``out_head`` becomes
``[emb_dim, C]`` with a bias, the Burkov decoder's ``output`` ``[d_model, C]`` plus ``output_bias``
``[C]``; the model then returns class logits at every position. ``from_lm`` copies every base
weight, drops the vocabulary head and initialises the new one like ``torch.nn.Linear``.

Inputs are right-padded (see ``jaxllm.data.classification``), so with causal attention every real
token's state is the unpadded one, and ``last_token_logits`` takes position ``lengths - 1`` of
each row: the last real token, which has attended to the whole text. (The book reads position
-1, which for a padded row is a pad token; with the same length for every row both agree.)

What trains (``trainable_predicate(config, mode)``, a predicate on ``"a/b/kernel"`` path strings
for ``jaxllm.training.freeze.trainable_mask``):

* ``head``: the new head only;
* ``last_block``: the last transformer block, the final norm and the head (the book's recipe;
  the Burkov decoder has no final norm, so its last block and the head);
* ``lora``: only the LoRA factors that ``jaxllm.nn.lora.add_lora`` puts next to every weight
  matrix, the new head's included; everything else, the head's random kernel and bias too, stays
  frozen (Raschka app. E: freeze the model, then wrap every Linear; with rank >= classes the
  head's adapter can still express any change of the head's kernel);
* ``full``: everything.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxllm.models.gpt2 import GPT2Config
from jaxllm.models.transformer import TransformerConfig
from jaxllm.nn.lora import is_lora_path

MODES = ("lora", "last_block", "head", "full")


def classifier_config(lm_config, num_classes: int):
    """The LM's config with a ``num_classes`` head (untied: the new head has no vocabulary to share)."""
    if not isinstance(lm_config, (GPT2Config, TransformerConfig)):
        raise ValueError(f"a classifier needs a GPT-2 or transformer decoder config, got {type(lm_config).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return lm_config.replace(num_classes=num_classes, tie_embeddings=False)


def head_names(config) -> tuple[str, ...]:
    """Top-level parameter names of the classification head."""
    return ("out_head",) if isinstance(config, GPT2Config) else ("output", "output_bias")


def _width(config) -> int:
    return config.emb_dim if isinstance(config, GPT2Config) else config.d_model


def _num_layers(config) -> int:
    return config.n_layers if isinstance(config, GPT2Config) else config.num_layers


def _fresh_head(config, key) -> dict:
    """torch's ``nn.Linear(d, C)`` init: weight and bias U(-1/sqrt(d), 1/sqrt(d)), kernel as ``[d, C]``."""
    d, c = _width(config), config.num_classes
    bound = 1.0 / math.sqrt(d)
    k_w, k_b = jax.random.split(key)
    kernel = jax.random.uniform(k_w, (d, c), jnp.float32, -bound, bound)
    bias = jax.random.uniform(k_b, (c,), jnp.float32, -bound, bound)
    if isinstance(config, GPT2Config):
        return {"out_head": {"kernel": kernel, "bias": bias}}
    return {"output": kernel, "output_bias": bias}


def from_lm(lm_config, lm_params, num_classes: int, key) -> tuple[object, dict]:
    """``(classifier config, params)``: every base weight of ``lm_params`` copied (the vocabulary
    head dropped) plus a new head initialised like ``torch.nn.Linear`` from ``key``.

    The result is checked against the classifier's own parameter shapes, so a base that does
    not match ``lm_config`` is refused here rather than failing inside jit."""
    config = classifier_config(lm_config, num_classes)
    base = {k: v for k, v in dict(lm_params).items() if k not in ("out_head", "output", "output_bias")}
    params = {**base, **_fresh_head(config, key)}
    expected = jax.eval_shape(lambda: config.build().init(jax.random.PRNGKey(0), config.example_input())["params"])
    shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)  # noqa: E731
                           for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if shapes(params) != shapes(expected):
        missing = sorted(set(shapes(expected)) - set(shapes(params)))
        extra = sorted(set(shapes(params)) - set(shapes(expected)))
        raise ValueError(f"the base parameters do not fit the classifier config: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, or shapes differ")
    return config, params


def last_token_logits(logits, lengths):
    """logits: float[B, T, C], lengths: int[B] (1..T real tokens per row) -> float[B, C], the
    logits at each row's last real token ``lengths - 1``."""
    index = jnp.clip(lengths - 1, 0, logits.shape[1] - 1).astype(jnp.int32)
    return jnp.take_along_axis(logits, index[:, None, None], axis=1)[:, 0]


def make_apply(config) -> Callable:
    """``apply(params, tokens int32[B, T], key=None) -> float32[B, T, C]``; GPT-2's dropout runs only
    with a key (training)."""
    module = config.build()
    if isinstance(config, GPT2Config):
        def apply(params, tokens, key=None):
            rngs = None if key is None else {"dropout": key}
            return module.apply({"params": params}, tokens, deterministic=key is None, rngs=rngs)[0]
    else:
        def apply(params, tokens, key=None):
            return module.apply({"params": params}, tokens)[0]
    return apply


def classification_loss(apply_fn: Callable) -> Callable:
    """``loss_fn(params, batch, key) -> (mean cross-entropy, {"accuracy", "targets"})`` on the
    last real token's logits.

    batch: ``tokens`` int32[B, T], ``lengths`` int32[B], ``labels`` int32[B] and optionally
    ``weights`` float32[B] (0 for padding rows of a fixed-shape evaluation batch).
    ``apply_fn(params, tokens, key) -> logits float[B, T, C]`` (``key`` None at evaluation).
    ``aux["targets"]`` is the (weighted) row count, what means over several batches are weighted by."""

    def loss_fn(params, batch, key):
        logits = last_token_logits(apply_fn(params, batch["tokens"], key), batch["lengths"])
        weights = batch.get("weights")
        weights = jnp.ones(logits.shape[0], logits.dtype) if weights is None else weights.astype(logits.dtype)
        count = jnp.maximum(weights.sum(), 1.0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(logits.dtype)
        return (ce * weights).sum() / count, {"accuracy": (correct * weights).sum() / count,
                                              "targets": weights.sum()}

    return loss_fn


def trainable_predicate(config, mode: str) -> Callable[[str], bool]:
    """``predicate(path) -> bool`` over ``"a/b/kernel"`` path strings: True where ``mode`` trains."""
    mode = mode.replace("-", "_")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    head = set(head_names(config))
    last = _num_layers(config) - 1
    block = f"trf_blocks_{last}" if isinstance(config, GPT2Config) else f"layers_{last}"
    last_block = head | {block} | ({"final_norm"} if isinstance(config, GPT2Config) or config.final_norm else set())

    def predicate(path: str) -> bool:
        parts = path.split("/")
        if mode == "full":
            return True
        if mode == "head":
            return parts[0] in head
        if mode == "last_block":
            return parts[0] in last_block
        return is_lora_path(path)  # lora: the adapters only (the head's included)

    return predicate
