"""Pure train and eval steps, built once and jitted once.

A loss function is pure: ``loss_fn(params, batch, key) -> (loss, aux)`` where ``aux`` is a dict
of scalar metrics and ``key`` is ``None`` at evaluation (no dropout).
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np
import optax

from jaxllm.training.state import TrainState


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, jit: bool = True):
    """Return ``train_step(state, batch) -> (state, metrics)``.

    Jitted with the state donated: params and optimiser state are updated in place, so the
    caller must use the returned state and never the one passed in.
    """

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(train_step, donate_argnums=0) if jit else train_step


def make_eval_step(loss_fn: Callable, *, jit: bool = True):
    """Return ``eval_step(params, batch) -> metrics`` (``loss`` plus the loss function's aux)."""

    def eval_step(params, batch):
        loss, aux = loss_fn(params, batch, None)
        return {"loss": loss, **aux}

    return jax.jit(eval_step) if jit else eval_step


def evaluate(eval_step: Callable, params, batches: Iterable) -> dict[str, float]:
    """Mean of each metric over ``batches``, weighted by batch size (rows of the first array)."""
    totals: dict[str, float] = {}
    count = 0
    for batch in batches:
        n = int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])
        metrics = jax.device_get(eval_step(params, batch))
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * n
        count += n
    if count == 0:
        raise ValueError("evaluate() got no batches")
    return {name: total / count for name, total in totals.items()}
