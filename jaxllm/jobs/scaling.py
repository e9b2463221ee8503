"""Scaling sweep: devices x global batch x model size, a fixed number of timed steps per point.

Each point builds the model, places it with a ``--parallel`` strategy on the first N devices,
compiles the train step (timed separately), runs ``--warmup`` untimed steps and then ``--steps``
timed ones on synthetic token batches (every step blocks until done; the median counts).
Writes ``scaling.csv`` and ``scaling.png`` (tokens/s and step time against devices, and the
model-FLOPs utilisation ``6 * params * tokens/s / (peak FLOP/s per device * devices)`` when
``--peak-flops`` is given; 6N counts the matmuls of forward and backward, not attention's).

On CPU the job re-runs itself (``jaxllm scaling ... --worker N``) once per device count in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``: the forced devices share the same cores,
so this proves the machinery (every strategy, every device count, same losses), not speed. On
GPU/TPU it uses the first N real devices of one process, unchanged. With several processes
(``--coordinator``/``--num-processes``/``--process-id`` or the JAX_* variables) each point uses
every device of every process, and process 0 writes the files.

    jaxllm scaling --devices 1,2,4 --batch 8,16 --sizes tiny,small --steps 10
    jaxllm scaling --devices 1 --sizes small,medium --batch 32,64 --dtype bfloat16 --peak-flops 989e12
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
import optax

from jaxllm.models import language_model
from jaxllm.training import TrainState
from jaxllm.training import cli, distributed
from jaxllm.training.losses import lm_loss
from jaxllm.training.parallel import STRATEGIES, make_strategy
from jaxllm.training.precision import mixed_precision

SIZES = {  # name -> (d_model, layers, heads)
    "tiny": (64, 2, 4),
    "small": (256, 4, 4),
    "medium": (512, 8, 8),
    "gpt2_124m": (768, 12, 12),
}
COLUMNS = ("model", "size", "params", "devices", "processes", "parallel", "dtype", "remat", "global_batch",
           "context", "tokens_per_step", "compile_s", "step_time_s", "tokens_per_s", "tokens_per_s_per_device",
           "mfu", "loss_first", "loss_last", "backend", "device_kind")
RESULT_PREFIX = "SCALING_ROWS "
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_config(model: str, size: str, vocab_size: int, context: int, remat: bool):
    """A GPT-2 (learned positions, LayerNorm) or Burkov-decoder (RoPE, RMSNorm) config of ``size``."""
    if size not in SIZES:
        raise ValueError(f"--sizes must be among {tuple(SIZES)}, got {size!r}")
    d, layers, heads = SIZES[size]
    config = language_model(model, None, vocab_size, context, d_model=d, layers=layers, heads=heads)
    return config.with_dropout(0.0).replace(remat=remat)


def make_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--devices", type=cli.int_list(1), default="1,2,4", help="device counts to sweep (comma-separated)")
    p.add_argument("--batch", type=cli.int_list(1), default="8,16",
                   help="global batch sizes (rows per step, comma-separated)")
    p.add_argument("--sizes", default="tiny,small", help=f"model sizes among {', '.join(SIZES)}")
    p.add_argument("--model", choices=("decoder", "gpt2"), default="decoder",
                   help="decoder: Burkov's (RoPE, RMSNorm); gpt2: learned positions, LayerNorm")
    p.add_argument("--context", type=cli.positive_int, default=128, help="tokens per row")
    p.add_argument("--vocab-size", type=cli.positive_int, default=512, help="vocabulary of the synthetic tokens")
    p.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps per point")
    p.add_argument("--warmup", type=cli.non_negative_int, default=2, help="untimed steps after the compiling one")
    p.add_argument("--parallel", choices=("auto", *STRATEGIES), default="auto",
                   help="device strategy (auto: single on 1 device, sharded on several)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype: bfloat16 = bf16 activations and matmuls, fp32 master weights")
    p.add_argument("--remat", action="store_true", help="recompute transformer blocks in the backward pass")
    p.add_argument("--peak-flops", type=cli.positive_float, default=None,
                   help="peak FLOP/s of ONE device (e.g. 989e12 for an H100's dense bf16) for the MFU column")
    p.add_argument("--out", default="runs/scaling", help="directory for scaling.csv and scaling.png")
    p.add_argument("--seed", type=cli.non_negative_int, default=0, help="seed for init and the synthetic batches")
    p.add_argument("--worker", type=cli.positive_int, default=None, help=argparse.SUPPRESS)  # CPU: one device count
    distributed.add_flags(p)
    return p


def check_args(args) -> None:
    """What the flags' types cannot say alone: the sizes named (numbers are checked while parsing)."""
    args.device_counts, args.batches = args.devices, args.batch
    args.size_names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not args.size_names:
        raise ValueError(f"--sizes names no size (choose among {tuple(SIZES)})")
    for size in args.size_names:
        if size not in SIZES:
            raise ValueError(f"--sizes must be among {tuple(SIZES)}, got {size!r}")


def measure_point(args, size: str, config, devices, batch: int) -> dict:
    """Compile, warm up and time one (size, devices, batch) point; returns one CSV row."""
    n = len(devices)
    name = args.parallel if args.parallel != "auto" else ("sharded" if n > 1 else "single")
    strategy = make_strategy(name, devices=devices)
    optimizer = optax.adamw(1e-3, weight_decay=0.0)
    params = config.init(jax.random.PRNGKey(args.seed))
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    state = strategy.place(TrainState.create(params, optimizer, jax.random.PRNGKey(args.seed + 1)))
    step = strategy.train_step(mixed_precision(lm_loss(config), args.dtype), optimizer)
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, config.vocab_size, (4, batch, args.context + 1)).astype(np.int32)
    batches = [{"inputs": x[:, :-1], "targets": x[:, 1:]} for x in ids]

    def run(i):
        nonlocal state
        state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        return float(metrics["loss"])

    t0 = time.perf_counter()
    losses = [run(0)]  # compiles
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        losses.append(run(1 + i))
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(run(1 + args.warmup + i))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = batch * args.context
    tps = tokens / step_s
    mfu = 6 * n_params * tps / (args.peak_flops * n) if args.peak_flops else None
    return {"model": args.model, "size": size, "params": n_params, "devices": n,
            "processes": jax.process_count(), "parallel": strategy.name, "dtype": args.dtype, "remat": args.remat,
            "global_batch": batch, "context": args.context, "tokens_per_step": tokens,
            "compile_s": round(compile_s, 3), "step_time_s": step_s, "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / n, "mfu": mfu, "loss_first": losses[0], "loss_last": losses[-1],
            "backend": jax.default_backend(), "device_kind": devices[0].device_kind}


def run_points(args, counts: list[int]) -> list[dict]:
    """Every (size, batch) point for each device count in ``counts``, in this process."""
    available = jax.devices()
    rows = []
    for n in counts:
        if n > len(available):
            raise ValueError(f"--devices asks for {n} devices but this run has {len(available)} "
                             f"({jax.default_backend()})")
        if jax.process_count() > 1 and n != len(available):
            print(f"skipping {n} devices: with several processes every point uses all {len(available)}")
            continue
        for size in args.size_names:
            config = build_config(args.model, size, args.vocab_size, args.context, args.remat)
            for batch in args.batches:
                if batch % n:
                    print(f"skipping {size} batch {batch} on {n} devices: the batch does not divide by {n}")
                    continue
                row = measure_point(args, size, config, available[:n], batch)
                print(f"{size:>8} devices {n:>2} batch {batch:>4}: {row['step_time_s'] * 1e3:8.1f} ms/step "
                      f"{row['tokens_per_s']:10.0f} tokens/s  (compile {row['compile_s']:.1f} s)", flush=True)
                rows.append(row)
    return rows


def run_cpu_subprocesses(args, argv: list[str]) -> list[dict]:
    """CPU: one subprocess per device count, each with that many forced host devices."""
    rows = []
    for n in args.device_counts:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, (
                   PACKAGE_ROOT, os.environ.get("PYTHONPATH")))),  # importable from a checkout too
                   XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n}"]))
        proc = subprocess.run([sys.executable, "-m", "jaxllm", "scaling", *argv, "--worker", str(n)], env=env,
                              stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.splitlines()
        for line in lines:
            if not line.startswith(RESULT_PREFIX):
                print(line)
        if proc.returncode != 0:
            raise RuntimeError(f"the {n}-device worker failed (exit {proc.returncode}); its error is above")
        rows += json.loads(next(line for line in lines if line.startswith(RESULT_PREFIX))[len(RESULT_PREFIX):])
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_mfu = any(r["mfu"] is not None for r in rows)
    panels = 3 if with_mfu else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    series = sorted({(r["size"], r["global_batch"]) for r in rows}, key=lambda s: (SIZES[s[0]], s[1]))
    for size, batch in series:
        pts = sorted((r for r in rows if (r["size"], r["global_batch"]) == (size, batch)), key=lambda r: r["devices"])
        x = [r["devices"] for r in pts]
        label = f"{size} ({pts[0]['params'] / 1e6:.2f}M), batch {batch}"
        axes[0].plot(x, [r["tokens_per_s"] for r in pts], "o-", label=label)
        axes[1].plot(x, [r["step_time_s"] * 1e3 for r in pts], "o-", label=label)
        if with_mfu:
            axes[2].plot(x, [100 * (r["mfu"] or 0) for r in pts], "o-", label=label)
    titles = ["tokens / s", "step time (ms)", "model FLOPs utilisation (%)"]
    counts = sorted({r["devices"] for r in rows})
    for i, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_title(title)
        if i < 2:
            ax.set_yscale("log")  # sizes differ by orders of magnitude
        ax.set_xlabel("devices")
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    first = rows[0]
    note = (" -- forced host devices share the same CPU cores: correctness, not speed"
            if first["backend"] == "cpu" else "")
    strategies = "/".join(sorted({r["parallel"] for r in rows}))
    fig.suptitle(f"{first['model']}, {strategies}, {first['dtype']}{', remat' if first['remat'] else ''}, "
                 f"context {first['context']}; "
                 f"{first['backend']} ({first['device_kind']}){note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    check_args(args)
    if args.worker is not None:  # a CPU subprocess: one device count, rows back on stdout
        rows = run_points(args, [args.worker])
        print(RESULT_PREFIX + json.dumps(rows), flush=True)
        return rows
    distributed.initialize_from_args(args)
    if jax.default_backend() == "cpu" and jax.process_count() == 1:
        rows = run_cpu_subprocesses(args, argv)
    else:
        rows = run_points(args, args.device_counts)
    if not rows:
        raise ValueError("no point of the sweep could run (see the skipped points above)")
    if jax.process_index() == 0:
        os.makedirs(args.out, exist_ok=True)
        write_csv(rows, os.path.join(args.out, "scaling.csv"))
        plot(rows, os.path.join(args.out, "scaling.png"))
        print(f"{len(rows)} points -> {os.path.join(args.out, 'scaling.csv')}, {os.path.join(args.out, 'scaling.png')}")
    return rows
