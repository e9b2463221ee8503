"""Flags every training script shares, and a ``main`` wrapper that turns known errors into one line."""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
import shutil
import sys
import traceback
from typing import Callable, Sequence

from jaxllm import orbax_noise
from jaxllm.training import FitConfig, distributed, run_flags
from jaxllm.training.optim import OPTIMIZERS, SCHEDULES, OptimizerConfig
from jaxllm.training.parallel import STRATEGIES, Strategy, make_strategy
from jaxllm import runio


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
def absolute_path(text: str) -> str:
    """A file or directory flag: stored absolute, so a run resumes from any working directory."""
    return os.path.abspath(os.path.expanduser(text))


absolute_path.__name__ = "path"

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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help``: the job's docstring as written, and every flag's default after its help, also
    for a flag without help text (not a switch's: it is off unless given; nor where the help
    already says what the default means)."""

    def _format_action(self, action):
        if action.help is None and action.option_strings and action.nargs != 0:
            action = copy.copy(action)  # argparse prints no help line at all for help=None
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if action.nargs == 0 or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# the sections of --help, in this order (argparse shows none that is empty)
GROUPS = ("model", "data", "optimiser", "evaluation", "run", "devices and memory", "multi-host")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' one-line errors: a refused flag prints ``error: argument --steps:
    must be >= 1, got 0 (see lm.py --help)`` and exits 2, the form ``run`` gives errors found later
    (the full usage stays in ``--help`` rather than burying the line that matters). ``--help`` is
    laid out by ``HelpFormatter`` in the sections ``GROUPS`` (``group(title)``).

    Every job that compiles gets ``--no-compile-cache``: parsing turns on JAX's persistent
    compilation cache (``jaxllm.compile_cache``) unless the flag is given, so a second run of the
    same job skips most of its compile time. ``compile_cache=False`` for a job that compiles nothing."""

    def __init__(self, *args, compile_cache: bool = True, **kwargs):
        if _command is not None:
            kwargs.setdefault("prog", _command)
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --step is not --steps: a flag is spelled out or refused
        super().__init__(*args, **kwargs)
        self._groups = {title: self.add_argument_group(title) for title in GROUPS}
        self.compile_cache = compile_cache
        if compile_cache:
            self.group("run").add_argument(
                "--no-compile-cache", action="store_true",
                help="compile from scratch: do not read or write JAX's persistent compilation cache "
                     "($JAXLLM_COMPILATION_CACHE, default ~/.cache/jaxllm/xla)")

    def group(self, title: str):
        """The ``--help`` section ``title`` (one of ``GROUPS``), to add flags to."""
        return self._groups[title]

    def reword(self, **helps: str) -> None:
        """New help for shared flags, by dest: ``reword(lr="... (default: per --mode)")`` where a
        job resolves the default itself (a help that says ``(default`` gets no other)."""
        for dest, text in helps.items():
            next(a for a in self._actions if a.dest == dest).help = text

    def arrange(self, **sections: Sequence[str]) -> None:
        """Move flags already added into ``--help`` sections: ``arrange(model=["--layers"], ...)``
        (a job's own flags, listed after they are defined)."""
        for title, flags in sections.items():
            for flag in flags:
                action = self._option_string_actions[flag]
                for group in self._action_groups:
                    if action in group._group_actions:
                        group._group_actions.remove(action)
                self.group(title)._group_actions.append(action)

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if self.compile_cache:
            from jaxllm import compile_cache

            compile_cache.enable(not parsed.no_compile_cache)
        if hasattr(parsed, "cpu_devices"):  # a job with --parallel: its CPU devices, before JAX starts
            from jaxllm import cpu_devices

            cpu_devices.request(parsed.cpu_devices, per_core=parsed.split_cpu)
        if hasattr(parsed, "num_processes"):  # a training job: join a multi-host run, before JAX starts
            distributed.initialize_from_args(parsed)
        return parsed, rest

    def error(self, message: str):
        self.exit(2, f"error: {message}{self._closest_flags(message)} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        """Plain text: the docstrings' and helps' reStructuredText quotes dropped."""
        return super().format_help().replace("``", "").replace("`", "")

    def _closest_flags(self, message: str) -> str:
        """`` (did you mean --steps?)`` for an unrecognized flag close to one of this parser's."""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = [c.strip().strip("'") for c in choice.group(2).split(",")]
            match = difflib.get_close_matches(choice.group(1), options, 1, 0.6)
            return f" (did you mean {match[0]}?)" if match else ""
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if not unknown:
            return ""
        known = sorted(set(re.findall(r"--[\w-]+", self.format_usage())))
        hints = [m[0] for arg in unknown.group(1).split() if arg.startswith("--")
                 if (m := difflib.get_close_matches(arg.split("=")[0], known, 1, 0.6))]
        return f" (did you mean {', '.join(hints)}?)" if hints else ""


def make_parser(description: str, *, job: str, epochs: int, lr: float, optimizer: str = "adamw",
                batch_size: int | None = None, weight_decay: float = 0.0, momentum: float = 0.0,
                log_every: int = 10, precision: bool = True, parallel: bool = True, evaluation: bool = True,
                split_cpu: bool = True) -> ArgumentParser:
    """The shared flags of a training job (``job``: its module's name in ``jaxllm.jobs``, which
    names its presets, ``jaxllm/configs/<job>/``, and its default ``--out runs/<job>``). A job gets
    only the flags it honours (better no flag than one silently ignored): ``precision=False`` leaves
    out ``--dtype``/``--remat``, ``parallel=False`` every device flag (a job that trains on one
    device), ``evaluation=False`` ``--eval-every`` (a job with no held-out set). ``split_cpu=False``:
    on a CPU the job defaults to one device (a model so small that splitting its batch costs more
    than it saves)."""
    p = ArgumentParser(description=description)
    p.job = job
    run = p.group("run")
    run.add_argument("--out", default=f"runs/{job}",
                     help="output directory (config.yaml, metrics.jsonl, summary.json, loss.png, checkpoints/)")
    named = ", ".join(run_flags.presets(job))
    run.add_argument("--config", default=None, metavar="FILE",
                     help="a YAML file of flags (a run's config.yaml; keys are the long flag names) read as the "
                          "defaults; flags given here override it" + (f"; or a preset: {named}" if named else ""))
    run.add_argument("--seed", type=non_negative_int, default=0, help="seed for init, data order and splits")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the training set")
    length.add_argument("--steps", type=positive_int, default=None, help="optimiser steps (overrides --epochs)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the latest checkpoint in --out, with the flags of its config.yaml "
                          "(flags given here override them)")
    run.add_argument("--accept-data-change", action="store_true",
                     help="--resume: continue although the data differs from what the run recorded (the change is "
                          "recorded in run.json)")
    run.add_argument("--overwrite", action="store_true",
                     help="delete a previous run's outputs in --out first (otherwise they are kept and the run "
                          "refused)")
    run.add_argument("--checkpoint-every", type=positive_int, default=None,
                     help="checkpoint every N steps (always: at every evaluation, at the end, on Ctrl-C/SIGTERM)")
    run.add_argument("--checkpoint-minutes", type=non_negative_float, default=5.0,
                     help="also checkpoint once this many minutes have passed since the last checkpoint, checked "
                          "every --log-every steps (0: never for that reason)")
    run.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep")
    run.add_argument("--log-every", type=positive_int, default=log_every,
                     help="fetch the step metrics from the device every N steps (each step still gets its row "
                          "in metrics.jsonl); fewer fetches keep the device busier")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    opt = p.group("optimiser")
    opt.add_argument("--batch-size", type=positive_int, default=batch_size, help="rows per step (default: full batch)"
                     if batch_size is None else "rows per step")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=optimizer, help="the optax optimiser")
    opt.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate")
    opt.add_argument("--weight-decay", type=non_negative_float, default=weight_decay,
                     help="decoupled for adamw, L2 added to the gradient for sgd/adam")
    opt.add_argument("--momentum", type=fraction_below_1, default=momentum, help="sgd momentum, in [0, 1)")
    opt.add_argument("--muon-lr", type=positive_float, default=0.02,
                     help="muon: peak learning rate of the blocks' matrices (--lr is AdamW's, for the rest)")
    opt.add_argument("--schedule", choices=SCHEDULES, default="constant",
                     help="learning rate over the run: constant, or linear warmup then cosine decay to 0")
    opt.add_argument("--warmup-steps", type=non_negative_int, default=0,
                     help="linear warmup from 0 to --lr; at most the run's steps - 1 (longer is clamped, with a note)")
    opt.add_argument("--clip-norm", type=positive_float, default=None, help="clip gradients to this global norm")
    if evaluation:
        p.group("evaluation").add_argument("--eval-every", type=positive_int, default=None,
                                           help="evaluate every N steps (and at the end)")
    if parallel:
        add_parallel_flags(p, precision=precision, split_cpu=split_cpu)
    distributed.add_flags(p, p.group("multi-host"))
    return p


def add_text_flags(group, *, tokenizer: str | None = "bpe", vocab_size: int | None = 512, default_note: str = "") -> None:
    """``--text``, ``--tokenizer``, ``--vocab-size``: the text jobs' data (lm, rnn, ngram, prepare).
    ``default_note`` ends the tokenizer and vocabulary helps (e.g. where a None default comes from)."""
    from jaxllm.data.lm_data import TOKENIZERS

    group.add_argument("--text", nargs="+", type=absolute_path, default=None, metavar="FILE",
                       help="text files, one document each, to use instead of Shakespeare's works")
    group.add_argument("--tokenizer", choices=TOKENIZERS, default=tokenizer,
                       help="bpe: a byte-level BPE trained on the training text; gpt2: GPT-2's" + default_note)
    group.add_argument("--vocab-size", type=bpe_vocab_size, default=vocab_size,
                       help="size of the trained BPE (bpe tokenizer)" + default_note)


def add_sampling_flags(group, *, temperature: float | None = 0.8, top_k: int = 40, temperature_help: str = "0: greedy",
                       top_p: bool = True, all_tokens: bool = True) -> None:
    """``--temperature``, ``--top-k`` and, with ``top_p``, ``--top-p``: how a job samples text.
    ``all_tokens``: ``--top-k 0`` keeps every token (else it must be >= 1)."""
    group.add_argument("--temperature", type=non_negative_float, default=temperature, help=temperature_help)
    group.add_argument("--top-k", type=non_negative_int if all_tokens else positive_int, default=top_k,
                       help="keep the k likeliest tokens" + ("; 0: all" if all_tokens else ""))
    if top_p:
        group.add_argument("--top-p", type=positive_fraction, default=None, help="nucleus sampling, in (0, 1]")


def add_eval_batches(p: ArgumentParser, default: int = 50) -> None:
    """``--eval-batches``: the jobs whose held-out set is large enough for periodic evaluations to
    cost a noticeable share of the run score a fixed part of it then; the final one scores it all."""
    p.group("evaluation").add_argument(
        "--eval-batches", type=positive_int, default=default,
        help="periodic evaluations score only the first N batches of the held-out set (the same ones each "
             "time); the evaluation after the last step scores all of it")


PARALLEL_CHOICES = ("auto", *STRATEGIES)
DTYPES = ("float32", "bfloat16")


def add_parallel_flags(p: ArgumentParser, *, precision: bool = True, split_cpu: bool = True) -> None:
    """``--parallel``, ``--cpu-devices``, ``--accum-steps`` (jaxllm.training.parallel) and, with
    ``precision``, ``--dtype`` (jaxllm.training.precision) and ``--remat`` (the transformer configs'
    flag). ``split_cpu``: on a CPU, default to one device per core (else one device)."""
    g = p.group("devices and memory")
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
    processes = distributed.process_count()
    if processes > 1 and args.parallel in ("single", "pmap"):
        raise ValueError(f"--parallel {args.parallel} runs in one process; this run has {processes}: use "
                         "sharded, fsdp or shard_map (or auto), which span every process's devices")
    if args.parallel == "auto" and rows and processes == 1:  # several processes: every device takes part
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


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Parse flags and claim ``--out`` before any work (``jaxllm.runio.claim_run_dir``): a writable
    directory that no other live run holds and no other job's run is in; ``--resume`` needs a
    checkpoint to resume from; ``--overwrite`` sets the old run aside until the new one has a
    checkpoint.

    The defaults come, in this order, from the parser, the run's own ``config.yaml`` (``--resume``),
    the ``--config`` file; flags on the command line override them all (``jaxllm.training.run_flags``).
    ``args.flags`` holds the resolved flags that ``fit`` writes to ``config.yaml``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.set_defaults(**_file_defaults(parser, argv))
    args = parser.parse_args(argv)
    args.flags = {key: getattr(args, action.dest) for key, action in _file_flags(parser).items()}
    if args.overwrite and args.resume:
        parser.error("--overwrite and --resume contradict each other")
    global _claimed
    created = not os.path.exists(args.out)
    runio.claim_run_dir(args.out, getattr(parser, "job", None) or parser.prog, resume=args.resume,
                        overwrite=args.overwrite)
    _claimed = (args.out, created)
    distributed.barrier("--out claimed")  # no process looks at --out while process 0 sets the old run aside
    return args


# what a run is and does, not how it trains -- and where this one process stands in a multi-host
# launch, which a resume on other hosts does not share: given on the command line only, never in a file
COMMAND_LINE_ONLY = ("out", "config", "resume", "overwrite", "accept_data_change", "coordinator", "num_processes",
                     "process_id")


def _file_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags that a config file may set, by key (the long flag without its dashes)."""
    return {a.option_strings[-1][2:]: a for a in parser._actions
            if a.option_strings and a.help is not argparse.SUPPRESS and a.dest not in (*COMMAND_LINE_ONLY, "help")}


def _file_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """``{dest: value}`` from the run's ``config.yaml`` (with ``--resume``) and then ``--config``;
    a bad file, key or value is refused through ``parser.error`` naming it. Where the command line
    gives one of mutually exclusive flags (``--epochs``/``--steps``), the files' others are dropped."""
    given = _given(parser, argv)
    sources = []
    if given.get("resume"):
        saved = os.path.join(given.get("out", parser.get_default("out")), run_flags.CONFIG_FILE)
        if os.path.isfile(saved):
            sources.append((saved, saved))
    if given.get("config") is not None:
        sources.append((f"--config {given['config']}", _config_path(parser, given["config"])))
    defaults = {}
    for source, path in sources:
        try:
            values = run_flags.read_flags(path)
        except ValueError as exc:
            parser.error(f"argument --config: {exc}" if source != path else str(exc))
        defaults.update(_check_file_values(parser, values, source))
    for group in parser._mutually_exclusive_groups:
        dests = [a.dest for a in group._group_actions]
        if any(d in given for d in dests):
            for dest in dests:
                if dest not in given:
                    defaults.pop(dest, None)
    return defaults


_UNSET = object()


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """The flags the command line itself sets: a parse whose defaults are all a marker (through
    argparse's own method, so the parse has no side effects)."""
    marked = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != argparse.SUPPRESS})
    parsed, _ = argparse.ArgumentParser.parse_known_args(parser, argv, marked)
    return {k: v for k, v in vars(parsed).items() if v is not _UNSET}


def _config_path(parser: argparse.ArgumentParser, value: str) -> str:
    """``--config``'s file: a path, or the bare name of one of the job's presets."""
    if os.path.exists(value):
        return value
    job = getattr(parser, "job", None)
    preset = run_flags.preset_path(job, value) if job and os.sep not in value else None
    if preset is None:
        named = ", ".join(run_flags.presets(job)) if job else ""
        close = difflib.get_close_matches(value, run_flags.presets(job), 1, 0.6) if job else []
        presets = (f" and no such preset (presets: {named}){f' (did you mean {close[0]}?)' if close else ''}"
                   if named else "")
        parser.error(f"argument --config: no file {value!r}{presets}")
    return os.fspath(preset)


def _check_file_values(parser: argparse.ArgumentParser, values: dict, source: str) -> dict:
    """``{dest: value}`` for a file's ``{key: value}``, each value checked by its flag's own type
    and choices (a YAML number reaches the validator as the text a user would type)."""
    flags = _file_flags(parser)
    unknown = [k for k in values if k not in flags]
    if unknown:
        hints = [f"{k} -> {m[0]}" for k in unknown if (m := difflib.get_close_matches(k.replace("_", "-"), flags, 1))]
        only = [k for k in unknown if k in COMMAND_LINE_ONLY]
        parser.error(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                     + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                     + (f" ({', '.join(only)}: command line only)" if only else ""))
    return {flags[k].dest: _file_value(parser, flags[k], v, source) for k, v in values.items()}


def _file_value(parser: argparse.ArgumentParser, action: argparse.Action, value, source: str):
    where = f"argument {action.option_strings[-1]} in {source}"
    if value is None:
        return None
    if action.nargs == 0:  # a switch: store_true
        if not isinstance(value, bool):
            parser.error(f"{where}: must be true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*")
    if isinstance(value, list) != many:
        parser.error(f"{where}: must be {'a list' if many else 'one value'}, got {value!r}")
    items = value if many else [value]
    try:
        items = [action.type(str(v)) if action.type else str(v) for v in items]
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        parser.error(f"{where}: {exc}")
    for item in items:
        if action.choices is not None and item not in action.choices:
            parser.error(f"{where}: invalid choice: {item!r} (choose from {', '.join(map(str, action.choices))})")
    return items if many else items[0]


def total_steps(args, steps_per_epoch: int) -> int:
    return args.steps if args.steps is not None else args.epochs * steps_per_epoch


def optimizer_config(args, total: int, *, muon_blocks: Sequence[str] = ()) -> OptimizerConfig:
    """The run's optimiser. ``total_steps`` only matters to a decaying schedule; leaving it out of a
    constant one lets ``--resume --steps N`` extend such a run (the config is checked on resume).

    A warmup as long as the run or longer (the scripts' default warmup on a short ``--steps`` run)
    is not an error: it is clamped to ``total - 1`` steps, so the last step trains at the peak
    ``--lr`` (and a cosine decay keeps at least one step), and one ``note:`` line says so. With
    ``--epochs`` the total is known only after the data is prepared, hence here. ``muon_blocks``:
    the top-level param names whose matrices ``--optimizer muon`` trains (a model's
    ``block_names``; empty: every 2-D param)."""
    if total < 1 and args.schedule != "constant":
        raise ValueError(f"--schedule {args.schedule} needs the run's length, but the run has {total} steps "
                         "(is --batch-size larger than the training set?)")
    warmup = clamp_warmup(args.warmup_steps, total)
    return OptimizerConfig(
        name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        schedule=args.schedule, warmup_steps=warmup, clip_norm=args.clip_norm,
        total_steps=total if args.schedule != "constant" else None,
        **({"muon_lr": args.muon_lr, "muon_blocks": tuple(muon_blocks)} if args.optimizer == "muon" else {}),
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
        eval_every=getattr(args, "eval_every", None) or steps_per_epoch, checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes or None, keep=args.keep, resume=args.resume,
        log_every=args.log_every, progress=not args.no_progress, flags=args.flags,
    )


def fit_config(args, *, steps_per_epoch: int | None = None, **fields) -> FitConfig:
    """The run's ``FitConfig``: ``--out``, its length and the shared flags, then the job's own ``fields``
    (which win: a job's own default for a shared setting)."""
    return FitConfig(**{"out_dir": args.out, **length_kwargs(args), **fit_kwargs(args, steps_per_epoch=steps_per_epoch),
                        **fields})


def length_kwargs(args) -> dict:
    return {"steps": args.steps} if args.steps is not None else {"epochs": args.epochs}


# the command that runs a job ("jaxllm train lm"; None: a script, python train/lm.py): names the
# job in its errors and --help, and starts the line that resumes it
_command: str | None = None


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, *,
        prog: str | None = None) -> None:
    """Run a job's ``main`` as a command (``prog``: its name, e.g. ``jaxllm train lm``): bad input,
    missing data, divergence or a file that cannot be written exits 2 with one ``error:`` line;
    SIGINT/SIGTERM exit 130/143 with one line saying how to resume; never a traceback for these."""
    global _command
    import signal

    from jaxllm.data.tabular import DataUnavailable
    from jaxllm.training.checkpoint import CheckpointWriteError
    from jaxllm.training.loop import TrainingDiverged, TrainingInterrupted

    def terminate(signum, frame):  # outside training (which saves first), SIGTERM ends quietly
        raise _Terminated

    signal.signal(signal.SIGTERM, terminate)
    orbax_noise.install()
    _command = prog
    try:
        main(argv)
    except (ValueError, DataUnavailable, TrainingDiverged, OSError) as exc:
        _after_failed_run()
        print(f"error: {exc}", file=sys.stderr)
        # a failed save leaves orbax's other writes of the step behind: the interpreter's shutdown
        # would report each of them after the error line, so the process ends now
        _exit_alone(2, now=isinstance(exc, CheckpointWriteError))
    except TrainingInterrupted as exc:  # every process stops at the same step: they exit together
        resume = (f"resume with: {resume_command(argv)}" if exc.last_checkpoint is not None
                  else "no checkpoint yet: run the same command again to start over")
        print(f"interrupted: {exc}; {resume}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        print("interrupted outside the training loop: checkpoints already written are kept", file=sys.stderr)
        _exit_alone(143 if isinstance(exc, _Terminated) else 130)
    except Exception:
        if distributed.process_count() == 1:
            raise
        traceback.print_exc()
        _exit_alone(1)
    finally:
        _command = None


# the --out that parse_args claimed in this process, and whether the claim created it
_claimed: tuple[str, bool] | None = None


def _after_failed_run() -> None:
    """A run that failed before its first checkpoint gives back the run ``--overwrite`` set aside,
    and leaves no directory it created with nothing in it but its own start."""
    if _claimed is None or not runio.is_first_process():
        return
    out, created = _claimed
    runio.restore_previous_run(out)
    started = runio.has_checkpoints(out) or any(os.path.exists(os.path.join(out, name))
                                                for name in ("metrics.jsonl", "summary.json"))
    if created and not started:
        runio.unlock_run_dir(out)
        shutil.rmtree(out, ignore_errors=True)


def _exit_alone(code: int, *, now: bool = False) -> None:
    """Exit with ``code`` -- at once when this is one of several processes: an error may stop one
    process only, and a normal exit would wait in JAX's shutdown barrier (minutes) for the others,
    which wait for it in their next collective; exiting lets the coordinator stop them all now.
    ``now``: at once in any case, skipping the interpreter's shutdown."""
    if now or distributed.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop."""


def resume_command(argv: Sequence[str] | None = None) -> str:
    """The command line that continues this run: the same flags, ``--overwrite`` dropped, ``--resume`` added."""
    import shlex

    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([*(shlex.split(_command) if _command else ["python", sys.argv[0]]), *args])
