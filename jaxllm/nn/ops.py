"""The hardware-specific speed-ups, in one place; the layers and models call them as plain functions.

Each function here computes exactly the operation its plain counterpart names -- the same sums, in
the same dtypes (tests compare them with PyTorch's and with JAX's own derivative) -- and only the
way XLA is handed the work differs. They were written for XLA's CPU compile.

* ``matmul(x, w)`` is ``x @ w`` for ``x[..., in]`` and ``w[in, out]``, with its own backward:
  the weight gradient is one 2-D product of ``x`` and the output gradient flattened to rows,
  ``x[rows, in]^T @ dy[rows, out]``. JAX's own derivative contracts over all the leading axes at
  once, and XLA's CPU compile then copied the output gradient transposed to ``[out, rows]``
  before the product; flattened to rows, the product reads both operands as they are.
  ``dense_dot_general`` is the same product in the form ``flax.linen.Dense(dot_general=...)``
  calls, so Dense layers (and LoRA, which wraps them) keep their parameters and names. Write
  ``matmul(x, w)``, not ``x @ w``, in a new layer's training path.
* ``rope_tables(positions, head_dim, base)`` is ``jaxllm.nn.rope.rope_angles``; when the positions
  are a numpy array (``static_positions(t)``: ``0..t-1``, known when tracing), the cos/sin tables
  are computed with numpy and enter the compiled step as constants. Computed from traced
  positions, XLA fuses cos and sin into every use: once per head, for Q and K, forward and
  backward.
* ``layer_norm`` and ``rms_norm`` have the textbook backward written out. With ``xhat`` the
  normalised input, ``inv`` the reciprocal scale and ``gs = g * scale``:

  - LayerNorm: ``dx = inv * (gs - mean(gs) - xhat * mean(gs * xhat))``,
    ``dscale = sum(g * xhat)``, ``dshift = sum(g)``;
  - RMSNorm: ``dx = inv * (gs - xhat * mean(gs * xhat))``, ``dscale = sum(g * xhat)``.

  XLA's own derivative recomputed the statistics and transposed each residual-stream gradient to
  sum over tokens; the written-out backward reuses ``xhat`` and ``inv`` from the forward.
* ``softmax_attention(q, k, v, mask, keep=None)`` is ``softmax(q k^T masked) v`` (with dropout's
  keep-mask when given) with a hand-written backward, ``dS = P * (dP - rowsum(dO * O))`` as
  FlashAttention does; it holds with dropout too, since ``rowsum(dO * O) = rowsum(P * dP)`` where
  ``dP`` includes the mask. XLA's own derivative of the einsum formulation transposed the
  ``[B, H, T, T]`` scores and weights several times per layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.nn.rope import rope_angles

# -- x @ w with a row-flattened weight gradient -------------------------------------------------


@jax.custom_vjp
def matmul(x, w):
    """``x @ w`` for ``x[..., in]`` and a 2-D ``w[in, out]``."""
    return jnp.matmul(x, w)


def _matmul_fwd(x, w):
    return jnp.matmul(x, w), (x, w)


def _matmul_bwd(residuals, dy):
    x, w = residuals
    rows = lambda a: a.reshape(-1, a.shape[-1])  # [..., n] -> [rows, n]: one contraction axis
    dw = jax.lax.dot_general(rows(x), rows(dy), (((0,), (0,)), ((), ())))
    return jnp.matmul(dy, w.T), dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``flax.linen.Dense``'s ``dot_general``: its one contraction (last axis of ``lhs`` with the
    first of a 2-D kernel) through ``matmul``; any other request goes to ``lax.dot_general``."""
    (contract_lhs, contract_rhs), batch = dimension_numbers
    plain = (tuple(contract_lhs) == (lhs.ndim - 1,) and tuple(contract_rhs) == (0,) and rhs.ndim == 2
             and not any(batch[0]) and not any(batch[1]) and precision is None and preferred_element_type is None)
    if not plain:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return matmul(lhs, rhs)


# -- RoPE tables computed when tracing ----------------------------------------------------------


def static_positions(t: int) -> np.ndarray:
    """Positions ``0..t-1`` as ``int32[1, t]``, a numpy array: known when tracing, so
    ``rope_tables`` makes their cos/sin constants of the compiled step."""
    return np.arange(t, dtype=np.int32)[None, :]


def rope_tables(positions, head_dim: int, base: float = 10000.0):
    """``rope_angles(positions, head_dim, base)``: (cos, sin), each float32[batch, time, 1,
    head_dim // 2]. Numpy positions give numpy tables (computed once, when tracing); traced ones
    go to ``rope_angles``."""
    if not isinstance(positions, np.ndarray):
        return rope_angles(positions, head_dim, base)
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angles = np.asarray(positions, np.float32)[..., None] * inv_freq
    return np.cos(angles)[..., None, :], np.sin(angles)[..., None, :]


# -- LayerNorm and RMSNorm with the textbook backward -------------------------------------------


def _sum_over_tokens(a):
    return a.reshape(-1, a.shape[-1]).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, shift, eps):
    """float32 x[..., D] -> ``(x - mean) / sqrt(var + eps) * scale + shift`` (biased variance)."""
    return _layer_norm_fwd(x, scale, shift, eps)[0]


def _layer_norm_fwd(x, scale, shift, eps):
    centred = x - x.mean(-1, keepdims=True)
    inv = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)
    xhat = centred * inv
    return xhat * scale + shift, (xhat, inv, scale)


def _layer_norm_bwd(eps, residuals, g):
    xhat, inv, scale = residuals
    gs = g * scale
    dx = inv * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    return dx, _sum_over_tokens(g * xhat), _sum_over_tokens(g)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps):
    """float32 x[..., D] -> ``x / sqrt(mean(x^2) + eps) * scale``."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    inv = jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))
    xhat = x * inv
    return xhat * scale, (xhat, inv, scale)


def _rms_norm_bwd(eps, residuals, g):
    xhat, inv, scale = residuals
    gs = g * scale
    dx = inv * (gs - xhat * (gs * xhat).mean(-1, keepdims=True))
    return dx, _sum_over_tokens(g * xhat)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# -- softmax attention with a hand-written backward ---------------------------------------------


def softmax_attention(q, k, v, mask, keep=None):
    """q (already scaled by 1/sqrt(dh)), k, v float[B, H, T, dh], mask bool[T, T] (True: attend),
    keep float32[B, H, T, T] | None (dropout's keep-mask, kept entries scaled by 1 / (1 - rate))
    -> ``(softmax(q k^T where mask) * keep) v``, float[B, H, T, dh]; softmax in float32."""
    if keep is None:
        return _softmax_attention(q, k, v, mask)
    return _dropped_softmax_attention(q, k, v, mask, keep)


def _attention_forward(q, k, v, mask, keep=None):
    """q (pre-scaled), k, v float[B, H, T, dh], mask bool[T, T], keep float32[B, H, T, T] | None ->
    (out float[B, H, T, dh], weights float32[B, H, T, T] before dropout)."""
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k).astype(jnp.float32)
    scores = jnp.where(mask, scores, -jnp.inf)  # every query sees itself: no all-masked row
    scores = scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True))
    e = jnp.exp(scores)
    weights = e / e.sum(-1, keepdims=True)
    used = weights if keep is None else weights * keep
    return jnp.einsum("bhts,bhsd->bhtd", used.astype(v.dtype), v), weights


def _attention_backward(q, k, v, out, weights, keep, d_out):
    """P = softmax(S), O = (P * keep) V: dV = (P * keep)^T dO, dP = (dO V^T) * keep,
    dS = P * (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q (Q already scaled)."""
    used = weights if keep is None else weights * keep
    d_v = jnp.einsum("bhts,bhtd->bhsd", used.astype(d_out.dtype), d_out)
    d_weights = jnp.einsum("bhtd,bhsd->bhts", d_out, v).astype(jnp.float32)
    if keep is not None:
        d_weights = d_weights * keep
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    d_scores = (weights * (d_weights - row)).astype(q.dtype)
    d_q = jnp.einsum("bhts,bhsd->bhtd", d_scores, k)
    d_k = jnp.einsum("bhts,bhtd->bhsd", d_scores, q)
    return d_q, d_k, d_v


@jax.custom_vjp
def _softmax_attention(q, k, v, mask):
    return _attention_forward(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    out, weights = _attention_forward(q, k, v, mask)
    return out, (q, k, v, out, weights, mask)


def _attention_bwd(residuals, d_out):
    q, k, v, out, weights, _ = residuals
    return (*_attention_backward(q, k, v, out, weights, None, d_out), None)  # the mask gets no gradient


_softmax_attention.defvjp(_attention_fwd, _attention_bwd)


@jax.custom_vjp
def _dropped_softmax_attention(q, k, v, mask, keep):
    return _attention_forward(q, k, v, mask, keep)[0]


def _dropped_fwd(q, k, v, mask, keep):
    out, weights = _attention_forward(q, k, v, mask, keep)
    return out, (q, k, v, out, weights, mask, keep)


def _dropped_bwd(residuals, d_out):
    q, k, v, out, weights, _, keep = residuals
    return (*_attention_backward(q, k, v, out, weights, keep, d_out), None, None)


_dropped_softmax_attention.defvjp(_dropped_fwd, _dropped_bwd)
