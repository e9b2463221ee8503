"""``TrainState``: everything a training run carries from step to step, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """params: the model's pytree; opt_state: the optimiser's; step: int32[]; key: uint32[2].

    The per-step randomness is ``jax.random.fold_in(key, step)``: the key itself never
    changes, so a resumed run draws exactly the numbers the uninterrupted one would have.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, key) -> "TrainState":
        return cls(
            params=params,
            opt_state=optimizer.init(params),
            step=jnp.asarray(0, jnp.int32),
            key=_raw_key(key),
        )


def _raw_key(key) -> jax.Array:
    """uint32[2] key data (what checkpoints store), from a legacy ``PRNGKey`` or a typed ``key``."""
    key = jnp.asarray(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return key.astype(jnp.uint32)
