"""GPT-2 (Raschka ch. 4 ``GPTModel``) in Flax Linen, with a KV cache.

    x = drop(tok_emb(tokens) + pos_emb(positions))
    per block:  x = x + drop(att(norm1(x)));  x = x + drop(ff(norm2(x)))      (pre-LayerNorm)
    logits = final_norm(x) @ out_head        (or @ tok_emb.T when tie_embeddings)

LayerNorm eps 1e-5 with the biased variance, tanh-approximate GELU, learned positions, causal
attention scaled by ``1/sqrt(head_dim)``. Dropout (rate ``drop_rate``) after the embeddings, on
the attention weights and on both residual branches, active only with ``deterministic=False``
and a ``dropout`` rng.

Parameter names (Flax path -> torch key by ``jaxllm.interop``'s rule) are the twin's
(``jaxllm.torch_ref.gpt2.GPTModel``): ``tok_emb/embedding`` -> ``tok_emb.weight``,
``pos_emb/embedding``, ``trf_blocks_{i}/att/{W_query,W_key,W_value,out_proj}/{kernel,bias}``
(Q/K/V biases only with ``qkv_bias``), ``trf_blocks_{i}/ff/layers_0|layers_2/{kernel,bias}``,
``trf_blocks_{i}/norm1|norm2/{scale,shift}``, ``final_norm/{scale,shift}``, ``out_head/kernel``
(no bias; absent when tied; ``[D, num_classes]`` with a bias when ``num_classes`` is set, so the
model returns class logits at every position, as the book's classifier does). The twin's state dict also holds the causal masks
(``trf_blocks.{i}.att.mask``, buffers, not parameters): read it with
``interop.from_torch(config, sd, strict=False)`` or ``from_torch(config, drop_masks(sd))``.

Init follows PyTorch's defaults: embeddings N(0, 1); Linear weights and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm scale 1, shift 0.

The KV cache is ``jaxllm.nn.attention.KVCache`` (k, v float32[layers, batch, max_len, heads,
head_dim], lengths int32[batch]); with a cache, token t of row b sits at position
``lengths[b] + t`` (keys written there, learned position looked up there), so a prompt then
tokens one at a time (or in chunks) gives the full forward's logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig, register
from jaxllm.nn.attention import KVCache, check_cache_room, keys_values_and_mask
from jaxllm.nn.norms import LayerNorm
from jaxllm.validate import check_concrete_token_ids, check_token_batch

__all__ = ["GPT2Config", "GPT2", "KVCache", "init_cache", "check_cache_room", "make_forward",
           "gpt2_124m", "gpt2_medium", "tiny", "gelu_tanh"]


@register
@dataclasses.dataclass(frozen=True)
class GPT2Config(ModelConfig):
    family: ClassVar[str] = "gpt2"
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = False
    num_classes: int | None = None  # set: out_head is a new Linear(emb_dim, num_classes) with bias (Raschka ch. 6)
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, more compute)

    def __post_init__(self):
        if self.num_classes is not None and (self.num_classes < 1 or self.tie_embeddings):
            raise ValueError(f"num_classes must be >= 1 and needs tie_embeddings=False, got {self.num_classes}")
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def context_limit(self) -> int:
        """The longest prompt + generation: ``context_length``, the learned position table (a hard
        limit: a KV cache may not be longer)."""
        return self.context_length

    def build(self):
        return GPT2(self)

    def example_input(self, batch: int = 1):
        return jnp.zeros((batch, 4), jnp.int32)

    def validate_input(self, tokens) -> np.ndarray:
        """``tokens`` must be int ids ``[batch, time]`` in ``[0, vocab_size)`` with ``time <=
        context_length``; returns int32."""
        return check_token_batch(tokens, self.vocab_size, max_time=self.context_length)

    def to_twin_dict(self) -> dict:
        """The twin's ``cfg`` dict (tying has no twin counterpart)."""
        return {"vocab_size": self.vocab_size, "context_length": self.context_length, "emb_dim": self.emb_dim,
                "n_heads": self.n_heads, "n_layers": self.n_layers, "drop_rate": self.drop_rate,
                "qkv_bias": self.qkv_bias}


def gpt2_124m(**changes) -> GPT2Config:
    """The book's GPT_CONFIG_124M: 163,009,536 parameters untied, 124,412,160 tied."""
    return GPT2Config(**changes)


def gpt2_medium(**changes) -> GPT2Config:
    """GPT-2 medium (355M): emb 1024, 24 layers, 16 heads."""
    return GPT2Config(**{"emb_dim": 1024, "n_layers": 24, "n_heads": 16, **changes})


def tiny(**changes) -> GPT2Config:
    """The twin's GPT_CONFIG_TINY: GPT-2's vocabulary, context 128, emb 64, 4 heads, 2 layers."""
    return GPT2Config(**{"context_length": 128, "emb_dim": 64, "n_heads": 4, "n_layers": 2, **changes})


def init_cache(config: GPT2Config, batch: int, max_len: int | None = None) -> KVCache:
    """An empty cache: k, v float32[layers, batch, max_len, heads, head_dim], lengths 0.
    ``max_len`` (default ``context_length``) may not exceed ``context_length``: there are no
    learned positions past it."""
    max_len = config.context_length if max_len is None else max_len
    if not 1 <= max_len <= config.context_length:
        raise ValueError(f"max_len must lie in [1, context_length = {config.context_length}], got {max_len}")
    return KVCache.zeros(config.n_layers, batch, max_len, config.n_heads, config.head_dim)


def gelu_tanh(x):
    return 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * jnp.power(x, 3))))


def torch_uniform(fan_in: int):
    """PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and biases)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(features: int, fan_in: int, use_bias: bool = True, name: str | None = None):
    init = torch_uniform(fan_in)
    return nn.Dense(features, use_bias=use_bias, kernel_init=init, bias_init=init, name=name)


class MultiHeadAttention(nn.Module):
    """x float[B, T, D], cache_kv (k, v float[B, S, H, dh]) | None, lengths int[B] | None ->
    (float[B, T, D], new (k, v) | None)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, cache_kv=None, lengths=None, deterministic: bool = True):
        cfg = self.config
        b, t, d = x.shape
        h, dh = cfg.n_heads, cfg.head_dim
        q = dense(d, d, cfg.qkv_bias, "W_query")(x).reshape(b, t, h, dh)
        k = dense(d, d, cfg.qkv_bias, "W_key")(x).reshape(b, t, h, dh)
        v = dense(d, d, cfg.qkv_bias, "W_value")(x).reshape(b, t, h, dh)

        k, v, mask, new_kv = keys_values_and_mask(k, v, cache_kv, lengths)

        scores = jnp.einsum("bthd,bshd->bhts", q, k)
        scores = jnp.where(mask[:, None], scores, -jnp.inf)  # each query sees itself: no NaN rows
        weights = jax.nn.softmax(scores / math.sqrt(dh), axis=-1)
        weights = nn.Dropout(cfg.drop_rate)(weights, deterministic=deterministic)
        context = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, d)
        return dense(d, d, True, "out_proj")(context), new_kv


class FeedForward(nn.Module):
    """``layers_0`` (D -> 4D), tanh GELU, ``layers_2`` (4D -> D): the twin's ``ff.layers.{0,2}``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        d = self.config.emb_dim
        x = gelu_tanh(dense(4 * d, d, True, "layers_0")(x))
        return dense(d, 4 * d, True, "layers_2")(x)


class TransformerBlock(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x, cache_kv=None, lengths=None, deterministic: bool = True):
        drop = nn.Dropout(self.config.drop_rate)
        a, new_kv = MultiHeadAttention(self.config, name="att")(LayerNorm(name="norm1")(x), cache_kv, lengths,
                                                                deterministic)
        x = x + drop(a, deterministic=deterministic)
        f = FeedForward(self.config, name="ff")(LayerNorm(name="norm2")(x))
        return x + drop(f, deterministic=deterministic), new_kv


class GPT2(nn.Module):
    """``__call__(tokens int32[B, T], *, cache: KVCache | None = None, deterministic=True) ->
    (logits float32[B, T, vocab], cache | None)``.

    Without a cache, positions are ``0..T-1`` (T <= context_length). With one, the tokens
    continue each row at slot/position ``cache.lengths[b]`` and the returned cache has
    ``lengths + T``. Concrete (non-traced) inputs are checked: token ids outside ``[0,
    vocab_size)`` and a cache without room for the T tokens (``lengths + T`` past ``max_len`` or
    ``context_length``) raise ``ValueError``. Inside ``jit`` (traced ids and lengths) they are the
    caller's promise: compiled code cannot raise, and XLA silently clamps out-of-range lookups and
    cache writes; check at the boundary there (``GPT2Config.validate_input``, ``check_cache_room``;
    ``generate`` does both up front).
    Dropout runs only with ``deterministic=False`` and a ``dropout`` rng (``rngs={"dropout": k}``).
    """

    config: GPT2Config

    @nn.compact
    def __call__(self, tokens, *, cache: KVCache | None = None, deterministic: bool = True):
        cfg = self.config
        deterministic = deterministic or cfg.drop_rate == 0.0 or not self.has_rng("dropout")
        check_concrete_token_ids(tokens, cfg.vocab_size)  # before any cast; traced ids pass
        batch, t = tokens.shape
        normal = nn.initializers.normal(1.0)  # torch's nn.Embedding init
        tok_emb = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=normal, name="tok_emb")
        pos_emb = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=normal, name="pos_emb")

        if cache is not None:
            expected = (cfg.n_layers, batch, cache.max_len, cfg.n_heads, cfg.head_dim)
            if cache.k.shape != expected or cache.v.shape != expected or cache.lengths.shape != (batch,):
                raise ValueError(f"cache must have k, v of shape [layers, batch, max_len, heads, head_dim]"
                                 f" = {expected} and lengths [{batch}], got {cache.k.shape}, "
                                 f"{cache.v.shape}, {cache.lengths.shape}")
            # concrete lengths only (under jit the caller's promise); past the learned table the
            # position lookup would be clamped silently
            check_cache_room(cache, t, positions=cfg.context_length)
            positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        else:
            if t > cfg.context_length:  # static shapes: raises at trace time
                raise ValueError(f"{t} tokens exceed the context_length of {cfg.context_length}")
            positions = jnp.arange(t, dtype=jnp.int32)[None, :]

        x = tok_emb(tokens) + pos_emb(positions)
        x = nn.Dropout(cfg.drop_rate)(x, deterministic=deterministic)

        # remat keeps param names (the explicit name); `deterministic` (arg 4 counting self) is a Python bool
        block = nn.remat(TransformerBlock, static_argnums=(4,)) if cfg.remat else TransformerBlock
        new_k, new_v = [], []
        for i in range(cfg.n_layers):
            layer_kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = block(cfg, name=f"trf_blocks_{i}")(
                x, layer_kv, None if cache is None else cache.lengths, deterministic)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        x = LayerNorm(name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = tok_emb.attend(x)
        elif cfg.num_classes is not None:  # classifier: the book swaps out_head for Linear(D, classes)
            logits = dense(cfg.num_classes, cfg.emb_dim, True, "out_head")(x)
        else:
            logits = dense(cfg.vocab_size, cfg.emb_dim, False, "out_head")(x)
        if cache is not None:
            cache = KVCache(jnp.stack(new_k), jnp.stack(new_v), cache.lengths + t)
        return logits, cache


@functools.lru_cache(maxsize=None)  # one function per config, so jit caches keyed on it hit
def make_forward(config: GPT2Config, *, jit: bool = True):
    """Return ``forward(params, tokens int32[B, T], cache=None) -> (logits, cache)`` (deterministic)."""
    model = config.build()

    def forward(params, tokens, cache=None):
        return model.apply({"params": params}, tokens, cache=cache)

    return jax.jit(forward) if jit else forward
