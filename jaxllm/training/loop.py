"""``fit()``: the training loop every job shares. It knows nothing about any model.

The loop itself (``_train``) is a step and then the periodic actions that are due after it
(``jaxllm.training.hooks``): the metrics (kept on the device and fetched every ``log_every``
steps, where the divergence guard, ``metrics.jsonl``, TensorBoard and the progress bar see them),
evaluation and checkpoints. Metrics are always fetched before an evaluation or a checkpoint, so no
checkpoint ever holds a diverged state. ``fit`` around it takes the run directory's lock, starts or
resumes the run and writes ``summary.json`` and the loss plot.

Several processes (``jax.distributed``, started by the jobs' flag parsing): every process runs
``fit`` with the same arguments; each reads only its rows of every batch (``ProcessBatches``),
all of them write each checkpoint together, only process 0 writes the run's other files, and
whatever must happen at the same step everywhere -- a time-based checkpoint, stopping on a signal
-- is decided together every ``log_every`` steps.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from typing import Any, Callable, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxllm.runio import is_first_process, lock_run_dir, unlock_run_dir, update_json, write_json
from jaxllm.training import distributed
from jaxllm.training.checkpoint import Checkpointer, extension_note
from jaxllm.training.hooks import CheckpointHook, EvaluationHook, MetricsHook, StepInfo
from jaxllm.training.hooks import TrainingDiverged  # noqa: F401 -- part of fit's interface, raised by its hooks
from jaxllm.training.metrics import MetricsLog, plot_losses
from jaxllm.training.optim import OptimizerConfig, make_schedule
from jaxllm.training.run_flags import write_flags
from jaxllm.training.state import TrainState
from jaxllm.training.tensorboard import open_event_log


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


class BatchSource(Protocol):
    """What ``fit`` needs from the training data (see ``jaxllm.data.batches.ArrayBatches``)."""

    batch_size: int
    steps_per_epoch: int

    def next(self) -> Any: ...
    def next_rows(self, rows: slice) -> Any: ...  # several processes: this process's rows of the next batch
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How ``fit`` runs: where, how long, and when it logs, evaluates and checkpoints.

    ``steps`` or ``epochs`` (x ``train_data.steps_per_epoch``): exactly one. ``eval_every``: the
    evaluation's period (and always after the last step); a checkpoint is written at every
    evaluation, every ``checkpoint_every`` steps, after the last one and once ``checkpoint_minutes``
    of wall time have passed since the last (looked at every ``log_every`` steps, when metrics are
    fetched; process 0's clock decides for every process); ``keep`` of them stay. ``resume``:
    continue from the newest intact checkpoint. ``run_config``: what a checkpoint must match to
    be resumed (``checkpoint.run_config``); ``flags``: the job's resolved flags, written to
    ``config.yaml`` once the run starts (after a resume's checks, so a refused resume leaves the
    file as it was). ``unit``/``units_per_batch``: what throughput counts (default: examples, the
    batch size); ``title``: the progress bar's and the plot's."""

    out_dir: str | os.PathLike
    steps: int | None = None
    epochs: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = None
    keep: int = 3
    resume: bool = False
    log_every: int = 10
    progress: bool = True
    run_config: dict | None = None
    flags: dict | None = None
    unit: str = "examples"
    units_per_batch: int | None = None
    title: str = ""


def fit(state: TrainState, train_step: Callable, train_data: BatchSource, config: FitConfig, *,
        eval_fn: Callable[[Any], dict[str, float]] | None = None,
        final_eval_fn: Callable[[Any], dict[str, float]] | None = None,
        strategy=None, schedule: Callable[[Any], Any] | None = None) -> TrainState:
    """Train ``state`` with ``train_step`` on ``train_data`` as ``config`` says; returns the final state.

    Writes ``out_dir/metrics.jsonl``, TensorBoard event files (``jaxllm.training.tensorboard``;
    process 0 only), ``summary.json``, ``loss.png`` and ``checkpoints/``, and holds ``out_dir``'s
    run lock (``jaxllm.runio``): a second run there is refused. Train rows hold the step's metrics
    (``loss``, ``grad_norm`` before clipping, the loss's aux), the learning rate ``lr`` the step
    trained with, when ``schedule`` (step -> lr, as optax counts steps from 0; default: the schedule
    of the run config's ``optimizer``) is known, and throughput ``<unit>_per_s`` on each flush's
    last row. ``eval_fn(params) -> {"loss": ..., ...}`` runs every ``eval_every`` steps and, unless
    ``final_eval_fn`` is given (periodic evaluations on a sample, the last one on everything), at
    the end; it gets one-device params.

    A resumed run continues from the newest intact checkpoint (params, optimiser, step, RNG and
    data position), so it ends exactly where an uninterrupted one would; damaged newer steps are
    renamed ``damaged-<step>`` and their steps trained again. Without a checkpoint to resume from
    it is an error; without ``resume``, an ``out_dir`` that already holds checkpoints is refused.

    Nothing is lost: a NaN/Inf loss raises ``TrainingDiverged``, and so does a non-finite value in
    the state about to be saved, so the last checkpoint is always good. SIGINT/SIGTERM stop after
    the current step, save it, write ``summary.json`` with ``"status": "interrupted"`` and raise
    ``TrainingInterrupted``. A checkpoint that cannot be written raises ``CheckpointWriteError``
    with the earlier ones intact.

    ``strategy`` (``jaxllm.training.parallel``; default: the one ``train_step`` was built by, if
    any) runs the steps on its devices: ``state`` comes in and goes out on one device, is placed
    onto the devices after any restore, and gathered back for every evaluation and checkpoint (so
    checkpoints do not depend on the device count).
    """
    run_config = config.run_config
    if schedule is None and isinstance((run_config or {}).get("optimizer"), dict):
        schedule = make_schedule(OptimizerConfig(**run_config["optimizer"]))
    strategy = strategy if strategy is not None else getattr(train_step, "strategy", None)
    if (config.steps is None) == (config.epochs is None):
        raise ValueError("pass exactly one of steps= or epochs=")
    total = config.steps if config.steps is not None else config.epochs * train_data.steps_per_epoch
    if total < 1:
        raise ValueError(f"nothing to train: {total} steps")
    if jax.process_count() > 1 and getattr(strategy, "batch_sharding", None) is None:
        raise ValueError(f"this job trains on one device ({getattr(strategy, 'name', 'no strategy')}); run it as one "
                         f"process, not {jax.process_count()}")
    if jax.process_count() > 1 and not isinstance(train_data, distributed.ProcessBatches):
        train_data = distributed.ProcessBatches(train_data, strategy.batch_sharding)  # this process's rows only
    took_lock = lock_run_dir(config.out_dir)
    try:
        return _fit(state, train_step, train_data, config, total=total, eval_fn=eval_fn,
                    final_eval_fn=final_eval_fn or eval_fn, strategy=strategy, schedule=schedule)
    finally:
        if took_lock:
            unlock_run_dir(config.out_dir)


def _fit(state, train_step, train_data, config: FitConfig, *, total, eval_fn, final_eval_fn, strategy,
         schedule) -> TrainState:
    place = strategy.place if strategy is not None else (lambda s: s)
    gather = strategy.gather if strategy is not None else (lambda s: s)
    out_dir = config.out_dir
    run = _RunFiles(out_dir, Checkpointer(os.path.join(out_dir, "checkpoints"), keep=config.keep,
                                          config=config.run_config))
    try:
        state, start = run.begin(state, train_data, resume=config.resume, total=total, place=place,
                                 flags=config.flags)
    except Exception:
        run.checkpointer.close()
        raise
    if start == total:  # resuming a finished run: nothing to train, keep what it measured
        run.checkpointer.close()
        state = gather(state)  # several processes restored it onto their devices
        fields = {"status": "finished", "steps": total, "last_checkpoint": run.last_saved}
        if eval_fn is not None:
            fields["eval"] = {k: float(v) for k, v in final_eval_fn(state.params).items()}
        update_json(run.summary_path, fields)
        return state

    bar = tqdm(total=total, initial=start, disable=not config.progress or not is_first_process(), unit="step",
               dynamic_ncols=True, desc=config.title or None)
    run.bar = bar
    evaluation = EvaluationHook(eval_fn, final_eval_fn, config.eval_every, record=lambda rows: metrics.record(rows))
    diverged = lambda step: run.stopped("diverged", diverged_at_step=step)  # noqa: E731
    checkpoints = CheckpointHook(run.checkpointer, config.checkpoint_every or total, evaluation, train_data.state_dict,
                                 run.last_saved, on_diverged=diverged)
    metrics = MetricsHook(run.log, run.events, bar, log_every=config.log_every, schedule=schedule, unit=config.unit,
                          units_per_batch=config.units_per_batch or train_data.batch_size, train_step=train_step,
                          flush_when=lambda info: evaluation.due(info) or checkpoints.due(info),
                          on_diverged=diverged,
                          last_saved=lambda: checkpoints.last_saved, start=start,
                          aside=lambda: evaluation.seconds_aside + checkpoints.seconds_aside)
    run.checkpoints = checkpoints
    hooks = (metrics, evaluation, checkpoints)
    try:
        state = _train(place(state), train_step, train_data, start=start, total=total, hooks=hooks, gather=gather,
                       decide=lambda step, signum: _decide(step, config.log_every, signum=signum,
                                                           clock=checkpoints.clock_due(config.checkpoint_minutes)),
                       interrupted=run.interrupted)
        elapsed = metrics.elapsed()  # the training alone: not the plot and files written at the end
    finally:
        run.end(config.title)
    timed_steps = total - metrics.start_timed
    write_json(run.summary_path, {
        "status": "finished",
        "steps": total,
        "resumed_from": start or None,
        "final_loss": metrics.last.get("loss"),
        "eval": evaluation.last or None,
        "first_step_s": metrics.first_step_s,
        "steps_per_s": timed_steps / elapsed if timed_steps > 0 else None,
        f"{config.unit}_per_s": timed_steps * metrics.units_per_batch / elapsed if timed_steps > 0 else None,
        "last_checkpoint": checkpoints.last_saved,
        "parallel": None if strategy is None else {"strategy": strategy.name, "devices": strategy.num_devices},
    })
    return gather(state)


def _train(state, train_step, train_data, *, start: int, total: int, hooks, gather, decide, interrupted):
    """The loop: a step, then every hook that is due after it. ``decide(step, signum)`` gives
    ``(the signal to stop on now or 0, whether the clock asks for a checkpoint)``;
    ``interrupted(signum, step)`` is the exception that ends the run on a signal."""
    step = start
    with _StopRequests() as stop:
        try:
            for step in range(start + 1, total + 1):
                state, metrics = train_step(state, train_data.next())
                stopping, clock_due = decide(step, stop.signum or 0)
                info = StepInfo(step, step == total, state, metrics, stopping, clock_due, gather)
                for hook in [hook for hook in hooks if hook.due(info)]:
                    hook.timed(info)
                if stopping:
                    raise interrupted(stopping, step)
        except KeyboardInterrupt:  # a second signal, or a Ctrl-C outside the handler's reach: keep what is saved
            raise interrupted(stop.signum or signal.SIGINT, step) from None
    return state


class _RunFiles:
    """What ``fit`` writes in ``out_dir`` besides the hooks' own: the start of a run (fresh or
    resumed), ``summary.json`` when it stops early, the plot and the event file at its end."""

    def __init__(self, out_dir, checkpointer: Checkpointer):
        self.out_dir, self.checkpointer = os.fspath(out_dir), checkpointer
        self.log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
        self.summary_path = os.path.join(out_dir, "summary.json")
        self.events = None
        self.last_saved: int | None = None
        self.bar = None
        self.checkpoints: CheckpointHook | None = None

    def begin(self, state, train_data, *, resume: bool, total: int, place, flags) -> tuple[Any, int]:
        """The state and the step to start from: a fresh run, or the newest intact checkpoint."""
        ckpt, start, self.total = self.checkpointer, 0, total
        existing = ckpt.latest_step()
        if existing is not None and not resume:
            raise ValueError(f"{self.out_dir} already holds checkpoints up to step {existing}: pass resume=True "
                             "(--resume) to continue that run, or choose a new output directory")
        if resume and existing is None:
            raise ValueError(f"nothing to resume: {ckpt.directory} holds no checkpoint (run without --resume "
                             "to start this run afresh)")
        if resume:
            # several processes restore straight into the devices' layout (any process/device count)
            state, meta = ckpt.restore(place(state) if jax.process_count() > 1 else state)
            start = int(state.step)
            if is_first_process():
                for moved in ckpt.set_aside(newer_than=start):
                    print(f"warning: set aside {moved}; resuming from step {start}", file=sys.stderr, flush=True)
            distributed.barrier("resume: newer steps set aside")
            ckpt.reload()
            train_data.load_state_dict(meta["data"])
            note = extension_note(meta.get("config"), start, total)
            if note and is_first_process():
                print(note, flush=True)
            self.log.truncate_after(start)
            self.last_saved = start
        elif os.path.exists(self.log.path) and is_first_process():
            os.remove(self.log.path)  # nothing to continue from: a fresh run starts a fresh log
        if start > total:
            raise ValueError(f"the checkpoint is at step {start}, beyond the {total} steps asked for")
        if flags is not None:
            write_flags(self.out_dir, flags)
        # a fresh run drops earlier event files; a finished run resumed writes nothing new
        self.events = open_event_log(self.out_dir, resumed_at=start if resume else None) if start < total else None
        if self.events is not None and flags is not None and not resume:
            self.events.hparams(flags)
        return state, start

    def stopped(self, status: str, **fields) -> None:
        self.bar.close()
        last = self.checkpoints.last_saved if self.checkpoints is not None else self.last_saved
        write_json(self.summary_path, {"status": status, "steps": self.total, "last_checkpoint": last, **fields})

    def interrupted(self, signum: int, step: int) -> "TrainingInterrupted":
        self.stopped("interrupted", interrupted_at_step=step, signal=signal.Signals(signum).name)
        return TrainingInterrupted(signum, step, self.checkpoints.last_saved)

    def end(self, title: str) -> None:
        self.bar.close()
        png = os.path.join(self.out_dir, "loss.png")
        _quietly(png, lambda: _plot(self.log, png, title))
        if self.events is not None:
            _quietly(self.events.path, self.events.close)
        self.checkpointer.close()


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
