"""One comparison: a ``Pair`` trained in both styles on the same batches, step by step, with what
differs recorded as it happens.

Per step: each side's loss and its difference, whether that difference is within the parity
tests' ``TRAJECTORY`` tolerance (the first step where it is not is where the trajectories part),
the parameter drift (max and RMS of ``|JAX - torch|`` over every parameter) and each side's step
time. Before the first step: the gradients of both at the shared initial weights, per parameter.
At the end: the drift per parameter, the speeds, JAX's compiled step memory, and for language
models both greedy continuations of one prompt.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import jax
import numpy as np

from jaxllm.compare.setups import Pair
from jaxllm.tolerance import GRAD, TRAJECTORY, bound_used, scale_of
from jaxllm.training import TrainState, make_optimizer, make_train_step
from jaxllm.training.freeze import freeze_optimizer, stop_frozen_gradients
from jaxllm.training.precision import mixed_precision


def torch_params(twin) -> dict[str, np.ndarray]:
    return {name: p.detach().float().numpy() for name, p in twin.named_parameters()}


def drift(pair: Pair, jax_params, twin) -> dict[str, tuple[float, float, float]]:
    """Per torch parameter name: (max |JAX - torch|, RMS of the difference, RMS of torch's values)."""
    theirs = torch_params(twin)
    out = {}
    for name, mine in pair.torch_named(jax_params).items():
        diff = np.asarray(mine, np.float64) - theirs[name]
        out[name] = (float(np.max(np.abs(diff))), float(np.sqrt(np.mean(diff ** 2))),
                     float(np.sqrt(np.mean(np.square(theirs[name], dtype=np.float64)))))
    return out


def overall(per_param: dict[str, tuple[float, float, float]]) -> tuple[float, float]:
    """(max over every parameter, RMS over every element) of the drift."""
    worst = max(v[0] for v in per_param.values())
    return worst, float(np.sqrt(np.mean([v[1] ** 2 for v in per_param.values()])))


class TorchSide:
    """The twin (or its ``torch.compile``-d copy) with torch's optimiser, one step per call."""

    def __init__(self, pair: Pair, twin, dtype: str, *, compiled: bool = False):
        import torch

        from jaxllm.compare.torch_side import TorchOptimizer, autocast, muon_layouts

        self.twin = twin
        muon = muon_layouts(pair.optimizer, pair.params) if pair.optimizer.name == "muon" else {}
        self.optimizer = TorchOptimizer(pair.optimizer, twin, pair.steps, muon)
        loss_fn, context = pair.torch_loss, autocast(dtype)

        def forward(batch):
            with context:
                return loss_fn(twin, batch)

        self.forward = torch.compile(forward) if compiled else forward

    def step(self, batch, keep_grads: bool = False):
        self.optimizer.zero_grad()
        loss = self.forward(batch)
        loss.backward()
        grads = ({n: p.grad.detach().float().numpy().copy() for n, p in self.twin.named_parameters()
                  if p.grad is not None} if keep_grads else None)
        self.optimizer.step()
        return float(loss.item()), grads


def run(pair: Pair, *, dtype: str = "float32", seed: int = 0, torch_compile: bool = False,
        on_step: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """Train ``pair`` for ``pair.steps`` steps in both styles; returns the comparison (``report``
    writes it). ``on_step(row)`` sees each step's row as it is recorded."""
    import torch
    from tqdm.auto import tqdm

    from jaxllm.compare.torch_side import load_jax_params, to_torch_batch

    torch.manual_seed(seed)
    twin = pair.make_twin()
    load_jax_params(pair.config, twin, pair.params, pair.torch_state)
    twin.train()
    sides = {"torch": TorchSide(pair, twin, dtype)}
    if torch_compile:
        sides["torch_compile"] = TorchSide(pair, copy.deepcopy(twin), dtype, compiled=True)

    optimizer, loss_fn = make_optimizer(pair.optimizer), pair.jax_loss
    if pair.trainable is not None:  # frozen params: no update, no gradient computed
        optimizer = freeze_optimizer(optimizer, pair.trainable)
        loss_fn = stop_frozen_gradients(loss_fn, pair.trainable)
    loss_fn = mixed_precision(loss_fn, dtype)
    train_step = make_train_step(loss_fn, optimizer)
    state = TrainState.create(jax.tree_util.tree_map(jax.numpy.asarray, pair.params), optimizer,
                              jax.random.PRNGKey(seed + 1))

    first = pair.batches.next()
    step_key = jax.random.fold_in(state.key, 0)
    jax_grads = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, step_key)[0]))(state.params, first)
    jax_grads = pair.torch_named(jax_grads)

    rows, times = [], {"jax": [], **{name: [] for name in sides}}
    torch_grads, parted = None, None
    bar = tqdm(total=pair.steps, unit="step", disable=not progress, desc=f"compare {pair.title}")
    batch = first
    for i in range(pair.steps):
        if i:
            batch = pair.batches.next()
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax_loss = float(metrics["loss"])  # the step ends when its loss is on the host, as torch's .item()
        times["jax"].append(time.perf_counter() - start)
        row = {"step": i + 1, "jax": jax_loss}
        tbatch = to_torch_batch(batch)
        for name, side in sides.items():
            start = time.perf_counter()
            row[name], grads = side.step(tbatch, keep_grads=(i == 0 and name == "torch"))
            times[name].append(time.perf_counter() - start)
            torch_grads = grads if grads is not None else torch_grads
        row["diff"] = abs(jax_loss - row["torch"])
        row["within"] = bound_used(jax_loss, row["torch"], TRAJECTORY) <= 1.0
        if not row["within"] and parted is None:
            parted = i + 1
        row["drift_max"], row["drift_rms"] = overall(drift(pair, state.params, twin))
        rows.append(row)
        if on_step is not None:
            on_step(row)
        bar.set_postfix(jax=f"{jax_loss:.4g}", torch=f"{row['torch']:.4g}", drift=f"{row['drift_max']:.1e}",
                        refresh=False)
        bar.update()
    bar.close()

    final = drift(pair, state.params, twin)
    result = {
        "title": pair.title, "steps": pair.steps, "dtype": dtype, "unit": pair.unit,
        "units_per_step": pair.units_per_batch, "optimizer": pair.optimizer.name, "tolerance": vars(TRAJECTORY),
        "notes": list(pair.notes), "rows": rows, "parted_at_step": parted,
        "gradients_at_step_0": {name: _gradient_difference(jax_grads[name], g) for name, g in torch_grads.items()},
        "drift_per_parameter": {name: {"max": v[0], "rms": v[1], "relative_rms": v[1] / max(v[2], 1e-30)}
                                for name, v in final.items()},
        "speed": {name: _speed(ts, pair.units_per_batch) for name, ts in times.items()},
        "memory": _memory(train_step, state, batch),
    }
    if pair.continue_text is not None:
        result["continuation"] = pair.continue_text(state.params, twin)
    return result


def _gradient_difference(jax_grad: np.ndarray, torch_grad: np.ndarray) -> dict:
    worst = float(np.max(np.abs(jax_grad - torch_grad)))
    return {"max_abs_diff": worst, "relative": worst / scale_of(torch_grad),
            "within": bound_used(jax_grad, torch_grad, GRAD) <= 1.0}


def _speed(seconds: list[float], units: int) -> dict:
    steady = seconds[1:] or seconds
    median = statistics.median(steady)
    return {"first_step_s": seconds[0], "median_step_s": median, "units_per_s": units / median if median else None}


def _memory(train_step, state, batch) -> dict:
    """JAX's compiled step (XLA's buffer assignment); PyTorch's CPU allocator keeps no statistics."""
    from jaxllm.bench.memory import step_memory

    try:
        jax_bytes = step_memory(train_step, state, batch)["total"]
    except Exception as exc:  # a backend without memory analysis: say so, keep the comparison
        jax_bytes = f"unavailable ({type(exc).__name__})"
    torch_bytes = None
    import torch

    if torch.cuda.is_available():
        torch_bytes = int(torch.cuda.max_memory_allocated())
    return {"jax_step_bytes": jax_bytes, "torch_peak_bytes": torch_bytes,
            "note": "JAX: XLA's buffer assignment of the compiled step (arguments + outputs - donated + temporaries); "
                    "PyTorch: its CUDA allocator's peak, none on a CPU"}
