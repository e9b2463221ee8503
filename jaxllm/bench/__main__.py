"""``jaxllm bench [train] [generate] [rnn] [parallel] [compile] [profile] [flags]``: print tables, write JSON.

Each suite prints a table and writes ``<out>/<suite>.json`` (default ``runs/bench/``) holding
the machine (cores, CPU, load, torch and XLA threads and flags, versions), the settings and
one row per case with medians, min-max, CPU time and first-call (compile) times.

``--quick`` is a ~1-minute smoke run (tiny sizes, 3 rounds, no ``torch.compile``). On CPU the
process gets one host device per core (``--xla_force_host_platform_device_count``, set before
JAX starts unless ``XLA_FLAGS`` already names a count), so the ``train`` suite can show the
data-parallel row beside the single-device one; ``--host-devices 1`` turns that off.
``--gpu-preset`` (``train``/``generate`` on a GPU) benchmarks GPT-2 124M in bfloat16 and reports
model-FLOPs utilisation against ``--peak-tflops`` (known for H100/H200 SXM: 989 bf16 dense).
``compile`` times a new process's first training step with an empty persistent compilation
cache (cold) and again in a second process that finds it filled (warm). ``profile`` sums XLA's
CPU operation events of training steps and decoded tokens by operation kind (matmuls, copies,
fusions), so a slow case shows where its time goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import ClassVar

from jaxllm.options import option

SUITES = ("train", "generate", "rnn", "parallel", "compile", "profile")
DEFAULT_SUITES = ("train", "generate", "rnn")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    __doc__ = __doc__
    SECTION: ClassVar[str] = "run"
    suites: tuple[str, ...] = option(DEFAULT_SUITES, f"any of {SUITES}", positional=True, many=True)
    quick: bool = option(False, "smoke run: tiniest sizes, few rounds, no torch.compile")
    out: str = option("runs/bench", "directory for <suite>.json")
    rounds: int | None = option(None, "timed rounds per case (default: 10, quick 3)", type=int)
    warmup: int | None = option(None, "untimed calls per case after the first (default: per suite)", type=int)
    families: str | None = option(None, "comma list for train (linear,mlp,cnn,rnn,decoder,gpt2) and generate "
                                        "(decoder,gpt2) (default: per suite)")
    sizes: str | None = option(None, "comma list: tiny,small (decoder/gpt2: tiny = config A, small = B) (default: "
                                     "per suite)")
    torch_compile: str | None = option(None, "'all', 'none' or a comma list of families to also run under "
                                             "torch.compile (default: per suite)")
    host_devices: int | None = option(None, "CPU: host devices to force (default: one per core; 1 = no "
                                            "data-parallel rows)", type=int)
    no_data_parallel: bool = option(False, "train: skip the data-parallel JAX row")
    batches: str | None = option(None, "generate: comma list of batch sizes (default 1,8)")
    new_tokens: int = option(256, "generate: tokens decoded per call", type=int)
    prompt_tokens: int = option(16, "generate: prompt length", type=int)
    strategies: str | None = option(None, "parallel: comma list (default: all of them)")
    gpu_preset: bool = option(False, "GPU: GPT-2 124M in bfloat16 (train: tokens/s and MFU; generate: ms/token)")
    peak_tflops: float | None = option(None, "accelerator peak for MFU (default: known bf16 dense peak of the "
                                             "device)", type=float)
    gpu_batch: int = option(16, "--gpu-preset: rows of 1,024 tokens per step", type=int)
    matmul_precision: str | None = option(None, "sets jax_default_matmul_precision (recorded either way) "
                                                "(default: JAX's)")


def parse(argv=None) -> BenchConfig:
    """The bench's settings; a ``ValueError`` for a suite or count that cannot run."""
    from jaxllm.options.parser import parse as parse_config

    args = parse_config(BenchConfig, argv, prog="jaxllm bench")
    bad = [s for s in args.suites if s not in SUITES]
    if bad:
        raise ValueError(f"unknown suite(s) {bad}: choose from {SUITES}")
    for name in ("rounds", "host_devices", "new_tokens", "prompt_tokens", "gpu_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    return args


def force_host_devices(count: int | None) -> int | None:
    """Ask XLA for ``count`` host devices (default: one per core) unless ``XLA_FLAGS`` already
    sets a count; must run before JAX starts. Returns the count asked for (None: left alone)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return None
    count = count or os.cpu_count() or 1
    if count > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return count


def suite_options(suite_module, args):
    """The suite's options: ``args`` completed with its defaults for whatever the user did not set."""
    opts = argparse.Namespace(**dataclasses.asdict(args))
    for key, value in suite_module.defaults(args.quick).items():
        given = getattr(args, key, None)
        if given is None:
            setattr(opts, key, value)
        elif key in ("families", "sizes", "batches", "strategies") and isinstance(given, str):
            setattr(opts, key, [v for v in given.split(",") if v])
    if hasattr(opts, "batches") and isinstance(opts.batches, list):
        opts.batches = [int(b) for b in opts.batches]
    opts.data_parallel = not args.no_data_parallel and (args.host_devices or 2) > 1
    return opts


def main(argv=None) -> dict:
    args = parse(argv)
    force_host_devices(args.host_devices)
    import importlib

    import jax

    from jaxllm.bench import common

    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    results = {}
    for suite in args.suites:
        module = importlib.import_module(f"jaxllm.bench.{suite}")
        opts = suite_options(module, args)
        machine = common.machine_info()
        started = time.perf_counter()
        payload = module.run(opts)
        payload.update(suite=suite, machine=machine, wall_s=time.perf_counter() - started,
                       load_average_after=common.load_average(),
                       settings={k: v for k, v in vars(opts).items() if k != "suites"})
        note = common.load_note(machine["load_average"], machine["cores"])
        if note:
            payload["note"] = note
        path = os.path.join(args.out, f"{suite}.json")
        common.write_result(path, payload)
        print(f"\n== {suite} ({machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on "
              f"{machine['jax_backend']} x{len(machine['jax_devices'])}, torch {machine.get('torch')} "
              f"with {machine.get('torch_threads')} threads; load {machine['load_average']})")
        print(payload["table"])
        if note:
            print(note)
        print(f"-> {path} ({payload['wall_s']:.0f} s)", flush=True)
        results[suite] = payload
    return results


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
