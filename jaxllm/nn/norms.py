"""Normalisation layers with the books' parameter names and epsilons.

Both compute in float32 through ``jaxllm.nn.ops.layer_norm`` / ``rms_norm``: the formulas of the
class docstrings below, with the textbook backward written out (see ``jaxllm.nn.ops``).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxllm.nn.ops import layer_norm, rms_norm


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
