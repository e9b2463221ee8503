"""``fit()``: the training loop every script shares. It knows nothing about any model.

The loop keeps the device busy: step metrics stay on the device and are fetched every
``log_every`` steps (and before every checkpoint or evaluation), where they are checked for
NaN/Inf, appended to ``metrics.jsonl`` (and, as TensorBoard scalars, to an event file beside it)
and shown on the progress bar. Because the check runs before each save, no checkpoint ever holds a
diverged state.

Several processes (``jax.distributed``, started by the jobs' flag parsing): every process runs
``fit`` with the same arguments; each reads only its rows of every batch (``ProcessBatches``),
all of them write each checkpoint together, only process 0 writes the run's other files, and
whatever must happen at the same step everywhere -- a time-based checkpoint, stopping on a signal
-- is decided together every ``log_every`` steps.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxllm.jax_internals import compiled_versions
from jaxllm.training import distributed
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.metrics import MetricsLog, plot_losses
from jaxllm.runio import update_json, write_json
from jaxllm.training.optim import OptimizerConfig, make_schedule
from jaxllm.training.run_flags import write_flags
from jaxllm.runio import is_first_process, lock_run_dir, unlock_run_dir
from jaxllm.training.state import TrainState
from jaxllm.training.tensorboard import open_event_log


class TrainingDiverged(RuntimeError):
    """The loss (or the state about to be saved) became NaN or Inf at the 1-based ``step``."""

    def __init__(self, step: int, value: float, last_checkpoint: int | None, *, what: str | None = None):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        kept = f"last good checkpoint: step {last_checkpoint}" if last_checkpoint is not None else "no checkpoint was written"
        what = what or f"loss became {value}"
        super().__init__(f"{what} at step {step}; training stopped ({kept})")


class TrainingInterrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM stopped training; ``last_checkpoint`` holds the run so far.
    ``exit_code`` is the shell's convention for the signal (130, 143)."""

    def __init__(self, signum: int, step: int, last_checkpoint: int | None):
        self.signum, self.step, self.last_checkpoint = signum, step, last_checkpoint
        self.exit_code = 128 + signum
        kept = (f"checkpoint step {last_checkpoint} holds the run" if last_checkpoint is not None
                else "no checkpoint was written")
        super().__init__(f"{signal.Signals(signum).name} at step {step}: {kept}")


class _StopRequests:
    """While active, SIGINT and SIGTERM only ask the loop to stop after the current step (a second
    signal stops at once). Handlers can only be set from the main thread; elsewhere a no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            self.signum = signum
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@jax.jit
def _non_finite_count(tree) -> jax.Array:
    """How many float values in ``tree`` are NaN or Inf."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return sum((jax.numpy.sum(~jax.numpy.isfinite(x)) for x in leaves), jax.numpy.int32(0))


class BatchSource(Protocol):
    """What ``fit`` needs from the training data (see ``jaxllm.data.batches.ArrayBatches``)."""

    batch_size: int
    steps_per_epoch: int

    def next(self) -> Any: ...
    def next_rows(self, rows: slice) -> Any: ...  # several processes: this process's rows of the next batch
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def fit(
    state: TrainState,
    train_step: Callable,
    train_data: BatchSource,
    *,
    out_dir: str | os.PathLike,
    steps: int | None = None,
    epochs: int | None = None,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int | None = None,
    final_eval_fn: Callable[[Any], dict[str, float]] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float | None = None,
    keep: int = 3,
    resume: bool = False,
    config: dict | None = None,
    log_every: int = 10,
    progress: bool = True,
    units_per_batch: int | None = None,
    unit: str = "examples",
    title: str = "",
    strategy=None,
    schedule: Callable[[Any], Any] | None = None,
    flags: dict | None = None,
) -> TrainState:
    """Train ``state`` for ``steps`` (or ``epochs`` x ``train_data.steps_per_epoch``) steps.

    Writes ``out_dir/metrics.jsonl``, TensorBoard event files (``jaxllm.training.tensorboard``;
    process 0 only), ``summary.json``, ``loss.png`` and ``checkpoints/``, and holds ``out_dir``'s
    run lock (``jaxllm.runio``): a second run there is refused. Train rows hold the
    step's metrics (``loss``, ``grad_norm`` before clipping, the loss's aux), the learning rate
    ``lr`` the step trained with, when ``schedule`` (step -> lr, as optax counts steps from 0; default:
    the schedule of ``config["optimizer"]``, a run config's ``OptimizerConfig``) is known, and
    throughput ``<unit>_per_s`` on each flush's last row.
    ``eval_fn(params) -> {"loss": ..., ...}`` runs every ``eval_every`` steps and, unless
    ``final_eval_fn`` is given (periodic evaluations on a sample, the last one on everything), at the end.
    A checkpoint is written at every evaluation, every ``checkpoint_every`` steps, at the end, and
    once ``checkpoint_minutes`` of wall time have passed since the last one (checked where metrics
    are fetched, every ``log_every`` steps; process 0's clock decides for every process).
    ``flags`` (the job's resolved command-line flags, ``cli.parse_args``) are written to
    ``out_dir/config.yaml`` once the run starts, after a resume's checks have passed, so a refused
    resume leaves the run's file as it was.
    ``resume=True`` continues from the newest intact checkpoint (params, optimiser, step, RNG and
    data position), so the run ends exactly where an uninterrupted one would; damaged newer steps
    are renamed ``damaged-<step>`` and their steps trained again. Without a checkpoint to resume
    from it is an error; without ``resume``, an ``out_dir`` that already holds checkpoints is
    refused rather than overwritten.

    Nothing is lost: a NaN/Inf loss raises ``TrainingDiverged``, and so does a non-finite value in
    the state about to be saved (checked before every checkpoint), so the last checkpoint is
    always good. SIGINT/SIGTERM stop after the current step, save it, write ``summary.json`` with
    ``"status": "interrupted"`` and raise ``TrainingInterrupted``. A checkpoint that cannot be
    written raises ``CheckpointWriteError`` with the earlier ones intact.

    ``strategy`` (``jaxllm.training.parallel``; default: the one ``train_step`` was built by, if
    any) runs the steps on its devices: ``state`` comes in and goes out on one device, is placed
    onto the devices after any restore, and gathered back for every evaluation and checkpoint
    (so checkpoints do not depend on the device count). ``eval_fn`` gets one-device params.
    """
    if schedule is None and isinstance((config or {}).get("optimizer"), dict):
        schedule = make_schedule(OptimizerConfig(**config["optimizer"]))
    strategy = strategy if strategy is not None else getattr(train_step, "strategy", None)
    place = strategy.place if strategy is not None else (lambda s: s)
    gather = strategy.gather if strategy is not None else (lambda s: s)
    if (steps is None) == (epochs is None):
        raise ValueError("pass exactly one of steps= or epochs=")
    total = steps if steps is not None else epochs * train_data.steps_per_epoch
    if total < 1:
        raise ValueError(f"nothing to train: {total} steps")
    if jax.process_count() > 1 and getattr(strategy, "batch_sharding", None) is None:
        raise ValueError(f"this job trains on one device ({getattr(strategy, 'name', 'no strategy')}); run it as one "
                         f"process, not {jax.process_count()}")
    if jax.process_count() > 1 and not isinstance(train_data, distributed.ProcessBatches):
        train_data = distributed.ProcessBatches(train_data, strategy.batch_sharding)  # this process's rows only
    took_lock = lock_run_dir(out_dir)
    try:
        return _fit(state, train_step, train_data, total=total, out_dir=out_dir, eval_fn=eval_fn,
                    eval_every=eval_every, final_eval_fn=final_eval_fn or eval_fn, checkpoint_every=checkpoint_every,
                    checkpoint_minutes=checkpoint_minutes, keep=keep, resume=resume,
                    config=config, log_every=log_every, progress=progress, units_per_batch=units_per_batch,
                    unit=unit, title=title, place=place, gather=gather, schedule=schedule, flags=flags,
                    devices=None if strategy is None else {"strategy": strategy.name, "devices": strategy.num_devices})
    finally:
        if took_lock:
            unlock_run_dir(out_dir)


def _fit(state, train_step, train_data, *, total, out_dir, eval_fn, eval_every, final_eval_fn, checkpoint_every,
         checkpoint_minutes, keep, resume, config, log_every, progress, units_per_batch, unit, title, place, gather,
         devices, schedule, flags) -> TrainState:
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
    summary_path = os.path.join(out_dir, "summary.json")
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=keep, config=config)
    checkpoint_every = checkpoint_every or total
    units_per_batch = units_per_batch or train_data.batch_size

    start = 0
    existing = ckpt.latest_step()
    if existing is not None and not resume:
        ckpt.close()
        raise ValueError(
            f"{out_dir} already holds checkpoints up to step {existing}: pass resume=True "
            "(--resume) to continue that run, or choose a new output directory"
        )
    if resume and existing is None:
        ckpt.close()
        raise ValueError(f"nothing to resume: {ckpt.directory} holds no checkpoint (run without --resume "
                         "to start this run afresh)")
    last_saved = None
    if resume:
        try:
            # several processes restore straight into the devices' layout (any process/device count)
            state, meta = ckpt.restore(place(state) if jax.process_count() > 1 else state)
        except Exception:
            ckpt.close()
            raise
        start = int(state.step)
        if is_first_process():
            for moved in ckpt.set_aside(newer_than=start):
                print(f"warning: set aside {moved}; resuming from step {start}", file=sys.stderr, flush=True)
        distributed.barrier("resume: newer steps set aside")
        ckpt.reload()
        train_data.load_state_dict(meta["data"])
        log.truncate_after(start)
        last_saved = start
    elif os.path.exists(log.path) and is_first_process():
        os.remove(log.path)  # nothing to continue from: a fresh run starts a fresh log
    if start > total:
        ckpt.close()
        raise ValueError(f"the checkpoint is at step {start}, beyond the {total} steps asked for")
    try:
        if flags is not None:
            write_flags(out_dir, flags)
        # a fresh run drops earlier event files; a finished run resumed writes nothing new
        events = open_event_log(out_dir, resumed_at=start if resume else None) if start < total else None
    except Exception:
        ckpt.close()
        raise
    if start == total:  # resuming a finished run: nothing to train, keep what it measured
        ckpt.close()
        state = gather(state)  # several processes restored it onto their devices
        fields = {"status": "finished", "steps": total, "last_checkpoint": last_saved}
        if eval_fn is not None:
            fields["eval"] = {k: float(v) for k, v in final_eval_fn(state.params).items()}
        update_json(summary_path, fields)
        return state
    state = place(state)

    def record(rows: list[dict]) -> None:
        log.append(rows)
        if events is not None:
            events.append(rows)

    pending: list[tuple[int, Any]] = []
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    t_first, elapsed, start_timed = None, 0.0, start
    t_aside = 0.0  # seconds spent evaluating and checkpointing, left out of throughput
    t0 = time.perf_counter()
    cache_size = None
    bar = tqdm(total=total, initial=start, disable=not progress or not is_first_process(), unit="step", dynamic_ncols=True, desc=title or None)

    def stopped(status: str, **fields) -> None:
        bar.close()
        write_json(summary_path, {"status": status, "steps": total, "last_checkpoint": last_saved, **fields})

    def flush(step_done: int) -> None:
        nonlocal pending, last_train, cache_size
        rows = []
        lrs = _learning_rates(schedule, [step for step, _ in pending])
        for (step, metrics), lr in zip(jax.device_get(pending), lrs):
            row = {"step": step, "split": "train", **{k: float(v) for k, v in metrics.items()}}
            if lr is not None:
                row["lr"] = lr
            if not math.isfinite(row["loss"]):
                record(rows)
                stopped("diverged", diverged_at_step=step)
                raise TrainingDiverged(step, row["loss"], last_saved)
            rows.append(row)
        pending = []
        if rows:
            # throughput since the first (compiling) step, on the window's last row
            rate = (step_done - start_timed) * units_per_batch / max(time.perf_counter() - t0 - t_aside, 1e-9)
            if step_done > start_timed:
                rows[-1][f"{unit}_per_s"] = rate
            last_train = rows[-1]
            bar.set_postfix(loss=f"{last_train['loss']:.4g}", **{f"{unit}/s": f"{rate:,.0f}"})
        record(rows)
        size = compiled_versions(train_step)
        if cache_size is not None and size is not None and size > cache_size:
            warnings.warn(
                f"train_step recompiled at step {step_done} ({size} compiled versions): batch "
                "shapes or dtypes changed between steps; pad or bucket them to fixed shapes",
                stacklevel=3,
            )
        cache_size = size

    def save(step: int, one_device) -> int:
        # the loss of step n is computed before its update: check what is saved, not just the loss
        bad = int(_non_finite_count((one_device.params, one_device.opt_state)))
        if bad:
            stopped("diverged", diverged_at_step=step)
            raise TrainingDiverged(step, math.nan, last_saved,
                                   what=f"{bad:,} parameter/optimiser values became NaN or Inf")
        # several processes: orbax writes the global arrays once (a gathered one-device state is
        # host-local there and cannot be serialised); restorable on any device count
        to_save = state if jax.process_count() > 1 else one_device
        return ckpt.save(to_save, data_state=train_data.state_dict())

    step = start
    stop = _StopRequests()
    saved_at = time.monotonic()
    try:
        with stop:
            for step in range(start + 1, total + 1):
                state, metrics = train_step(state, train_data.next())
                pending.append((step, metrics))
                if t_first is None:
                    jax.block_until_ready(metrics)
                    t_first = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    start_timed = step
                bar.update(1)
                signum, clock_due = _decide(step, log_every, signum=stop.signum or 0,
                                            clock=bool(checkpoint_minutes)
                                            and time.monotonic() - saved_at >= 60 * checkpoint_minutes)
                interrupted = signum != 0
                eval_now = eval_fn is not None and ((eval_every and step % eval_every == 0) or step == total)
                eval_now = eval_now and not interrupted
                save_now = step % checkpoint_every == 0 or step == total or interrupted or eval_now or clock_due
                if step % log_every == 0 or save_now or eval_now:
                    flush(step)
                t_before = time.perf_counter()
                if eval_now or save_now:
                    one_device = gather(state)
                if eval_now:
                    evaluate = final_eval_fn if step == total else eval_fn
                    last_eval = {k: float(v) for k, v in evaluate(one_device.params).items()}
                    record([{"step": step, "split": "eval", **last_eval}])
                if save_now:
                    last_saved = save(step, one_device)
                    saved_at = time.monotonic()
                t_aside += time.perf_counter() - t_before
                if interrupted:
                    stopped("interrupted", interrupted_at_step=step, signal=signal.Signals(signum).name)
                    raise TrainingInterrupted(signum, step, last_saved)
        elapsed = time.perf_counter() - t0 - t_aside
    except KeyboardInterrupt:  # a second signal, or a Ctrl-C outside the handler's reach: keep what is saved
        signum = stop.signum or signal.SIGINT
        stopped("interrupted", interrupted_at_step=step, signal=signal.Signals(signum).name)
        raise TrainingInterrupted(signum, step, last_saved) from None
    finally:
        bar.close()
        png = os.path.join(out_dir, "loss.png")
        _quietly(png, lambda: _plot(log, png, title))
        if events is not None:
            _quietly(events.path, events.close)
        ckpt.close()

    timed_steps = total - start_timed
    summary = {
        "status": "finished",
        "steps": total,
        "resumed_from": start or None,
        "final_loss": last_train.get("loss"),
        "eval": last_eval or None,
        "first_step_s": t_first,
        "steps_per_s": timed_steps / elapsed if timed_steps > 0 else None,
        f"{unit}_per_s": timed_steps * units_per_batch / elapsed if timed_steps > 0 else None,
        "last_checkpoint": last_saved,
        "parallel": devices,  # the strategy and its device count
    }
    write_json(summary_path, summary)
    return gather(state)


def _decide(step: int, log_every: int, *, signum: int, clock: bool) -> tuple[int, bool]:
    """``(the signal to stop on now or 0, checkpoint now for the clock)`` after ``step``; ``signum``
    is this process's pending signal (0: none). One process: a signal stops at once, the clock is
    looked at every ``log_every`` steps. Several: every process must save and stop at the same
    step, so both are decided together every ``log_every`` steps -- a signal to any process stops
    them all (the first process's signal names it), process 0's clock decides for all."""
    if step % log_every:
        return (signum if jax.process_count() == 1 else 0), False
    if jax.process_count() == 1:
        return signum, clock
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray([signum, int(clock)])))  # [processes, 2]
    signals = gathered[:, 0][gathered[:, 0] != 0]
    return (int(signals[0]) if signals.size else 0), bool(gathered[0, 1])


def _learning_rates(schedule, steps: list[int]) -> list:
    """The lr each 1-based step trained with (optax's count is 0 there), one schedule call for the
    window (a call per step costs about a millisecond); Nones without a schedule."""
    if schedule is None:
        return [None] * len(steps)
    lrs = np.asarray(schedule(np.asarray(steps) - 1), np.float64)
    return np.broadcast_to(lrs, (len(steps),)).tolist()  # a constant schedule returns one number


def _plot(log: MetricsLog, path: str, title: str) -> None:
    if not is_first_process():  # only process 0 writes the log and the plot
        return
    rows = log.read()
    if rows:
        plot_losses(rows, path, title=title)


def _quietly(path: str, write: Callable[[], Any]) -> None:
    """Run's end: the loss plot is a convenience and the event file is already flushed, so failing
    to write either (disk full ...) must not hide why the run stopped: it becomes a warning line."""
    try:
        write()
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not write {path}: {exc}", file=sys.stderr, flush=True)
