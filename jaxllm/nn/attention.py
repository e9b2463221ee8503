"""Causal multi-head (and grouped-query) self-attention, one module for every language model
here, with an explicit per-layer KV cache.

``SelfAttention`` options cover both books' models:

* parameter ``layout``:
  - ``per_head`` (Burkov ch. 4): ``heads_{h}/{W_Q,W_K,W_V}`` each ``(D, d_h)`` and ``W_O (D, D)``,
    raw x@W params mapping by rule to the book's ``attn.heads.{h}.W_Q`` ... ``attn.W_O``. At
    compute time the per-head matrices are concatenated into one ``(D, H * d_h)`` matrix per
    Q/K/V (three matmuls instead of 3H small ones; head order gives exactly the book's products).
  - ``fused`` (Llama-style): ``W_Q (D, H*d_h)``, ``W_K``/``W_V (D, KV*d_h)``, ``W_O (H*d_h, D)``;
    allows grouped-query attention (query head ``h`` reads KV head ``h // (H / KV)``, as Hugging
    Face's ``repeat_kv`` does).
  - ``dense`` (Raschka's GPT-2): ``W_query``/``W_key``/``W_value`` ``nn.Dense`` layers (biases with
    ``use_bias``, the book's ``qkv_bias``) and ``out_proj`` (with bias), initialised like
    ``torch.nn.Linear``; being ``nn.Dense`` they are what LoRA's interceptor factors.
* ``rope``: ``interleaved`` | ``rotate_half`` rotate Q and K at each token's position; ``None``
  leaves positions to the model (GPT-2's learned table).
* ``dropout_rate`` on the attention weights (GPT-2), active with ``deterministic=False`` and a
  ``dropout`` rng.

Training (no cache) takes ``causal_attention``: heads moved to the front (a copy of the small
Q/K/V, not of the ``[T, T]`` scores), the 1/sqrt(dh) scale folded into Q, the causal mask from an
iota compare, attention dropout as a keep-mask, and ``jaxllm.nn.ops.softmax_attention`` (softmax
in float32, with a hand-written backward).

``KVCache`` holds each layer's keys and values as separate arrays, heads first: keys
``float[batch, kv_heads, max_len, head_dim]`` (already rotated by RoPE), values transposed,
``float[batch, kv_heads, head_dim, max_len]``, and ``lengths int32[batch]``: slots ``[0, lengths[b])``
of row ``b`` are filled. A call with T new tokens attends to the filled slots and to the new tokens
up to its own, then writes their keys/values at slots ``lengths[b] .. lengths[b]+T-1`` (a
``lax.dynamic_update_slice`` per row). Each array is laid out as its attention matmul reads it,
the slots the contracted (last) axis of the values: stored token-major, XLA would transpose (copy)
the whole cache at every decoded token, and at batch 1 it transposed ``[.., max_len, head_dim]``
values too. Separate arrays per layer (not one stacked ``[layers, ...]``
array) let a decode step update each layer in place: restacking the layers copied the whole cache
per token. There is no key-padding mask: as in the book, pad tokens are ordinary keys (the loss
ignores pad targets). XLA clamps an out-of-bounds write instead of failing, so ``lengths + T <=
max_len`` is checked on the host (``KVCache.check_room``, which the models run whenever the lengths
are concrete; under ``jit`` it is the caller's promise).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.nn.init import torch_dense
from jaxllm.nn.ops import matmul, rope_tables, softmax_attention
from jaxllm.nn.rope import rope_interleaved, rope_rotate_half

xavier_uniform = nn.initializers.xavier_uniform()

ROPE = {"interleaved": rope_interleaved, "rotate_half": rope_rotate_half}
LAYOUTS = ("per_head", "fused", "dense")


@flax.struct.dataclass
class KVCache:
    """keys float[batch, kv_heads, max_len, head_dim], values float[batch, kv_heads, head_dim, max_len]:
    one of each per layer; lengths: int32[batch]."""

    keys: tuple
    values: tuple
    lengths: jax.Array

    @classmethod
    def zeros(cls, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        keys, values = (batch, kv_heads, max_len, head_dim), (batch, kv_heads, head_dim, max_len)
        return cls(tuple(jnp.zeros(keys, dtype) for _ in range(layers)),
                   tuple(jnp.zeros(values, dtype) for _ in range(layers)), jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def first_slots(self, slots: int) -> "KVCache":
        """The cache cut to its first ``slots`` slots (same lengths)."""
        return self.replace(keys=tuple(k[:, :, :slots] for k in self.keys),
                            values=tuple(v[..., :slots] for v in self.values))

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        return self.keys[i], self.values[i]

    def check(self, *, layers: int, batch: int, kv_heads: int, head_dim: int, new_tokens: int,
              positions: int | None = None) -> None:
        """The cache fits the model and has room for ``new_tokens`` more in every row: shapes always
        (static, so under ``jit`` too), fill only when ``lengths`` is concrete."""
        keys, values = (batch, kv_heads, self.max_len, head_dim), (batch, kv_heads, head_dim, self.max_len)
        got = ({tuple(a.shape) for a in self.keys}, {tuple(a.shape) for a in self.values})
        if self.num_layers != layers or len(self.values) != layers or got != ({keys}, {values}) or \
                tuple(self.lengths.shape) != (batch,):
            raise ValueError(f"the cache must have {layers} layers of keys shaped [batch, kv_heads, max_len, "
                             f"head_dim] = {keys}, values shaped [batch, kv_heads, head_dim, max_len] = {values} and "
                             f"lengths [{batch}]; got {self.num_layers} layers of keys shaped {sorted(got[0])}, "
                             f"values shaped {sorted(got[1])} and lengths {tuple(self.lengths.shape)}")
        self.check_room(new_tokens, positions=positions)

    def check_room(self, new_tokens: int, *, positions: int | None = None) -> None:
        """Host-side check that ``new_tokens`` more tokens fit every row: ``lengths[b] + new_tokens
        <= max_len`` (and ``<= positions`` when the model has only that many positions, GPT-2's
        learned table). Traced lengths (under ``jit``) pass unchecked, as the caller's promise."""
        if new_tokens > self.max_len:  # static: whatever the lengths
            raise ValueError(f"KV cache overflow: {new_tokens} tokens do not fit a KV cache of max_len {self.max_len}")
        if isinstance(self.lengths, jax.core.Tracer):
            return
        lengths = np.asarray(self.lengths)
        longest = int(lengths.max()) if lengths.size else 0
        if longest + new_tokens > self.max_len:
            raise ValueError(
                f"KV cache overflow: a row holds {longest} of {self.max_len} positions (the cache's "
                f"max_len) and {new_tokens} more were given")
        if positions is not None and longest + new_tokens > positions:
            raise ValueError(
                f"KV cache overflow: a row holds {longest} tokens and {new_tokens} more were given, past the "
                f"model's {positions} positions (context_length)")


def write_rows(buffer, new, offsets, axis: int):
    """buffer float[batch, ...] with its S slots on ``axis`` (counted with the batch axis), new
    float[batch, ...] shaped alike but T long on ``axis``, offsets int[batch] -> buffer with
    ``new[b]`` written at slots ``offsets[b] .. offsets[b] + T - 1``."""
    def one(buf, upd, off):
        start = [0] * buf.ndim
        start[axis - 1] = off
        return jax.lax.dynamic_update_slice(buf, upd.astype(buf.dtype), start)

    return jax.vmap(one)(buffer, new, offsets)


def causal_attention(q, k, v, *, dropout_rate: float = 0.0, dropout_key=None):
    """Causal self-attention over T tokens (no cache), fast on CPU in training.

    q float[B, T, H, dh]; k, v float[B, T, KV, dh] with H a multiple of KV (query head h reads
    KV head h // (H / KV)) -> float[B, T, H * dh], heads concatenated in head order. With
    ``dropout_key`` and ``dropout_rate > 0`` the attention weights are dropped (kept ones scaled by
    1 / (1 - rate)), as ``nn.Dropout`` on the weights would.
    """
    b, t, h, dh = q.shape
    kv = k.shape[2]
    dropout = dropout_key is not None and dropout_rate > 0.0
    if not dropout and q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() in ("gpu", "cuda", "rocm"):
        return fused_causal_attention(q, k, v).reshape(b, t, h * dh)
    if kv != h:  # grouped-query: repeat each KV head for its group (the gradient sums the copies)
        k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
    q = q * jnp.asarray(1.0 / np.sqrt(dh), q.dtype)  # scale the small Q, not the [T, T] scores
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # heads first: [B, H, T, dh]
    mask = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [T, T], True on and below the diagonal
    keep = None
    if dropout:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, (b, h, t, t))
        keep = keep.astype(jnp.float32) / (1.0 - dropout_rate)
    out = softmax_attention(q, k, v, mask, keep)
    return jnp.swapaxes(out, 1, 2).reshape(b, t, h * dh)


def fused_causal_attention(q, k, v, implementation=None):
    """``jax.nn.dot_product_attention`` (causal, scale 1/sqrt(dh), grouped-query heads as they come):
    on a GPU in bf16/fp16 without dropout, JAX picks cuDNN's fused flash attention
    (``implementation=None``); elsewhere ``causal_attention``'s own path is used. q float[B, T, H, dh],
    k, v float[B, T, KV, dh] -> float[B, T, H, dh]."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def cached_attention(q, k, v, layer_cache, lengths):
    """Attention of T new tokens over a layer's cache.

    q float[B, T, H, dh]; k, v float[B, T, KV, dh] (the new tokens' keys/values); layer_cache
    (keys float[B, KV, S, dh], values float[B, KV, dh, S]); lengths int[B] -> (float[B, T, H * dh],
    updated (keys, values)). Each new token sees the row's filled slots ``[0, lengths[b])`` and the
    new tokens up to its own; their keys/values are then written at slots ``lengths[b] ..``.

    The attention reads the cache as it came in and the new keys/values as they are, one softmax
    over both, and only then writes the new keys/values: so the written cache has no other use and
    XLA writes it in place. Attending over the written cache made XLA copy each layer's keys and
    values two to four times per decoded token at batch 1 (it duplicated the write into the
    matmul's operand).
    """
    b, t, h, dh = q.shape
    cache_k, cache_v = layer_cache
    kv, s = cache_k.shape[1], cache_k.shape[2]
    if t > s:  # static shapes: raises at trace time
        raise ValueError(f"KV cache overflow: {t} tokens do not fit a KV cache of max_len {s}")
    q = q.reshape(b, t, kv, h // kv, dh) * jnp.asarray(1.0 / np.sqrt(dh), q.dtype)
    filled = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    old = jnp.einsum("btkgd,bksd->bkgts", q, cache_k).astype(jnp.float32)
    old = jnp.where(filled[:, None, None, None], old, -jnp.inf)
    new = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
    new = jnp.where(jnp.arange(t)[:, None] >= jnp.arange(t)[None, :], new, -jnp.inf)  # causal among the new
    top = jax.lax.stop_gradient(jnp.maximum(old.max(-1, keepdims=True), new.max(-1, keepdims=True)))
    old, new = jnp.exp(old - top), jnp.exp(new - top)  # every query sees itself: top is finite
    total = old.sum(-1, keepdims=True) + new.sum(-1, keepdims=True)
    out = (jnp.einsum("bkgts,bkds->btkgd", (old / total).astype(cache_v.dtype), cache_v)
           + jnp.einsum("bkgts,bskd->btkgd", (new / total).astype(v.dtype), v))
    # The write must follow the reads above. Without a data path from them to it, XLA's copy
    # insertion cannot order the two and copies each cache array before writing it in place, so
    # the new keys/values are made to depend on the output (adding 0; an optimization barrier
    # did not order them).
    after_reads = 0 * out.reshape(-1)[0].astype(k.dtype)
    k, v = k + after_reads, v + after_reads
    cache_k = write_rows(cache_k, jnp.swapaxes(k, 1, 2), lengths, axis=2)
    cache_v = write_rows(cache_v, jnp.transpose(v, (0, 2, 3, 1)), lengths, axis=3)
    return out.reshape(b, t, h * dh), (cache_k, cache_v)


class HeadParams(nn.Module):
    """Burkov's ``AttentionHead`` parameters: ``W_Q``, ``W_K``, ``W_V`` each (D, d_h)."""

    d_model: int
    head_dim: int

    @nn.compact
    def __call__(self):
        shape = (self.d_model, self.head_dim)
        return tuple(self.param(n, xavier_uniform, shape) for n in ("W_Q", "W_K", "W_V"))


class SelfAttention(nn.Module):
    """x float[B, T, D], positions int[B, T] (for RoPE), layer_cache (keys, values) | None,
    lengths int[B] | None -> (float[B, T, D], updated layer cache | None). See the module docstring
    for the options; a cached call is deterministic (no attention dropout in decoding)."""

    num_heads: int
    kv_heads: int
    head_dim: int
    layout: str = "per_head"
    use_bias: bool = False  # dense layout: Q/K/V biases
    rope: str | None = "interleaved"
    rope_base: float = 10000.0
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, positions=None, layer_cache=None, lengths=None, deterministic: bool = True):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.num_heads % self.kv_heads or (self.layout != "fused" and self.kv_heads != self.num_heads):
            raise ValueError(f"kv_heads {self.kv_heads} must divide num_heads {self.num_heads} (and equal it "
                             f"outside the fused layout)")
        b, t, d = x.shape
        h, kv, dh = self.num_heads, self.kv_heads, self.head_dim
        q, k, v, output = self._projections(x)
        q, k, v = q.reshape(b, t, h, dh), k.reshape(b, t, kv, dh), v.reshape(b, t, kv, dh)
        if self.rope is not None:
            if self.rope not in ROPE:
                raise ValueError(f"rope must be one of {tuple(ROPE)} or None, got {self.rope!r}")
            cos, sin = rope_tables(positions, dh, self.rope_base)
            q, k = ROPE[self.rope](q, cos, sin), ROPE[self.rope](k, cos, sin)
        if layer_cache is not None:
            out, layer_cache = cached_attention(q, k, v, layer_cache, lengths)
            return output(out), layer_cache
        drop = not deterministic and self.dropout_rate > 0.0
        key = self.make_rng("dropout") if drop else None
        return output(causal_attention(q, k, v, dropout_rate=self.dropout_rate, dropout_key=key)), None

    def _projections(self, x):
        """(q, k, v, output projection) in this layout's parameters."""
        d = x.shape[-1]
        h, kv, dh = self.num_heads, self.kv_heads, self.head_dim
        if self.layout == "dense":
            q, k, v = (torch_dense(h * dh, d, name=n, use_bias=self.use_bias)(x)
                       for n in ("W_query", "W_key", "W_value"))
            return q, k, v, torch_dense(d, h * dh, name="out_proj")
        if self.layout == "per_head":
            per_head = [HeadParams(d, dh, name=f"heads_{i}")() for i in range(h)]
            # Fuse: one (D, H*dh) matmul each for Q, K, V instead of 3H (D, dh) ones.
            w_q, w_k, w_v = (jnp.concatenate([p[j] for p in per_head], axis=1) for j in range(3))
        else:
            w_q = self.param("W_Q", xavier_uniform, (d, h * dh))
            w_k = self.param("W_K", xavier_uniform, (d, kv * dh))
            w_v = self.param("W_V", xavier_uniform, (d, kv * dh))
        w_o = self.param("W_O", xavier_uniform, (h * dh, d))
        return matmul(x, w_q), matmul(x, w_k), matmul(x, w_v), lambda out: matmul(out, w_o)
