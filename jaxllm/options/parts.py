"""The parts a job's config is made of: run, optimiser, evaluation, devices, multi-host, text and
sampling settings. Each is a frozen dataclass of flags (``jaxllm.options.spec``) shown as one
``--help`` section, with what turns it into the objects training uses (``Optim.build``,
``Devices.strategy``, ``fit_config``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

from jaxllm.data.lm_data import TOKENIZERS
from jaxllm.options.spec import file_values, option
from jaxllm.options.values import (absolute_path, bpe_vocab_size, fraction_below_1, non_negative_float,
                                   non_negative_int, positive_float, positive_fraction, positive_int)
from jaxllm.training import FitConfig, distributed
from jaxllm.training.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from jaxllm.training.optim import DEFAULT_WARMUP, OPTIMIZERS, SCHEDULES, OptimizerConfig, default_warmup
from jaxllm.training.parallel import STRATEGIES, Strategy, make_strategy

part = dataclasses.dataclass(frozen=True)


@part
class Compilation:
    SECTION: ClassVar[str] = "run"
    no_compile_cache: bool = option(False, "compile from scratch: do not read or write JAX's persistent compilation "
                                           "cache ($JAXLLM_COMPILATION_CACHE, default ~/.cache/jaxllm/xla)")


@part
class Run:
    """Where a run writes, how long it trains, when it logs and checkpoints."""

    SECTION: ClassVar[str] = "run"
    compilation: Compilation = Compilation()
    out: str = option("runs/run", "output directory (config.yaml, metrics.jsonl, summary.json, loss.png, checkpoints/)",
                      command_line_only=True)
    config: str | None = option(None, "a YAML file of flags (a run's config.yaml; keys are the long flag names) read "
                                      "as the defaults; flags given here override it", metavar="FILE",
                                command_line_only=True)
    seed: int = option(0, "seed for init, data order and splits", type=non_negative_int)
    epochs: int | None = option(1, "passes over the training set", type=positive_int, exclusive="length")
    steps: int | None = option(None, "optimiser steps (overrides --epochs)", type=positive_int, exclusive="length")
    resume: bool = option(False, "continue from the latest checkpoint in --out, with the flags of its config.yaml "
                                 "(flags given here override them)", command_line_only=True)
    accept_data_change: bool = option(False, "--resume: continue although the data differs from what the run "
                                             "recorded (the change is recorded in run.json)", command_line_only=True)
    overwrite: bool = option(False, "delete a previous run's outputs in --out first (otherwise they are kept and "
                                    "the run refused)", command_line_only=True)
    checkpoint_every: int | None = option(None, "checkpoint every N steps (always: at every evaluation, at the end, "
                                                "on Ctrl-C/SIGTERM)", type=positive_int)
    checkpoint_minutes: float = option(5.0, "also checkpoint once this many minutes have passed since the last "
                                            "checkpoint, checked every --log-every steps (0: never for that reason)",
                                       type=non_negative_float)
    keep: int = option(3, "checkpoints to keep", type=positive_int)
    log_every: int = option(10, "fetch the step metrics from the device every N steps (each step still gets its "
                                "row in metrics.jsonl); fewer fetches keep the device busier", type=positive_int)
    no_progress: bool = option(False, "hide the progress bar")

    def __post_init__(self):
        if self.overwrite and self.resume:
            raise ValueError("--overwrite and --resume contradict each other")

    def length(self) -> dict:
        """``fit``'s run length: ``{"steps": N}`` or ``{"epochs": N}``."""
        return {"steps": self.steps} if self.steps is not None else {"epochs": self.epochs}

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch


@part
class Optim:
    SECTION: ClassVar[str] = "optimiser"
    batch_size: int | None = option(None, "rows per step", type=positive_int)
    optimizer: str = option("adamw", "the optax optimiser", choices=OPTIMIZERS)
    lr: float | None = option(1e-3, "peak learning rate", type=positive_float)
    weight_decay: float = option(0.0, "decoupled for adamw, L2 added to the gradient for sgd/adam",
                                 type=non_negative_float)
    momentum: float = option(0.0, "sgd momentum, in [0, 1)", type=fraction_below_1)
    muon_lr: float = option(0.02, "muon: peak learning rate of the blocks' matrices (--lr is AdamW's, for the rest)",
                            type=positive_float)
    schedule: str | None = option("constant", "learning rate over the run: constant; warmup_cosine: linear warmup "
                                              "then cosine decay to 0; wsd: warmup, stable, then linear decay to 0 "
                                              "over the last --decay-fraction", choices=SCHEDULES)
    warmup_steps: int | None = option(None, "linear warmup from 0 to --lr (default: none for a constant rate, else a "
                                            f"tenth of the run, at most {DEFAULT_WARMUP}); at most the run's steps - 1 "
                                            "(longer is clamped, with a note)", type=non_negative_int)
    decay_fraction: float = option(0.2, "wsd: the last fraction of the run, decaying to 0", type=positive_fraction)
    clip_norm: float | None = option(None, "clip gradients to this global norm", type=positive_float)

    def build(self, total: int, *, muon_blocks: Sequence[str] = ()) -> OptimizerConfig:
        """The run's optimiser. ``total`` only matters to a decaying schedule; leaving it out of a
        constant one lets ``--resume --steps N`` extend such a run (the config is checked on resume).

        Without ``--warmup-steps`` the warmup is ``default_warmup``'s: none under a constant rate,
        else a tenth of the run (at most 100 steps), so a short run still decays. An asked-for warmup
        as long as the run or longer is not an error: it is clamped to ``total - 1`` steps with one
        ``note:`` line. ``muon_blocks``: the
        top-level param names whose matrices ``--optimizer muon`` trains (empty: every 2-D param)."""
        if total < 1 and self.schedule != "constant":
            raise ValueError(f"--schedule {self.schedule} needs the run's length, but the run has {total} steps "
                             "(is --batch-size larger than the training set?)")
        warmup = default_warmup(self.schedule, total) if self.warmup_steps is None else self.warmup_steps
        return OptimizerConfig(
            name=self.optimizer, lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum,
            schedule=self.schedule, warmup_steps=clamp_warmup(warmup, total), clip_norm=self.clip_norm,
            total_steps=total if self.schedule != "constant" else None,
            **({"decay_fraction": self.decay_fraction} if self.schedule == "wsd" else {}),
            **({"muon_lr": self.muon_lr, "muon_blocks": tuple(muon_blocks)} if self.optimizer == "muon" else {}))


def clamp_warmup(warmup: int, total: int) -> int:
    """``warmup`` or, when the run (``total`` steps) is not longer than it, ``total - 1`` with a note."""
    if warmup and total >= 1 and warmup >= total:
        print(f"note: --warmup-steps {warmup} clamped to {total - 1} (the run has {total} step"
              f"{'s' if total != 1 else ''})")
        return total - 1
    return warmup


@part
class Evaluation:
    SECTION: ClassVar[str] = "evaluation"
    eval_every: int | None = option(None, "evaluate every N steps (and at the end)", type=positive_int)


def eval_batches_option(default: int = 50):
    """``--eval-batches``, for jobs whose held-out set is large enough that periodic evaluations
    would cost a noticeable share of the run: they score a fixed part of it; the final one all."""
    return option(default, "periodic evaluations score only the first N batches of the held-out set (the same ones "
                           "each time); the evaluation after the last step scores all of it", type=positive_int,
                  section="evaluation")


PARALLEL_CHOICES = ("auto", *STRATEGIES)
DTYPES = ("float32", "bfloat16")


@part
class Devices:
    SECTION: ClassVar[str] = "devices and memory"
    parallel: str = option("auto", "device strategy: single | sharded (jit + NamedSharding, batch split, params "
                                   "replicated) | fsdp (params and optimiser state split too) | shard_map (per-device "
                                   "code, explicit psum) | pmap (classic, maintenance mode); auto = sharded on "
                                   "several devices, else single", choices=PARALLEL_CHOICES)
    cpu_devices: int | None = option(None, "on a CPU: JAX host devices to split the batch over (default "
                                           "$JAXLLM_CPU_DEVICES, else one per core, what measured fastest for this "
                                           "job)", type=positive_int)
    accum_steps: int = option(1, "split each batch (--batch-size is the global batch per optimiser step) into this "
                                 "many micro-batches and accumulate their gradients: the same update, 1/k the "
                                 "activation memory", type=positive_int)

    def strategy(self, rows: int | None, *, devices=None) -> Strategy:
        """The ``--parallel`` strategy (``auto``: sharded on several devices, else single); checks
        now, before any work, that ``rows`` (the batch) divides by the devices x ``--accum-steps``."""
        processes = distributed.process_count()
        if processes > 1 and self.parallel in ("single", "pmap"):
            raise ValueError(f"--parallel {self.parallel} runs in one process; this run has {processes}: use "
                             "sharded, fsdp or shard_map (or auto), which span every process's devices")
        if self.parallel == "auto" and rows and processes == 1:  # several processes: every device takes part
            devices = devices_dividing(rows, self.accum_steps, devices)
        chosen = make_strategy(None if self.parallel == "auto" else self.parallel, devices=devices)
        if rows:
            chosen.check_rows(rows, self.accum_steps)
        return chosen


# the help of --cpu-devices for a job whose config sets SPLIT_CPU = False: it trains on one CPU
# device unless asked (its model is so small that splitting a batch costs more than it saves)
ONE_CPU_DEVICE = ("on a CPU: JAX host devices to split the batch over (default $JAXLLM_CPU_DEVICES, else 1, what "
                  "measured fastest for this job)")


def devices_dividing(rows: int, accum_steps: int, devices=None) -> list:
    """``auto``: the most devices (of ``devices``, default all) whose count times ``accum_steps``
    divides the batch, saying so when that is not all of them."""
    import jax

    devices = list(devices if devices is not None else jax.devices())
    n = next((n for n in range(len(devices), 0, -1) if rows % (n * accum_steps) == 0), 1)
    if n < len(devices):
        print(f"note: --batch-size {rows} does not split over {len(devices)} devices x --accum-steps {accum_steps}: "
              f"training on {n} device(s)", flush=True)
    return devices[:n]


@part
class Precision:
    SECTION: ClassVar[str] = "devices and memory"
    dtype: str = option("float32", "compute dtype: bfloat16 = bf16 activations and matmuls, fp32 master weights and "
                                   "optimiser", choices=DTYPES)
    remat: bool = option(False, "recompute transformer blocks in the backward pass")


@part
class Adapters:
    """LoRA's size, for the jobs that can train adapters (``jaxllm.nn.lora``, Raschka app. E)."""
    SECTION: ClassVar[str] = "model"
    rank: int = option(16, "LoRA rank", type=positive_int)
    alpha: float = option(16.0, "LoRA alpha (scale alpha / rank)", type=positive_float)


@part
class MultiHost:
    """Where this one process stands in a multi-host launch (``jax.distributed``): given on the
    command line only, never in a file, since a resume on other hosts does not share it."""

    SECTION: ClassVar[str] = "multi-host"
    coordinator: str | None = option(None, f"host:port of process 0, the same on every process (default "
                                           f"${ENV_COORDINATOR}; none for one process)", command_line_only=True)
    num_processes: int | None = option(None, f"processes in the run (default ${ENV_NUM_PROCESSES}, else what a "
                                             "SLURM / Open MPI / Cloud TPU / Kubernetes job says, else 1; 1 forces "
                                             "one process)", type=int, command_line_only=True)
    process_id: int | None = option(None, f"this process's id (default ${ENV_PROCESS_ID} or 0)", type=int,
                                    command_line_only=True)


@part
class TextData:
    """The text jobs' corpus (lm, rnn, ngram, prepare)."""

    SECTION: ClassVar[str] = "data"
    text: tuple[str, ...] | None = option(None, "text files, one document each, to use instead of Shakespeare's "
                                                "works", type=absolute_path, many=True, metavar="FILE")
    tokenizer: str | None = option("bpe", "bpe: a byte-level BPE trained on the training text; gpt2: GPT-2's",
                                   choices=TOKENIZERS)
    vocab_size: int | None = option(512, "size of the trained BPE (bpe tokenizer)", type=bpe_vocab_size)


@part
class Sampling:
    SECTION: ClassVar[str] = "generation"
    temperature: float | None = option(0.8, "0: greedy", type=non_negative_float)
    top_k: int = option(40, "keep the k likeliest tokens; 0: all", type=non_negative_int)
    top_p: float | None = option(None, "nucleus sampling, in (0, 1]", type=positive_fraction)


def fit_config(config: Any, *, steps_per_epoch: int | None = None, **fields) -> FitConfig:
    """``fit``'s ``FitConfig`` from a job's config: ``--out``, the length, the run part's settings
    and the config as ``config.yaml`` records it, then the job's own ``fields`` (which win)."""
    return FitConfig(**{"out_dir": config.run.out, **config.run.length(),
                        **fit_kwargs(config, steps_per_epoch=steps_per_epoch), **fields})


def fit_kwargs(config: Any, *, steps_per_epoch: int | None = None) -> dict:
    """The ``fit`` settings a job's config gives (evaluation, where the job has it: every
    ``--eval-every`` steps, default once an epoch)."""
    run, evaluation = config.run, getattr(config, "evaluation", None)
    return dict(eval_every=(evaluation.eval_every or steps_per_epoch) if evaluation else None,
                checkpoint_every=run.checkpoint_every, checkpoint_minutes=run.checkpoint_minutes or None,
                keep=run.keep, resume=run.resume, log_every=run.log_every, progress=not run.no_progress,
                flags=file_values(config))


def supervised_kwargs(config: Any, *, steps_per_epoch: int) -> dict:
    """``train_supervised``'s settings from a job's config: the optimiser for the run's length,
    ``--out``, the batch, the seed, the devices (where the job has them) and ``fit``'s settings."""
    run, optim, devices = config.run, config.optim, getattr(config, "devices", None)
    return dict(optimizer=optim.build(run.total_steps(steps_per_epoch)), out_dir=run.out, batch_size=optim.batch_size,
                seed=run.seed, **run.length(), **fit_kwargs(config, steps_per_epoch=steps_per_epoch),
                **({"strategy": devices.strategy(optim.batch_size), "accum_steps": devices.accum_steps}
                   if devices is not None else {}))
