"""The periodic actions of ``fit``'s loop (the pattern of clu's periodic actions): each hook says
whether it acts after a step (``due``) and then acts (``__call__``); the loop knows none of them.

* ``MetricsHook``: keeps every step's metrics on the device and fetches them every ``log_every``
  steps (and before an evaluation or a checkpoint): the divergence guard, ``metrics.jsonl``,
  TensorBoard, the progress bar's loss and throughput, the recompilation warning.
* ``EvaluationHook``: ``eval_fn`` every ``eval_every`` steps, ``final_eval_fn`` after the last.
* ``CheckpointHook``: a checkpoint every ``checkpoint_every`` steps, at every evaluation, after the
  last step, when the run stops on a signal and when the clock says so; nothing non-finite is saved.

They share one ``StepInfo`` per step: the step, the live state, the one-device copy of it (gathered
once, when a hook first asks) and what the run has decided at that step (stopping, the clock).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np

from jaxllm.jax_internals import compiled_versions
from jaxllm.runio import discard_previous_run
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.metrics import MetricsLog


class TrainingDiverged(RuntimeError):
    """The loss (or the state about to be saved) became NaN or Inf at the 1-based ``step``."""

    def __init__(self, step: int, value: float, last_checkpoint: int | None, *, what: str | None = None):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        kept = (f"last good checkpoint: step {last_checkpoint}" if last_checkpoint is not None
                else "no checkpoint was written")
        what = what or f"loss became {value}"
        super().__init__(f"{what} at step {step}; training stopped ({kept})")


@dataclasses.dataclass
class StepInfo:
    """What the hooks see after one step."""

    step: int
    last: bool  # the run's last step
    state: Any  # on the strategy's devices
    metrics: Any  # this step's, still on the device
    stopping: int  # the signal the run stops on after this step, 0: none
    clock_due: bool  # a time-based checkpoint is due
    gather: Callable[[Any], Any]
    _one_device: Any = None

    @property
    def one_device(self):
        """The state on one device (checkpointable, what ``eval_fn`` takes); gathered once."""
        if self._one_device is None:
            self._one_device = self.gather(self.state)
        return self._one_device


class Hook:
    """One periodic action; see the module docstring. ``seconds_aside``: time spent acting, which
    throughput leaves out."""

    seconds_aside = 0.0

    def due(self, info: StepInfo) -> bool:
        raise NotImplementedError

    def __call__(self, info: StepInfo) -> None:
        raise NotImplementedError

    def timed(self, info: StepInfo) -> None:
        started = time.perf_counter()
        self(info)
        self.seconds_aside += time.perf_counter() - started


class EvaluationHook(Hook):
    def __init__(self, eval_fn, final_eval_fn, every: int | None, record: Callable[[list[dict]], None]):
        self.eval_fn, self.final_eval_fn, self.every, self.record = eval_fn, final_eval_fn, every, record
        self.last: dict[str, float] = {}

    def due(self, info: StepInfo) -> bool:
        periodic = bool(self.every) and info.step % self.every == 0
        return self.eval_fn is not None and (periodic or info.last) and not info.stopping

    def __call__(self, info: StepInfo) -> None:
        evaluate = self.final_eval_fn if info.last else self.eval_fn
        self.last = {k: float(v) for k, v in evaluate(info.one_device.params).items()}
        self.record([{"step": info.step, "split": "eval", **self.last}])


class CheckpointHook(Hook):
    def __init__(self, checkpointer: Checkpointer, every: int, evaluation: EvaluationHook,
                 data_state: Callable[[], dict], last_saved: int | None, on_diverged: Callable[[int], None]):
        self.checkpointer, self.every, self.evaluation = checkpointer, every, evaluation
        self.data_state, self.last_saved, self.on_diverged = data_state, last_saved, on_diverged
        self.saved_at = time.monotonic()

    def due(self, info: StepInfo) -> bool:
        return (info.step % self.every == 0 or info.last or bool(info.stopping) or info.clock_due
                or self.evaluation.due(info))

    def __call__(self, info: StepInfo) -> None:
        # the loss of step n is computed before its update: check what is saved, not just the loss
        one_device = info.one_device
        bad = int(_non_finite_count((one_device.params, one_device.opt_state)))
        if bad:
            self.on_diverged(info.step)
            raise TrainingDiverged(info.step, math.nan, self.last_saved,
                                   what=f"{bad:,} parameter/optimiser values became NaN or Inf")
        # several processes: orbax writes the global arrays once (a gathered one-device state is
        # host-local there and cannot be serialised); restorable on any device count
        to_save = info.state if jax.process_count() > 1 else one_device
        self.last_saved = self.checkpointer.save(to_save, data_state=self.data_state())
        self.saved_at = time.monotonic()
        discard_previous_run(os.path.dirname(self.checkpointer.directory))  # the run --overwrite replaced

    def clock_due(self, minutes: float | None) -> bool:
        return bool(minutes) and time.monotonic() - self.saved_at >= 60 * minutes


class MetricsHook(Hook):
    """Fetches the pending step metrics every ``log_every`` steps or when ``flush_when(info)``."""

    def __init__(self, log: MetricsLog, events, bar, *, log_every: int, schedule, unit: str, units_per_batch: int,
                 train_step, flush_when: Callable[[StepInfo], bool], on_diverged: Callable[[int], None],
                 last_saved: Callable[[], int | None], start: int, aside: Callable[[], float]):
        self.log, self.events, self.bar, self.log_every, self.schedule = log, events, bar, log_every, schedule
        self.unit, self.units_per_batch, self.train_step = unit, units_per_batch, train_step
        self.flush_when, self.on_diverged, self.last_saved, self.aside = flush_when, on_diverged, last_saved, aside
        self.pending: list[tuple[int, Any]] = []
        self.last: dict[str, float] = {}
        self.first_step_s: float | None = None
        self.start_timed = start
        self.t0 = time.perf_counter()
        self.compiled = None

    def due(self, info: StepInfo) -> bool:
        return True  # every step's metrics are kept; __call__ fetches them when it is time

    def __call__(self, info: StepInfo) -> None:
        self.pending.append((info.step, info.metrics))
        if self.first_step_s is None:  # the first step compiles: time it alone, and the rest from its end
            jax.block_until_ready(info.metrics)
            self.first_step_s = time.perf_counter() - self.t0
            self.t0, self.start_timed = time.perf_counter(), info.step
        self.bar.update(1)
        if info.step % self.log_every == 0 or self.flush_when(info):
            self.flush(info.step)

    def record(self, rows: list[dict]) -> None:
        self.log.append(rows)
        if self.events is not None:
            self.events.append(rows)

    def flush(self, step_done: int) -> None:
        rows = []
        lrs = _learning_rates(self.schedule, [step for step, _ in self.pending])
        for (step, metrics), lr in zip(jax.device_get(self.pending), lrs):
            row = {"step": step, "split": "train", **{k: float(v) for k, v in metrics.items()}}
            if lr is not None:
                row["lr"] = lr
            if not math.isfinite(row["loss"]):
                self.record(rows)
                self.on_diverged(step)
                raise TrainingDiverged(step, row["loss"], self.last_saved())
            rows.append(row)
        self.pending = []
        if rows:
            if step_done > self.start_timed:  # throughput since the first (compiling) step, on the window's last row
                rows[-1][f"{self.unit}_per_s"] = (step_done - self.start_timed) * self.units_per_batch / self.elapsed()
            self.last = rows[-1]
            rate = rows[-1].get(f"{self.unit}_per_s", 0.0)
            self.bar.set_postfix(loss=f"{self.last['loss']:.4g}", **{f"{self.unit}/s": f"{rate:,.0f}"})
        self.record(rows)
        self._warn_on_recompile(step_done)

    def elapsed(self) -> float:
        """Seconds of training since the first step, evaluations and checkpoints left out."""
        return max(time.perf_counter() - self.t0 - self.aside(), 1e-9)

    def _warn_on_recompile(self, step: int) -> None:
        compiled = compiled_versions(self.train_step)
        if self.compiled is not None and compiled is not None and compiled > self.compiled:
            warnings.warn(f"train_step recompiled at step {step} ({compiled} compiled versions): batch shapes or "
                          "dtypes changed between steps; pad or bucket them to fixed shapes", stacklevel=4)
        self.compiled = compiled


@jax.jit
def _non_finite_count(tree) -> jax.Array:
    """How many float values in ``tree`` are NaN or Inf."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return sum((jax.numpy.sum(~jax.numpy.isfinite(x)) for x in leaves), jax.numpy.int32(0))


def _learning_rates(schedule, steps: list[int]) -> list:
    """The lr each 1-based step trained with (optax's count is 0 there), one schedule call for the
    window (a call per step costs about a millisecond); Nones without a schedule."""
    if schedule is None:
        return [None] * len(steps)
    lrs = np.asarray(schedule(np.asarray(steps) - 1), np.float64)
    return np.broadcast_to(lrs, (len(steps),)).tolist()  # a constant schedule returns one number
