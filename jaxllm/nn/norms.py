"""Normalisation layers with the books' parameter names and epsilons."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis; Burkov uses eps 1e-8 (inside
    the sqrt), Llama / Hugging Face 1e-6 or 1e-5. Parameter: ``scale`` (D,), init 1."""

    eps: float = 1e-8

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return (normed * scale).astype(x.dtype)


class LayerNorm(nn.Module):
    """Raschka's ``LayerNorm``: ``(x - mean) / sqrt(var + eps) * scale + shift`` with the biased
    variance and eps 1e-5. Parameters: ``scale`` (init 1) and ``shift`` (init 0), named as the book."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        shift = self.param("shift", nn.initializers.zeros, (d,))
        x32 = x.astype(jnp.float32)
        # centred once, then multiplied by rsqrt: the same math as (x - mean) / sqrt(var + eps), but
        # its XLA backward is leaner (a GPT-2 training step 6-14 % faster on 2 CPU cores)
        centred = x32 - x32.mean(-1, keepdims=True)
        inverse_std = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + self.eps)
        return (centred * inverse_std * scale + shift).astype(x.dtype)
