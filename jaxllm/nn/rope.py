"""Rotary position embeddings, in the two layouts the books and Hugging Face use.

* ``interleaved`` (Burkov): rotate the pairs ``(x[..., 0::2], x[..., 1::2])``.
* ``rotate_half`` (Llama / Hugging Face): rotate the pairs ``(x[..., :d/2], x[..., d/2:])``.

Both use ``theta_i = base^(-2i/d)`` for pair ``i``. They are the same rotation applied to a
permuted head dimension: interleaved RoPE on ``x`` equals rotate-half RoPE on
``x[..., interleaved_to_half(d)]`` (then permuted back), which is why moving interleaved-RoPE
Q/K weights into a rotate-half model needs only a permutation of their output columns.
Positions are per row (``int[batch, time]``), so a KV cache passes each row's own offset.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_angles(positions, head_dim: int, base: float = 10000.0):
    """positions: int[batch, time] -> (cos, sin), each float32[batch, time, 1, head_dim // 2]
    (the singleton axis broadcasts over heads): the angles ``position * theta_i``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]


def rope_interleaved(x, cos, sin):
    """x: float[batch, time, heads, head_dim] -> same shape; pairs are (even, odd) lanes."""
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def rope_rotate_half(x, cos, sin):
    """x: float[batch, time, heads, head_dim] -> same shape; pairs are (first half, second half)."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(x.dtype)


def interleaved_to_half(head_dim: int) -> np.ndarray:
    """Permutation ``p`` of a head's lanes with ``rope_interleaved(x)[..., p] ==
    rope_rotate_half(x[..., p])``: even lanes first, then odd lanes."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
