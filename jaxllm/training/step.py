"""Pure train and eval steps, built once and jitted once.

A loss function is pure: ``loss_fn(params, batch, key) -> (loss, aux)`` where ``aux`` is a dict
of scalar metrics and ``key`` is ``None`` at evaluation (no dropout).

Combining pieces of a batch (gradient accumulation, data-parallel devices) follows one rule: a
loss is a mean over a *count* -- ``aux["targets"]`` when the loss function reports it (tokens
that are not padding, see ``lm_cross_entropy``), else the rows of the batch. Each piece
contributes ``count * mean`` and the sums are divided by the total count, so the result is the
mean over the whole batch, not a mean of per-piece means. ``aux["targets"]`` itself is summed;
every other aux metric is count-weighted like the loss.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.training.state import TrainState

COUNT_KEY = "targets"


def batch_rows(batch) -> int:
    """Rows of ``batch`` (the leading dim of its first leaf)."""
    return int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])


def _count(aux: dict, batch):
    if COUNT_KEY in aux:
        return jax.lax.stop_gradient(jnp.asarray(aux[COUNT_KEY], jnp.float32))
    return jnp.asarray(batch_rows(batch), jnp.float32)


def _weigh(aux: dict, count) -> dict:
    return {k: (v if k == COUNT_KEY else count * v) for k, v in aux.items()}


def weighted_sums(loss_fn: Callable, params, batch, key, *, with_grads: bool = True) -> dict:
    """``{"count", "loss": count*loss, "aux": count*aux, "grads": count*grads}`` of one piece.

    Sums of these over pieces (``+`` or ``lax.psum``) turn into means with ``finish_sums``.
    """

    def weighted(p):
        loss, aux = loss_fn(p, batch, key)
        count = _count(aux, batch)
        return count * loss, (count, _weigh(aux, count))

    if with_grads:
        (loss, (count, aux)), grads = jax.value_and_grad(weighted, has_aux=True)(params)
        return {"count": count, "loss": loss, "aux": aux, "grads": grads}
    loss, (count, aux) = weighted(params)
    return {"count": count, "loss": loss, "aux": aux}


def finish_sums(sums: dict) -> dict:
    """Divide summed pieces by the total count: the whole batch's mean loss, aux (and grads).

    A batch with nothing to count gives 0 (as ``lm_cross_entropy`` does)."""
    total = sums["count"]
    safe = jnp.where(total > 0, total, 1.0)
    out = {"loss": sums["loss"] / safe, "aux": {k: (v if k == COUNT_KEY else v / safe)
                                                for k, v in sums["aux"].items()}}
    if "grads" in sums:
        out["grads"] = jax.tree_util.tree_map(lambda g: g / safe.astype(g.dtype), sums["grads"])
    return out


def split_micro_batches(batch, accum_steps: int, shards: int = 1):
    """``batch`` leaves ``[rows, ...]`` -> ``[accum_steps, rows // accum_steps, ...]``.

    With ``shards > 1`` (a batch whose rows are split over ``shards`` devices, in order) each
    micro-batch takes ``rows / (shards * accum_steps)`` rows from every device's shard, so
    splitting never moves rows between devices. Every row lands in exactly one micro-batch.
    """

    def split(x):
        per = x.shape[0] // (shards * accum_steps)
        x = x.reshape(shards, accum_steps, per, *x.shape[1:]).swapaxes(0, 1)
        return x.reshape(accum_steps, shards * per, *x.shape[3:])

    return jax.tree_util.tree_map(split, batch)


def accumulated_sums(loss_fn: Callable, params, batch, key, accum_steps: int, *, shards: int = 1,
                     with_grads: bool = True) -> dict:
    """``weighted_sums`` of the whole batch, computed over ``accum_steps`` micro-batches with
    ``lax.scan`` (one at a time, so activations are those of one micro-batch). Micro-batch ``i``
    gets the key ``fold_in(key, i)``; ``key`` may be None (evaluation)."""
    if accum_steps == 1:
        return weighted_sums(loss_fn, params, batch, key, with_grads=with_grads)
    micro = split_micro_batches(batch, accum_steps, shards)

    def body(grads_sum, xs):
        index, piece = xs
        piece_key = None if key is None else jax.random.fold_in(key, index)
        sums = weighted_sums(loss_fn, params, piece, piece_key, with_grads=with_grads)
        if with_grads:
            grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, sums.pop("grads"))
        return grads_sum, sums

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params) if with_grads else None
    grads, pieces = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    sums = jax.tree_util.tree_map(lambda x: x.sum(0), pieces)
    if with_grads:
        sums["grads"] = grads
    return sums


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, jit: bool = True,
                    accum_steps: int = 1, shards: int = 1, axis_name: str | None = None):
    """Return ``train_step(state, batch) -> (state, metrics)``.

    Jitted with the state donated: params and optimiser state are updated in place, so the
    caller must use the returned state and never the one passed in. ``batch`` leaves are
    ``[rows, ...]``; metrics are scalars ``loss``, ``grad_norm`` and the loss function's aux.

    ``accum_steps=k`` splits the batch into k micro-batches (rows must divide by k) and takes one
    optimiser step on the count-weighted sum of their gradients: the same update as the whole
    batch at once, with the activation memory of one micro-batch. The per-step key is
    ``fold_in(state.key, state.step)``; micro-batch i uses ``fold_in(step_key, i)``.

    For the data-parallel strategies (``jaxllm.training.parallel``): ``shards`` is how many
    devices the batch rows are split over (keeps micro-batches device-local), and ``axis_name``
    makes this per-device code (``shard_map``/``pmap``): each device folds its index into the
    key and the count-weighted sums are ``lax.psum``-ed over the axis -- the explicit
    cross-device mean of the gradients.
    """
    if int(accum_steps) != accum_steps or accum_steps < 1:
        raise ValueError(f"accum_steps must be an integer >= 1, got {accum_steps!r}")

    def apply(state, loss, aux, grads):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        if accum_steps == 1 and axis_name is None:  # the plain path: no weighting needed
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
            return apply(state, loss, aux, grads)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        sums = accumulated_sums(loss_fn, state.params, batch, key, accum_steps, shards=shards)
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        out = finish_sums(sums)
        return apply(state, out["loss"], out["aux"], out["grads"])

    return jax.jit(train_step, donate_argnums=0) if jit else train_step


def make_eval_step(loss_fn: Callable, *, jit: bool = True, axis_name: str | None = None):
    """Return ``eval_step(params, batch) -> metrics`` (``loss`` plus the loss function's aux).

    With ``axis_name`` (per-device code) the devices' count-weighted sums are psum-ed, so the
    metrics are those of the whole batch."""

    def eval_step(params, batch):
        if axis_name is None:
            loss, aux = loss_fn(params, batch, None)
            return {"loss": loss, **aux}
        out = finish_sums(jax.lax.psum(weighted_sums(loss_fn, params, batch, None, with_grads=False), axis_name))
        return {"loss": out["loss"], **out["aux"]}

    return jax.jit(eval_step) if jit else eval_step


def evaluate(eval_step: Callable, params, batches: Iterable) -> dict[str, float]:
    """Mean of each metric over ``batches``, weighted like the loss: by ``metrics["targets"]``
    when the loss reports that count (masked tokens), else by batch rows. ``targets`` is summed."""
    totals: dict[str, float] = {}
    count = 0.0
    for batch in batches:
        metrics = jax.device_get(eval_step(params, batch))
        n = float(metrics[COUNT_KEY]) if COUNT_KEY in metrics else batch_rows(batch)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * (1.0 if name == COUNT_KEY else n)
        count += n
    if not totals:
        raise ValueError("evaluate() got no batches")
    return {name: (total if name == COUNT_KEY else total / max(count, 1e-30)) for name, total in totals.items()}
