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
import os
import sys
import time

SUITES = ("train", "generate", "rnn", "parallel", "compile", "profile")
DEFAULT_SUITES = ("train", "generate", "rnn")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxllm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", default=list(DEFAULT_SUITES), help=f"any of {SUITES}")
    p.add_argument("--quick", action="store_true", help="smoke run: tiniest sizes, few rounds, no torch.compile")
    p.add_argument("--out", default="runs/bench", help="directory for <suite>.json")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default: 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case after the first")
    p.add_argument("--families", default=None,
                   help="comma list for train (linear,mlp,cnn,rnn,decoder,gpt2) and generate (decoder,gpt2)")
    p.add_argument("--sizes", default=None, help="comma list: tiny,small (decoder/gpt2: tiny = config A, small = B)")
    p.add_argument("--torch-compile", default=None,
                   help="'all', 'none' or a comma list of families to also run under torch.compile")
    p.add_argument("--host-devices", type=int, default=None,
                   help="CPU: host devices to force (default: one per core; 1 = no data-parallel rows)")
    p.add_argument("--no-data-parallel", action="store_true", help="train: skip the data-parallel JAX row")
    p.add_argument("--batches", default=None, help="generate: comma list of batch sizes (default 1,8)")
    p.add_argument("--new-tokens", type=int, default=256, help="generate: tokens decoded per call")
    p.add_argument("--prompt-tokens", type=int, default=16, help="generate: prompt length")
    p.add_argument("--strategies", default=None, help="parallel: comma list (default: all of them)")
    p.add_argument("--gpu-preset", action="store_true",
                   help="GPU: GPT-2 124M in bfloat16 (train: tokens/s and MFU; generate: ms/token)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="accelerator peak for MFU (default: known bf16 dense peak of the device)")
    p.add_argument("--gpu-batch", type=int, default=16, help="--gpu-preset: rows of 1,024 tokens per step")
    p.add_argument("--matmul-precision", default=None,
                   help="sets jax_default_matmul_precision (recorded either way)")
    return p


def parse(argv=None):
    args = make_parser().parse_args(argv)
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
    """``args`` completed with the suite's defaults for whatever the user did not set."""
    opts = argparse.Namespace(**vars(args))
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
