"""The one interface every language model here offers, and the pieces of its forward they share.

``LanguageModelConfig`` (in the spirit of Levanter's ``LmConfig``): a config that names its model
also tells everything above it how to use that model, so ``generate``, the classifier, the
scripts, ``interop`` and the benchmarks never ask which model they hold:

* ``init(key) -> params`` (every ``ModelConfig`` has it) and ``logits(params, tokens, *, key=None) -> float[B, T, V]`` (dropout
  runs when a key is given) -- the one way to initialise and the one way to get logits;
* ``forward(params, tokens, cache) -> (logits, cache)`` and ``init_cache(batch, max_len=None)``:
  cached decoding (``KVCache`` for the transformers, the hidden state for the RNN);
* ``context_limit``: the longest prompt + generation (default cache length); ``max_positions``:
  the hard limit of a learned position table (None for RoPE and the RNN);
* ``block_names`` / ``head_names`` / ``final_norm_names``: the top-level parameter names of the
  blocks, the output head and the final norm (what fine-tuning modes select);
* ``width``: the model dimension a new head reads; ``with_classes(n)``: the classifier config;
  ``with_dropout(rate)``;
* the Hugging Face mapping where one exists: ``from_hf_config`` / ``to_hf_config``,
  ``check_hf_config``, ``hf_param_table`` (``jaxllm.interop`` applies them by rule).

Each model file implements these; the model modules take ``(tokens, *, cache=None,
deterministic=True)``. ``run_blocks`` (the layer loop with one cache entry per layer) and
``embed_without_pad_gradient`` (torch's ``padding_idx``) are shared by the model files.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.nn.attention import KVCache


class LanguageModelConfig(ModelConfig):
    """Base of every language-model config; see the module docstring for the interface."""

    block_prefix: ClassVar[str] = "layers_"  # the blocks' parameter names are f"{block_prefix}{i}"
    hf_model_type: ClassVar[str | None] = None  # Hugging Face model_type, where a mapping exists
    hf_tokenizer: ClassVar[str | None] = None  # the offline tokenizer of such HF models ("gpt2"), if one ships

    # --- what each model file defines -----------------------------------------------------
    @property
    def num_blocks(self) -> int:
        raise NotImplementedError

    @property
    def width(self) -> int:
        raise NotImplementedError

    @property
    def num_attention_heads(self) -> int:
        raise NotImplementedError

    @property
    def context_limit(self) -> int | None:
        """The longest prompt + generation (and the default cache length); None: no limit."""
        raise NotImplementedError

    @property
    def max_positions(self) -> int | None:
        """The most positions the model can represent at all (a learned table's size); None when
        any length works (RoPE, a recurrence)."""
        return None

    @property
    def head_names(self) -> tuple[str, ...]:
        """Top-level parameter names of the output head."""
        raise NotImplementedError

    @property
    def final_norm_names(self) -> tuple[str, ...]:
        return ()

    def with_classes(self, num_classes: int) -> "LanguageModelConfig":
        """This model with a ``num_classes`` head (untied) instead of the vocabulary head."""
        raise ValueError(f"{type(self).__name__} has no classifier head")

    def with_dropout(self, rate: float) -> "LanguageModelConfig":
        """This model with dropout ``rate`` (a rate above 0 is refused by models without dropout)."""
        if rate:
            raise ValueError(f"{type(self).__name__} has no dropout")
        return self

    def hf_export_config(self) -> "LanguageModelConfig":
        """The config ``hf_exportable`` gives, without the params: ``.to_hf_config()`` of it says
        whether the model exports before it is trained."""
        return self

    def hf_exportable(self, params) -> tuple["LanguageModelConfig", dict]:
        """``(config, params)`` as its Hugging Face architecture holds them (``jaxllm.export``):
        unchanged unless the model keeps a parameter HF always has as an implicit zero."""
        return self, params

    def init_cache(self, batch: int, max_len: int | None = None):
        raise NotImplementedError(f"{type(self).__name__} has no cache")

    # --- shared -------------------------------------------------------------------------------
    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(f"{self.block_prefix}{i}" for i in range(self.num_blocks))

    def logits(self, params, tokens, *, key=None):
        """tokens int32[B, T] -> logits float[B, T, V] (or [B, T, classes]); dropout (where the
        model has any) runs when ``key`` is given, as in training."""
        rngs = None if key is None else {"dropout": key}
        return self.apply(params, tokens, deterministic=key is None, rngs=rngs)[0]

    def forward(self, params, tokens, cache):
        """Cached decoding: tokens int32[B, T] continue each row of ``cache`` -> (logits, cache)."""
        return self.apply(params, tokens, cache=cache)


def run_blocks(make_block, num_layers: int, x, *args, cache: KVCache | None):
    """The layer loop: ``make_block(i)(x, layer_cache, lengths, *args) -> (x, layer_cache)`` for each
    layer (positional, so ``nn.remat``'s ``static_argnums`` can name them); returns ``(x, the cache
    advanced by the T new tokens | None)``."""
    lengths = None if cache is None else cache.lengths
    keys, values = [], []
    for i in range(num_layers):
        x, layer = make_block(i)(x, None if cache is None else cache.layer(i), lengths, *args)
        if layer is not None:
            keys.append(layer[0])
            values.append(layer[1])
    if cache is None:
        return x, None
    return x, KVCache(tuple(keys), tuple(values), cache.lengths + x.shape[1])


def embed_without_pad_gradient(table, tokens, pad_index: int | None):
    """``table[tokens]``; like torch's ``padding_idx``, the pad row is used in the forward but gets
    no gradient through the lookup."""
    if pad_index is not None:
        is_pad = (jnp.arange(table.shape[0]) == pad_index)[:, None]
        table = jnp.where(is_pad, jax.lax.stop_gradient(table), table)
    return jnp.take(table, tokens, axis=0)
