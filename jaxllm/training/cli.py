"""Flags every training script shares, and a ``main`` wrapper that turns known errors into one line."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Callable, Sequence

from jaxllm.training.optim import OPTIMIZERS, SCHEDULES, OptimizerConfig
from jaxllm.training.parallel import STRATEGIES, Strategy, make_strategy


def make_parser(description: str, *, out: str, epochs: int, lr: float, optimizer: str = "adamw",
                batch_size: int | None = None, weight_decay: float = 0.0, momentum: float = 0.0,
                log_every: int = 10, precision: bool = True) -> argparse.ArgumentParser:
    """The shared flags. ``precision=False`` leaves out ``--dtype``/``--remat`` for a script that
    cannot honour them (better no flag than one silently ignored)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=out, help="output directory (metrics.jsonl, summary.json, loss.png, checkpoints/)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and splits")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=epochs, help="passes over the training set")
    length.add_argument("--steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="rows per step (default: full batch)"
                   if batch_size is None else "rows per step")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=optimizer)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=weight_decay,
                   help="decoupled for adamw, L2 added to the gradient for sgd/adam")
    p.add_argument("--momentum", type=float, default=momentum, help="sgd momentum")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--clip-norm", type=float, default=None, help="clip gradients to this global norm")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (and at the end)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous run's outputs in --out first (otherwise they are kept and the run refused)")
    p.add_argument("--log-every", type=int, default=log_every, help="fetch and log metrics every N steps")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_parallel_flags(p, precision=precision)
    return p


PARALLEL_CHOICES = ("auto", *STRATEGIES)
DTYPES = ("float32", "bfloat16")


def add_parallel_flags(p: argparse.ArgumentParser, *, precision: bool = True) -> None:
    """``--parallel``, ``--accum-steps`` (jaxllm.training.parallel) and, with ``precision``,
    ``--dtype`` (jaxllm.training.precision) and ``--remat`` (the transformer configs' flag)."""
    g = p.add_argument_group("devices and memory")
    g.add_argument("--parallel", choices=PARALLEL_CHOICES, default="auto",
                   help="device strategy: single | sharded (jit + NamedSharding, batch split, params replicated) "
                        "| fsdp (params and optimiser state split too) | shard_map (per-device code, explicit "
                        "psum) | pmap (classic, maintenance mode); auto = sharded on several devices, else single")
    g.add_argument("--accum-steps", type=int, default=1,
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
    chosen = make_strategy(None if args.parallel == "auto" else args.parallel, devices=devices)
    if getattr(args, "batch_size", None):
        chosen.check_rows(args.batch_size, args.accum_steps)
    return chosen


def parallel_kwargs(args) -> dict:
    """``strategy`` and ``accum_steps`` for ``train_supervised`` (or any builder of a train step)."""
    return {"strategy": strategy(args), "accum_steps": args.accum_steps}


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "loss.png", "baseline", "tokenizer.json", "sample.txt",
               "test_responses.json")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Parse flags; with ``--overwrite``, remove only the files a previous run wrote in ``--out``."""
    args = parser.parse_args(argv)
    if args.overwrite and args.resume:
        parser.error("--overwrite and --resume contradict each other")
    if args.overwrite:
        for name in RUN_OUTPUTS:
            path = os.path.join(args.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif not args.resume and _has_checkpoints(os.path.join(args.out, "checkpoints")):
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
    constant one lets ``--resume --steps N`` extend such a run (the config is checked on resume)."""
    return OptimizerConfig(
        name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        schedule=args.schedule, warmup_steps=args.warmup_steps, clip_norm=args.clip_norm,
        total_steps=total if args.schedule != "constant" else None,
    )



def fit_kwargs(args, *, steps_per_epoch: int | None = None) -> dict:
    """The ``fit()`` keyword arguments that come from the shared flags (eval defaults to once an epoch)."""
    return dict(
        eval_every=args.eval_every or steps_per_epoch, checkpoint_every=args.checkpoint_every, keep=args.keep,
        resume=args.resume, log_every=args.log_every, progress=not args.no_progress,
    )


def length_kwargs(args) -> dict:
    return {"steps": args.steps} if args.steps is not None else {"epochs": args.epochs}


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main``; bad input, missing data or divergence exits 2 with one clear line."""
    from jaxllm.data.tabular import DataUnavailable
    from jaxllm.training.loop import TrainingDiverged

    try:
        main(argv)
    except (ValueError, DataUnavailable, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
