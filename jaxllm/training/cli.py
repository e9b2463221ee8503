"""Flags every training script shares, and a ``main`` wrapper that turns known errors into one line."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Callable, Sequence

from jaxllm.training.optim import OPTIMIZERS, SCHEDULES, OptimizerConfig
from jaxllm.training.parallel import STRATEGIES, Strategy, make_strategy
from jaxllm.training.run_lock import lock_run_dir
from jaxllm.training.tensorboard import event_files


# --- typed flag values -----------------------------------------------------------------------
# argparse ``type=`` validators: a bad value is refused while the flags are parsed, before any data
# is read or anything written, as ``argument --steps: must be >= 1, got 0`` (exit 2). Every numeric
# flag of every script uses one of these.

def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = f"integer {bound}"  # argparse's fallback wording names the type
    return parse


def float_in(low: float, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """A finite number above ``low`` (``low_open``: strictly) and, with ``high``, below it
    (``high_open``: strictly). NaN and infinities are refused."""
    if high is None:
        bound = f"{'>' if low_open else '>='} {low:g}"
    else:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        if (value <= low if low_open else value < low) or (
                high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = f"number {bound}"
    return parse


positive_int = int_in(1)  # epochs, steps, batch sizes, every-N, keep, sizes, context, stride, tokens
non_negative_int = int_in(0)  # seeds, warmup steps, a checkpoint step
positive_float = float_in(0.0, low_open=True)  # learning rate, clip norm, LoRA alpha, peak FLOP/s
non_negative_float = float_in(0.0)  # weight decay, temperature
fraction_below_1 = float_in(0.0, 1.0, high_open=True)  # [0, 1): dropout, momentum
positive_fraction = float_in(0.0, 1.0, low_open=True)  # (0, 1]: top-p, a discount
# train_bpe's minimum: the 256 byte tokens + <|endoftext|>
BPE_MIN_VOCAB = 257
bpe_vocab_size = int_in(BPE_MIN_VOCAB)


def int_list(low: int = 1) -> Callable[[str], list[int]]:
    """Comma-separated integers, each ``>= low`` (e.g. ``--devices 1,2,4``)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes comma-separated integers, got {text!r}") from None
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(f"needs integers >= {low}, got {text!r}")
        return values

    parse.__name__ = f"comma-separated integers >= {low}"
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' one-line errors: a refused flag prints ``error: argument --steps:
    must be >= 1, got 0 (see lm.py --help)`` and exits 2, the form ``run`` gives errors found later
    (the full usage stays in ``--help`` rather than burying the line that matters).

    Every job that compiles gets ``--no-compile-cache``: parsing turns on JAX's persistent
    compilation cache (``jaxllm.compile_cache``) unless the flag is given, so a second run of the
    same job skips most of its compile time. ``compile_cache=False`` for a job that compiles nothing."""

    def __init__(self, *args, compile_cache: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.compile_cache = compile_cache
        if compile_cache:
            self.add_argument("--no-compile-cache", action="store_true",
                              help="compile from scratch: do not read or write JAX's persistent compilation cache "
                                   "($JAXLLM_COMPILATION_CACHE, default ~/.cache/jaxllm/xla)")

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if self.compile_cache:
            from jaxllm import compile_cache

            compile_cache.enable(not parsed.no_compile_cache)
        if hasattr(parsed, "cpu_devices"):  # a job with --parallel: its CPU devices, before JAX starts
            from jaxllm import cpu_devices

            cpu_devices.request(parsed.cpu_devices, per_core=parsed.split_cpu)
        return parsed, rest

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def make_parser(description: str, *, out: str, epochs: int, lr: float, optimizer: str = "adamw",
                batch_size: int | None = None, weight_decay: float = 0.0, momentum: float = 0.0,
                log_every: int = 10, precision: bool = True, split_cpu: bool = True) -> argparse.ArgumentParser:
    """The shared flags. ``precision=False`` leaves out ``--dtype``/``--remat`` for a script that
    cannot honour them (better no flag than one silently ignored). ``split_cpu=False``: on a CPU the
    job defaults to one device (a model so small that splitting its batch costs more than it saves)."""
    p = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=out, help="output directory (metrics.jsonl, summary.json, loss.png, checkpoints/)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for init, data order and splits")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the training set")
    length.add_argument("--steps", type=positive_int, default=None, help="optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="rows per step (default: full batch)"
                   if batch_size is None else "rows per step")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=optimizer)
    p.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=non_negative_float, default=weight_decay,
                   help="decoupled for adamw, L2 added to the gradient for sgd/adam")
    p.add_argument("--momentum", type=fraction_below_1, default=momentum, help="sgd momentum, in [0, 1)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0,
                   help="linear warmup from 0 to --lr; at most the run's steps - 1 (longer is clamped, with a note)")
    p.add_argument("--clip-norm", type=positive_float, default=None, help="clip gradients to this global norm")
    p.add_argument("--eval-every", type=positive_int, default=None, help="evaluate every N steps (and at the end)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None,
                   help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous run's outputs in --out first (otherwise they are kept and the run refused)")
    p.add_argument("--log-every", type=positive_int, default=log_every, help="fetch and log metrics every N steps")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_parallel_flags(p, precision=precision, split_cpu=split_cpu)
    return p


PARALLEL_CHOICES = ("auto", *STRATEGIES)
DTYPES = ("float32", "bfloat16")


def add_parallel_flags(p: argparse.ArgumentParser, *, precision: bool = True, split_cpu: bool = True) -> None:
    """``--parallel``, ``--cpu-devices``, ``--accum-steps`` (jaxllm.training.parallel) and, with
    ``precision``, ``--dtype`` (jaxllm.training.precision) and ``--remat`` (the transformer configs'
    flag). ``split_cpu``: on a CPU, default to one device per core (else one device)."""
    g = p.add_argument_group("devices and memory")
    p.set_defaults(split_cpu=split_cpu)
    g.add_argument("--parallel", choices=PARALLEL_CHOICES, default="auto",
                   help="device strategy: single | sharded (jit + NamedSharding, batch split, params replicated) "
                        "| fsdp (params and optimiser state split too) | shard_map (per-device code, explicit "
                        "psum) | pmap (classic, maintenance mode); auto = sharded on several devices, else single")
    g.add_argument("--cpu-devices", type=positive_int, default=None,
                   help="on a CPU: JAX host devices to split the batch over (default $JAXLLM_CPU_DEVICES, else "
                        + ("one per core" if split_cpu else "1") + ", what measured fastest for this job)")
    g.add_argument("--accum-steps", type=positive_int, default=1,
                   help="split each batch (--batch-size is the global batch per optimiser step) into this many "
                        "micro-batches and accumulate their gradients: the same update, 1/k the activation memory")
    if not precision:
        return
    g.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype: bfloat16 = bf16 activations and matmuls, fp32 master weights and optimiser")
    g.add_argument("--remat", action="store_true", help="recompute transformer blocks in the backward pass")


def strategy(args, *, devices=None) -> Strategy:
    """The ``--parallel`` strategy (``auto``: sharded on several devices, else single); checks now,
    before any work, that ``--batch-size`` divides by the devices x ``--accum-steps``."""
    if args.accum_steps < 1:
        raise ValueError(f"--accum-steps must be >= 1, got {args.accum_steps}")
    rows = getattr(args, "batch_size", None)
    if args.parallel == "auto" and rows:
        devices = _devices_dividing(rows, args.accum_steps, devices)
    chosen = make_strategy(None if args.parallel == "auto" else args.parallel, devices=devices)
    if rows:
        chosen.check_rows(rows, args.accum_steps)
    return chosen


def _devices_dividing(rows: int, accum_steps: int, devices=None) -> list:
    """``auto``: the most devices (of ``devices``, default all) whose count times ``accum_steps``
    divides the batch, saying so when that is not all of them."""
    import jax

    devices = list(devices if devices is not None else jax.devices())
    n = next((n for n in range(len(devices), 0, -1) if rows % (n * accum_steps) == 0), 1)
    if n < len(devices):
        print(f"note: --batch-size {rows} does not split over {len(devices)} devices x --accum-steps {accum_steps}: "
              f"training on {n} device(s)", flush=True)
    return devices[:n]


def parallel_kwargs(args) -> dict:
    """``strategy`` and ``accum_steps`` for ``train_supervised`` (or any builder of a train step)."""
    return {"strategy": strategy(args), "accum_steps": args.accum_steps}


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "loss.png", "baseline", "tokenizer.json", "sample.txt",
               "test_responses.json")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Parse flags and claim ``--out`` before any work: it must be a writable directory that no
    other live run holds (its run lock is taken here); with ``--overwrite``, remove only the files
    a previous run wrote there; ``--resume`` needs a checkpoint to resume from."""
    args = parser.parse_args(argv)
    if args.overwrite and args.resume:
        parser.error("--overwrite and --resume contradict each other")
    lock_run_dir(args.out)  # before deleting anything: a live run's files are not ours to remove
    checkpoints = os.path.join(args.out, "checkpoints")
    if args.overwrite:
        for path in [os.path.join(args.out, name) for name in RUN_OUTPUTS] + event_files(args.out):
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif args.resume and not _has_checkpoints(checkpoints):
        raise ValueError(f"--resume: there is no checkpoint to resume from in {checkpoints} "
                         "(run without --resume to start afresh)")
    elif not args.resume and _has_checkpoints(checkpoints):
        # refuse before any work (or any file written), not only when fit() starts
        raise ValueError(f"{args.out} already holds checkpoints: pass --resume to continue that run, "
                         "--overwrite to replace it, or choose a new --out")
    return args


def _has_checkpoints(directory: str) -> bool:
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def total_steps(args, steps_per_epoch: int) -> int:
    return args.steps if args.steps is not None else args.epochs * steps_per_epoch


def optimizer_config(args, total: int) -> OptimizerConfig:
    """The run's optimiser. ``total_steps`` only matters to a decaying schedule; leaving it out of a
    constant one lets ``--resume --steps N`` extend such a run (the config is checked on resume).

    A warmup as long as the run or longer (the scripts' default warmup on a short ``--steps`` run)
    is not an error: it is clamped to ``total - 1`` steps, so the last step trains at the peak
    ``--lr`` (and a cosine decay keeps at least one step), and one ``note:`` line says so. With
    ``--epochs`` the total is known only after the data is prepared, hence here."""
    if total < 1 and args.schedule != "constant":
        raise ValueError(f"--schedule {args.schedule} needs the run's length, but the run has {total} steps "
                         "(is --batch-size larger than the training set?)")
    warmup = clamp_warmup(args.warmup_steps, total)
    return OptimizerConfig(
        name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        schedule=args.schedule, warmup_steps=warmup, clip_norm=args.clip_norm,
        total_steps=total if args.schedule != "constant" else None,
    )


def clamp_warmup(warmup: int, total: int) -> int:
    """``warmup`` or, when the run (``total`` steps) is not longer than it, ``total - 1`` with a note."""
    if warmup and total >= 1 and warmup >= total:
        print(f"note: --warmup-steps {warmup} clamped to {total - 1} (the run has {total} step"
              f"{'s' if total != 1 else ''})")
        return total - 1
    return warmup



def fit_kwargs(args, *, steps_per_epoch: int | None = None) -> dict:
    """The ``fit()`` keyword arguments that come from the shared flags (eval defaults to once an epoch)."""
    return dict(
        eval_every=args.eval_every or steps_per_epoch, checkpoint_every=args.checkpoint_every, keep=args.keep,
        resume=args.resume, log_every=args.log_every, progress=not args.no_progress,
    )


def length_kwargs(args) -> dict:
    return {"steps": args.steps} if args.steps is not None else {"epochs": args.epochs}


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main`` as a command: bad input, missing data, divergence or a file that
    cannot be written exits 2 with one ``error:`` line; SIGINT/SIGTERM exit 130/143 with one line
    saying how to resume; never a traceback for these."""
    import signal

    from jaxllm.data.tabular import DataUnavailable
    from jaxllm.training.loop import TrainingDiverged, TrainingInterrupted

    def terminate(signum, frame):  # outside training (which saves first), SIGTERM ends quietly
        raise _Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        main(argv)
    except (ValueError, DataUnavailable, TrainingDiverged, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as exc:
        resume = (f"resume with: {resume_command(argv)}" if exc.last_checkpoint is not None
                  else "no checkpoint yet: run the same command again to start over")
        print(f"interrupted: {exc}; {resume}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        print("interrupted outside the training loop: checkpoints already written are kept", file=sys.stderr)
        sys.exit(143 if isinstance(exc, _Terminated) else 130)


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop."""


def resume_command(argv: Sequence[str] | None = None) -> str:
    """The command line that continues this run: the same flags, ``--overwrite`` dropped, ``--resume`` added."""
    import shlex

    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", sys.argv[0], *args])
