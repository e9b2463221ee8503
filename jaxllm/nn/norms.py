"""Normalisation layers with the books' parameter names and epsilons.

Both compute in float32 and have a hand-written backward (``jax.custom_vjp``), the textbook one:
with ``xhat`` the normalised input, ``inv`` the reciprocal scale and ``gs = g * scale``,

* LayerNorm: ``dx = inv * (gs - mean(gs) - xhat * mean(gs * xhat))``,
  ``dscale = sum(g * xhat)``, ``dshift = sum(g)``;
* RMSNorm: ``dx = inv * (gs - xhat * mean(gs * xhat))``, ``dscale = sum(g * xhat)``.

XLA's own derivative recomputed the statistics and transposed each residual-stream gradient to
reduce over tokens; the written-out backward reuses ``xhat`` and ``inv`` from the forward (a GPT-2
training step 11-14 % faster on 2 CPU cores, measured interleaved in one process).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


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


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis; Burkov uses eps 1e-8 (inside
    the sqrt), Llama / Hugging Face 1e-6 or 1e-5. Parameter: ``scale`` (D,), init 1."""

    eps: float = 1e-8

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return rms_norm(x.astype(jnp.float32), scale.astype(jnp.float32), self.eps).astype(x.dtype)


class LayerNorm(nn.Module):
    """Raschka's ``LayerNorm``: ``(x - mean) / sqrt(var + eps) * scale + shift`` with the biased
    variance and eps 1e-5. Parameters: ``scale`` (init 1) and ``shift`` (init 0), named as the book."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        shift = self.param("shift", nn.initializers.zeros, (d,))
        return layer_norm(x.astype(jnp.float32), scale.astype(jnp.float32), shift.astype(jnp.float32),
                          self.eps).astype(x.dtype)
