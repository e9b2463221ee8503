"""Decoder-only transformer LM: Burkov's ch. 4 model, and a Llama-style preset of the same model.

    x = embed(tokens)
    per block:  x = x + attn(norm1(x));  x = x + mlp(norm2(x))      (pre-RMSNorm)
    logits = [final_norm](x) @ output      (or @ embedding.T when tie_embeddings)

Config switches (``TransformerConfig``): RoPE layout (``interleaved`` as the book,
``rotate_half`` as Llama/HF), RMSNorm eps, final norm, ReLU or SwiGLU MLP (+ biases), tying,
grouped-query attention (``num_kv_heads < num_heads``), and the Q/K/V parameter layout.

Parameter names (Flax path -> torch key by ``jaxllm.interop``'s rule):

* ``qkv_layout="per_head"`` (the ``burkov`` preset) mirrors the book's ``DecoderLanguageModel``:
  ``embedding/embedding`` -> ``embedding.weight``; ``layers_{i}/norm1/scale``;
  ``layers_{i}/attn/heads_{h}/{W_Q,W_K,W_V}`` (D, d_h); ``layers_{i}/attn/W_O`` (D, D);
  ``layers_{i}/norm2/scale``; ``layers_{i}/mlp/{W_1,B_1,W_2,B_2}``; ``output`` (D, V). All
  matrices x@W layout, so the twin's state dict loads unchanged. Q/K/V are fused at compute time
  (see ``jaxllm.nn.attention``).
* ``qkv_layout="fused"`` (the ``llama`` preset): ``layers_{i}/attn/{W_Q (D, H*d_h), W_K, W_V
  (D, KV*d_h), W_O (H*d_h, D)}``, ``layers_{i}/mlp/{W_1, W_3, W_2}`` (gate, up, down),
  ``final_norm/scale``; ``output`` absent when tied. This layout has no torch twin here.

Init (the book's): embedding N(0, 0.02) with the pad row zeroed; every matrix xavier-uniform;
biases 0; norm scales 1. Like torch's ``padding_idx``, the pad row of the embedding never gets a
gradient through the lookup (masked with ``stop_gradient``); with tied embeddings the output
head's use of that row still trains it, as in torch.

``max_len`` is only the default length of a KV cache (``init_cache``): RoPE has no learned
table, so the uncached forward takes any length. The book trains on context 30; the presets use
512 so that prompts plus generations fit one cache.
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
from jaxllm.nn.init import torch_bias_init, torch_kernel_init
from jaxllm.nn.attention import LAYOUTS, ROPE, KVCache, SelfAttention, check_cache_room
from jaxllm.nn.mlp import ACTIVATIONS, FeedForward
from jaxllm.nn.norms import RMSNorm
from jaxllm.validate import check_concrete_token_ids, check_token_batch

__all__ = ["TransformerConfig", "Transformer", "KVCache", "init_cache", "check_cache_room",
           "make_forward", "burkov", "tiny", "llama", "xavier_bound"]

xavier_uniform = nn.initializers.xavier_uniform()


@register
@dataclasses.dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    family: ClassVar[str] = "transformer"
    vocab_size: int = 256
    d_model: int = 128
    num_heads: int = 8
    num_kv_heads: int | None = None  # None: = num_heads; fewer: grouped-query attention
    num_layers: int = 2
    max_len: int = 512  # default KV-cache length only (RoPE has no length limit)
    pad_index: int | None = None  # its embedding row gets no gradient (torch's padding_idx)
    rope: str = "interleaved"  # "interleaved" (Burkov) | "rotate_half" (Llama / HF)
    rope_base: float = 10000.0
    norm_eps: float = 1e-8
    final_norm: bool = False
    mlp: str = "relu"  # "relu" | "swiglu"
    mlp_hidden: int | None = None  # None: 4 * d_model
    use_bias: bool = True  # MLP biases
    tie_embeddings: bool = False
    qkv_layout: str = "per_head"  # "per_head" (Burkov's names) | "fused" (needed for GQA)
    num_classes: int | None = None  # set: ``output`` is [d_model, num_classes] plus ``output_bias`` (a classifier head)
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, more compute)

    def __post_init__(self):
        if self.num_classes is not None and (self.num_classes < 1 or self.tie_embeddings):
            raise ValueError(f"num_classes must be >= 1 and needs tie_embeddings=False, got {self.num_classes}")
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got d_model / num_heads = {self.head_dim}")
        if not 1 <= self.kv_heads <= self.num_heads or self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads {self.num_heads}, got {self.num_kv_heads}")
        if self.qkv_layout not in LAYOUTS:
            raise ValueError(f"qkv_layout must be one of {LAYOUTS}, got {self.qkv_layout!r}")
        if self.qkv_layout == "per_head" and self.kv_heads != self.num_heads:
            raise ValueError("grouped-query attention (num_kv_heads < num_heads) needs qkv_layout='fused'")
        if self.rope not in ROPE:
            raise ValueError(f"rope must be one of {tuple(ROPE)}, got {self.rope!r}")
        if self.mlp not in ACTIVATIONS:
            raise ValueError(f"mlp must be one of {ACTIVATIONS}, got {self.mlp!r}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1, got {self.mlp_hidden}")
        if self.pad_index is not None and not 0 <= self.pad_index < self.vocab_size:
            raise ValueError(f"pad_index must lie in [0, {self.vocab_size - 1}], got {self.pad_index}")

    @property
    def context_limit(self) -> int:
        """The longest prompt + generation by default: ``max_len``, the default KV-cache length
        (RoPE itself has no limit, so a longer cache may be asked for explicitly)."""
        return self.max_len

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return 4 * self.d_model if self.mlp_hidden is None else self.mlp_hidden

    def build(self):
        return Transformer(self)

    def example_input(self, batch: int = 1):
        return jnp.zeros((batch, 4), jnp.int32)

    def validate_input(self, tokens) -> np.ndarray:
        """``tokens`` must be int ids ``[batch, time]`` in ``[0, vocab_size)``; returns int32."""
        return check_token_batch(tokens, self.vocab_size)


def burkov(vocab_size: int, pad_index: int | None = None, max_len: int = 512) -> TransformerConfig:
    """The book's decoder (ch. 4): D 128, 8 heads, 2 blocks, interleaved RoPE, pre-RMSNorm eps
    1e-8, ReLU MLP 4x with biases, no final norm, untied output."""
    return TransformerConfig(vocab_size, d_model=128, num_heads=8, num_layers=2, max_len=max_len,
                             pad_index=pad_index)


def tiny(vocab_size: int, pad_index: int | None = None) -> TransformerConfig:
    """The burkov layout, small, for tests and smoke runs."""
    return TransformerConfig(vocab_size, d_model=16, num_heads=2, num_layers=2, max_len=64, pad_index=pad_index)


def llama(vocab_size: int, d_model: int = 128, num_heads: int = 8, num_kv_heads: int | None = None,
          num_layers: int = 2, *, mlp_hidden: int | None = None, max_len: int = 512,
          pad_index: int | None = None, tie_embeddings: bool = False,
          rope_base: float = 10000.0) -> TransformerConfig:
    """Llama-style: rotate-half RoPE, RMSNorm eps 1e-6 with a final norm, SwiGLU without biases
    (hidden ``mlp_hidden``, default 4 * d_model), fused Q/K/V layout, optional GQA and tying."""
    return TransformerConfig(vocab_size, d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                             num_layers=num_layers, max_len=max_len, pad_index=pad_index,
                             rope="rotate_half", rope_base=rope_base, norm_eps=1e-6, final_norm=True,
                             mlp="swiglu", mlp_hidden=mlp_hidden, use_bias=False,
                             tie_embeddings=tie_embeddings, qkv_layout="fused")


def init_cache(config: TransformerConfig, batch: int, max_len: int | None = None) -> KVCache:
    """An empty cache: k, v float32[layers, batch, max_len, kv_heads, head_dim], lengths 0."""
    return KVCache.zeros(config.num_layers, batch, config.max_len if max_len is None else max_len,
                         config.kv_heads, config.head_dim)


def embedding_init(pad_index: int | None):
    """The book's: N(0, 0.02), pad row zeroed."""
    def init(key, shape, dtype=jnp.float32):
        table = 0.02 * jax.random.normal(key, shape, dtype)
        return table if pad_index is None else table.at[pad_index].set(0)

    return init


class DecoderBlock(nn.Module):
    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.norm1 = RMSNorm(cfg.norm_eps)
        self.attn = SelfAttention(cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.qkv_layout, cfg.rope,
                                  cfg.rope_base)
        self.norm2 = RMSNorm(cfg.norm_eps)
        self.mlp = FeedForward(cfg.hidden_dim, cfg.mlp, cfg.use_bias)

    def __call__(self, x, positions, cache_kv=None, lengths=None):
        a, new_kv = self.attn(self.norm1(x), positions, cache_kv, lengths)
        x = x + a
        return x + self.mlp(self.norm2(x)), new_kv


class Transformer(nn.Module):
    """``__call__(tokens int32[B, T], *, positions int32[B, T] | None = None, cache: KVCache | None
    = None) -> (logits float32[B, T, vocab], cache | None)``.

    Without a cache: causal self-attention over the T tokens, RoPE positions ``0..T-1`` unless
    given. With a cache: the tokens continue each row (keys/values written at slot
    ``cache.lengths[b]``, each token attends to all filled slots up to its own), positions default
    to ``lengths[b] + arange(T)``, and the returned cache has ``lengths + T``. So feeding a prompt
    then tokens one at a time, or in chunks, gives the full forward's logits.

    Concrete (non-traced) inputs are checked: token ids outside ``[0, vocab_size)`` and a cache
    without room for the T tokens (``lengths + T > max_len``) raise ``ValueError``. Inside
    ``jit`` (traced ids and lengths) they are the caller's promise: compiled code cannot raise, and
    XLA silently clamps an out-of-range lookup or cache write. Check at the boundary there
    (``TransformerConfig.validate_input``, ``check_cache_room``; ``generate`` does both up front).
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embedding = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embedding_init(cfg.pad_index))
        block = nn.remat(DecoderBlock) if cfg.remat else DecoderBlock  # same param names (``layers_{i}``)
        self.layers = [block(cfg) for _ in range(cfg.num_layers)]
        if cfg.final_norm:
            self.final_norm = RMSNorm(cfg.norm_eps)
        if cfg.num_classes is not None:  # a new Linear(d_model, classes) head, torch's default init
            self.output = self.param("output", torch_kernel_init, (cfg.d_model, cfg.num_classes))
            self.output_bias = self.param("output_bias", torch_bias_init(cfg.d_model), (cfg.num_classes,))
        elif not cfg.tie_embeddings:
            self.output = self.param("output", xavier_uniform, (cfg.d_model, cfg.vocab_size))

    def __call__(self, tokens, *, positions=None, cache: KVCache | None = None):
        cfg = self.config
        check_concrete_token_ids(tokens, cfg.vocab_size)  # before any cast; traced ids pass
        batch, t = tokens.shape
        table = self.embedding.embedding
        lookup = table
        if cfg.pad_index is not None:
            # torch's padding_idx: the pad row is used in the forward but gets no gradient.
            is_pad = (jnp.arange(cfg.vocab_size) == cfg.pad_index)[:, None]
            lookup = jnp.where(is_pad, jax.lax.stop_gradient(table), table)
        x = jnp.take(lookup, tokens, axis=0)

        if cache is not None:
            expected = (cfg.num_layers, batch, cache.max_len, cfg.kv_heads, cfg.head_dim)
            if cache.k.shape != expected or cache.v.shape != expected or cache.lengths.shape != (batch,):
                raise ValueError(f"cache must have k, v of shape [layers, batch, max_len, kv_heads, head_dim]"
                                 f" = {expected} and lengths [{batch}], got {cache.k.shape}, "
                                 f"{cache.v.shape}, {cache.lengths.shape}")
            check_cache_room(cache, t)  # concrete lengths only; under jit the caller's promise
            offset = cache.lengths[:, None]
        else:
            offset = jnp.zeros((batch, 1), jnp.int32)
        if positions is None:
            positions = offset + jnp.arange(t, dtype=jnp.int32)[None, :]

        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            layer_kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = layer(x, positions, layer_kv, None if cache is None else cache.lengths)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        if cfg.final_norm:
            x = self.final_norm(x)
        logits = x @ (table.T if cfg.tie_embeddings else self.output)
        if cfg.num_classes is not None:
            logits = logits + self.output_bias
        if cache is not None:
            cache = KVCache(jnp.stack(new_k), jnp.stack(new_v), cache.lengths + t)
        return logits, cache


@functools.lru_cache(maxsize=None)  # one function per config, so jit caches keyed on it hit
def make_forward(config: TransformerConfig, *, jit: bool = True):
    """Return ``forward(params, tokens int32[B, T], positions=None, cache=None) -> (logits, cache)``."""
    model = config.build()

    def forward(params, tokens, positions=None, cache=None):
        return model.apply({"params": params}, tokens, positions=positions, cache=cache)

    return jax.jit(forward) if jit else forward


def xavier_bound(fan_in: int, fan_out: int) -> float:
    """Half-width of the xavier-uniform distribution."""
    return math.sqrt(6.0 / (fan_in + fan_out))
