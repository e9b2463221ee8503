"""Causal multi-head (and grouped-query) self-attention with RoPE and an explicit KV cache.

Two parameter layouts, both x@W (raw ``(in, out)`` params that ``interop`` never transposes):

* ``per_head`` (Burkov ch. 4): ``heads_{h}/{W_Q,W_K,W_V}`` each ``(D, d_h)`` and ``W_O (D, D)``,
  mapping by rule to the book's ``attn.heads.{h}.W_Q`` ... ``attn.W_O``. At compute time the
  per-head matrices are concatenated into one fused ``(D, H * d_h)`` matrix per Q/K/V, so the
  projections are three matmuls instead of 3H small ones (the speed win; concatenating in head
  order gives exactly the book's per-head products). Needs ``kv_heads == num_heads``.
* ``fused`` (Llama-style): ``W_Q (D, H*d_h)``, ``W_K``/``W_V (D, KV*d_h)``, ``W_O (H*d_h, D)``;
  allows grouped-query attention (``KV < H``; query head ``h`` reads KV head ``h // (H / KV)``,
  as Hugging Face's ``repeat_kv`` does).

``KVCache`` holds keys/values already rotated by RoPE, ``float32[layers, batch, max_len,
kv_heads, head_dim]``, and ``lengths int32[batch]``: slots ``[0, lengths[b])`` of row ``b`` are
filled. A call with T new tokens writes their keys/values at slots ``lengths[b] .. lengths[b]+T-1``
(one ``lax.dynamic_update_slice`` per row, vmapped) and each new token attends to every filled slot
up to and including its own. There is no key-padding mask: as in the book, pad tokens are ordinary
keys (the loss ignores pad targets). XLA clamps an out-of-bounds write instead of failing, so the
caller must keep ``lengths + T <= max_len`` (checked on the host by ``check_cache_room``, which
the models run whenever the lengths are concrete; under ``jit`` it is the caller's promise).

Training (no cache) takes ``causal_attention``: heads moved to the front (``[B, H, T, dh]``, a
copy of the small Q/K/V, not of the ``[T, T]`` scores), the 1/sqrt(dh) scale folded into Q, the
causal mask from an iota compare, softmax in float32, and a hand-written backward
(``jax.custom_vjp``: ``dS = P * (dP - rowsum(dO * O))``, as FlashAttention does). On 2 CPU cores
XLA's own derivative of the einsum formulation transposed the ``[B, H, T, T]`` scores and
weights several times per layer and materialised broadcast constants of that size; the
custom backward removes most of it (issue 7: about 12-15 % of a training step of the book-size
decoder; ``python -m jaxllm.bench train`` measures it). The math and the parameters are
unchanged: logits and gradients equal the einsum version to float rounding.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.nn.rope import rope_angles, rope_interleaved, rope_rotate_half

xavier_uniform = nn.initializers.xavier_uniform()

ROPE = {"interleaved": rope_interleaved, "rotate_half": rope_rotate_half}
LAYOUTS = ("per_head", "fused")


@flax.struct.dataclass
class KVCache:
    """k, v: float32[layers, batch, max_len, kv_heads, head_dim]; lengths: int32[batch]."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def zeros(cls, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32):
        shape = (layers, batch, max_len, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def check_cache_room(cache: KVCache, new_tokens: int, *, positions: int | None = None) -> None:
    """Host-side check that ``new_tokens`` more tokens fit every row: ``lengths[b] + new_tokens <=
    max_len`` (and ``<= positions`` when the model has only that many positions, GPT-2's learned
    table). The models' ``__call__`` runs it whenever ``cache.lengths`` is concrete; traced lengths
    (under ``jit``) pass unchecked, as the caller's promise, since XLA would clamp the write."""
    if new_tokens > cache.max_len:  # static: whatever the lengths (the message keys_values_and_mask gives)
        raise ValueError(f"KV cache overflow: {new_tokens} tokens do not fit a KV cache of max_len {cache.max_len}")
    if isinstance(cache.lengths, jax.core.Tracer):
        return
    lengths = np.asarray(cache.lengths)
    longest = int(lengths.max()) if lengths.size else 0
    if longest + new_tokens > cache.max_len:
        raise ValueError(
            f"KV cache overflow: a row holds {longest} of {cache.max_len} positions (the cache's "
            f"max_len) and {new_tokens} more were given")
    if positions is not None and longest + new_tokens > positions:
        raise ValueError(
            f"KV cache overflow: a row holds {longest} tokens and {new_tokens} more were given, past the "
            f"model's {positions} positions (context_length)")


def write_rows(buffer, new, offsets):
    """buffer float[batch, S, ...], new float[batch, T, ...], offsets int[batch] -> buffer with
    ``new[b]`` written at slots ``offsets[b] .. offsets[b] + T - 1``."""
    def one(buf, upd, off):
        return jax.lax.dynamic_update_slice(buf, upd.astype(buf.dtype), (off,) + (0,) * (buf.ndim - 1))

    return jax.vmap(one)(buffer, new, offsets)


def attend(q, k, v, mask):
    """q float[B, T, H, dh]; k, v float[B, S, KV, dh] with H a multiple of KV; mask bool[B, T, S]
    (True = may attend) -> float[B, T, H * dh], heads concatenated in head order."""
    b, t, h, dh = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, dh)  # query head h -> (kv head h // G, member h % G)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / jnp.sqrt(jnp.float32(dh))
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)  # every query sees itself: no NaN rows
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return out.reshape(b, t, h * dh)


def causal_attention(q, k, v):
    """Causal self-attention over T tokens (no cache), fast on CPU in training.

    q float[B, T, H, dh]; k, v float[B, T, KV, dh] with H a multiple of KV (query head h reads
    KV head h // (H / KV)) -> float[B, T, H * dh], heads concatenated in head order. Equals
    ``attend`` with a causal mask; its backward is ``_attention_bwd`` (see the module docstring).
    """
    b, t, h, dh = q.shape
    kv = k.shape[2]
    if kv != h:  # grouped-query: repeat each KV head for its group (the gradient sums the copies)
        k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
    q = q * jnp.asarray(1.0 / np.sqrt(dh), q.dtype)  # scale the small Q, not the [T, T] scores
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # heads first: [B, H, T, dh]
    mask = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [T, T], True on and below the diagonal
    out = _softmax_attention(q, k, v, mask)
    return jnp.swapaxes(out, 1, 2).reshape(b, t, h * dh)


def _attention_forward(q, k, v, mask):
    """q (pre-scaled), k, v float[B, H, T|S, dh], mask bool broadcastable to [B, H, T, S] ->
    (out float[B, H, T, dh], weights float32[B, H, T, S])."""
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k).astype(jnp.float32)
    scores = jnp.where(mask, scores, -jnp.inf)  # every query sees itself: no all-masked row
    scores = scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True))
    e = jnp.exp(scores)
    weights = e / e.sum(-1, keepdims=True)
    return jnp.einsum("bhts,bhsd->bhtd", weights.astype(v.dtype), v), weights


@jax.custom_vjp
def _softmax_attention(q, k, v, mask):
    return _attention_forward(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    out, weights = _attention_forward(q, k, v, mask)
    return out, (q, k, v, out, weights, mask)


def _attention_bwd(residuals, d_out):
    """P = softmax(S), O = P V: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
    dQ = dS K, dK = dS^T Q (Q already scaled; the mask gets no gradient)."""
    q, k, v, out, weights, mask = residuals
    d_v = jnp.einsum("bhts,bhtd->bhsd", weights.astype(d_out.dtype), d_out)
    d_weights = jnp.einsum("bhtd,bhsd->bhts", d_out, v).astype(jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    d_scores = (weights * (d_weights - row)).astype(q.dtype)
    d_q = jnp.einsum("bhts,bhsd->bhtd", d_scores, k)
    d_k = jnp.einsum("bhts,bhtd->bhsd", d_scores, q)
    return d_q, d_k, d_v, None


_softmax_attention.defvjp(_attention_fwd, _attention_bwd)


class HeadParams(nn.Module):
    """Burkov's ``AttentionHead`` parameters: ``W_Q``, ``W_K``, ``W_V`` each (D, d_h)."""

    d_model: int
    head_dim: int

    @nn.compact
    def __call__(self):
        shape = (self.d_model, self.head_dim)
        return tuple(self.param(n, xavier_uniform, shape) for n in ("W_Q", "W_K", "W_V"))


class SelfAttention(nn.Module):
    """x float[B, T, D], positions int[B, T], cache_kv (k, v float[B, S, KV, dh]) | None,
    lengths int[B] | None -> (float[B, T, D], new (k, v) | None)."""

    num_heads: int
    kv_heads: int
    head_dim: int
    layout: str = "per_head"
    rope: str = "interleaved"
    rope_base: float = 10000.0

    def _check(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.rope not in ROPE:
            raise ValueError(f"rope must be one of {tuple(ROPE)}, got {self.rope!r}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of kv_heads {self.kv_heads}")

    @nn.compact
    def __call__(self, x, positions, cache_kv=None, lengths=None):
        self._check()
        b, t, d = x.shape
        h, kv, dh = self.num_heads, self.kv_heads, self.head_dim
        if self.layout == "per_head":
            if kv != h:
                raise ValueError("the per_head layout has one K/V per head: kv_heads must equal num_heads")
            per_head = [HeadParams(d, dh, name=f"heads_{i}")() for i in range(h)]
            # Fuse: one (D, H*dh) matmul each for Q, K, V instead of 3H (D, dh) ones.
            w_q, w_k, w_v = (jnp.concatenate([p[j] for p in per_head], axis=1) for j in range(3))
            w_o = self.param("W_O", xavier_uniform, (h * dh, d))
        else:
            w_q = self.param("W_Q", xavier_uniform, (d, h * dh))
            w_k = self.param("W_K", xavier_uniform, (d, kv * dh))
            w_v = self.param("W_V", xavier_uniform, (d, kv * dh))
            w_o = self.param("W_O", xavier_uniform, (h * dh, d))

        q = (x @ w_q).reshape(b, t, h, dh)
        k = (x @ w_k).reshape(b, t, kv, dh)
        v = (x @ w_v).reshape(b, t, kv, dh)
        cos, sin = rope_angles(positions, dh, self.rope_base)
        rotate = ROPE[self.rope]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)

        if cache_kv is None:
            return causal_attention(q, k, v) @ w_o, None
        k, v, mask, new_kv = keys_values_and_mask(k, v, cache_kv, lengths)
        return attend(q, k, v, mask) @ w_o, new_kv


def keys_values_and_mask(k, v, cache_kv, lengths):
    """New keys/values k, v: float[B, T, KV, dh] -> (keys, values, mask bool[B, T, S], new cache (k, v) | None).

    Without a cache: plain causal attention over the T tokens. With one: the new keys/values are
    written at each row's ``lengths[b]`` and each query sees the cache slots up to its own.
    """
    b, t = k.shape[:2]
    if cache_kv is None:
        return k, v, jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t)), None
    cache_k, cache_v = cache_kv
    if t > cache_k.shape[1]:  # static shapes: raises at trace time
        raise ValueError(f"{t} tokens do not fit a KV cache of max_len {cache_k.shape[1]}")
    cache_k = write_rows(cache_k, k, lengths)
    cache_v = write_rows(cache_v, v, lengths)
    own = lengths[:, None] + jnp.arange(t)  # each new token's slot, [B, T]
    mask = jnp.arange(cache_k.shape[1])[None, None, :] <= own[:, :, None]
    return cache_k, cache_v, mask, (cache_k, cache_v)
