"""Scaling sweep: processes x devices x global batch x model size, a fixed number of timed steps per point.

Each point builds the model, places it with a ``--parallel`` strategy on the first N devices,
compiles the train step (timed separately), runs ``--warmup`` untimed steps and then ``--steps``
timed ones on synthetic token batches (every step blocks until done; the median counts). Each
process draws the same global batches and feeds only the rows its own devices hold
(``distributed.local_rows`` / ``global_batch`` with the strategy's ``batch_sharding``).
Writes ``scaling.csv`` (one row per point, ``processes`` and ``devices`` the totals of the run)
and ``scaling.png``:

* strong scaling -- tokens/s against devices at a fixed global batch (one line per size, batch
  and process count): ideal is a line of slope 1 on the log-log axes;
* weak scaling -- tokens/s against devices at a fixed number of rows per device (the points of
  the sweep whose ``global_batch / devices`` is equal, joined): also slope 1 when ideal, and
  flat step times. Choose ``--batch`` to grow with ``--devices`` to get these curves, e.g.
  ``--devices 1,2,4 --batch 8,16,32`` (8 rows per device on 1, 2 and 4 devices);
* step time against devices, and the model-FLOPs utilisation ``6 * params * tokens/s / (peak
  FLOP/s per device * devices)`` when ``--peak-flops`` is given (6N counts the matmuls of forward
  and backward, not attention's).

On CPU (one process launched) the job re-runs itself (``jaxllm scaling ... --worker N``) once
per device count N and process count P of ``--processes`` that divides it: P localhost
processes with ``XLA_FLAGS=--xla_force_host_platform_device_count=N/P`` each, joined by
``jax.distributed`` (a free port on 127.0.0.1, the JAX_* variables, gloo collectives), together
run every point over all N devices; process 0 prints the rows back. If one worker fails or a
group outlives ``--timeout``, all of them are killed. The forced devices and processes share the
same cores, so this proves the machinery (every strategy, device and process count, same
losses), not speed. On GPU/TPU, or with processes launched by hand (``--coordinator``/
``--num-processes``/``--process-id`` or the JAX_* variables on every host), each point uses the
devices of the processes running -- all of them with several processes -- and ``--processes``
may only name that count; process 0 writes the files.

    jaxllm scaling --devices 1,2,4 --batch 8,16 --sizes tiny,small --steps 10
    jaxllm scaling --processes 1,2 --devices 2,4 --batch 8,16 --sizes tiny   # CPU: + 2 processes
    jaxllm scaling --devices 1 --sizes small,medium --batch 32,64 --dtype bfloat16 --peak-flops 989e12
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import numpy as np
import optax

from jaxllm.models import language_model
from jaxllm.training import TrainState
from jaxllm import cli
from jaxllm.training import distributed
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
ONE_PROCESS_STRATEGIES = ("single", "pmap")  # no batch sharding over every process's devices


def build_config(model: str, size: str, vocab_size: int, context: int, remat: bool):
    """A GPT-2 (learned positions, LayerNorm) or Burkov-decoder (RoPE, RMSNorm) config of ``size``."""
    if size not in SIZES:
        raise ValueError(f"--sizes must be among {tuple(SIZES)}, got {size!r}")
    d, layers, heads = SIZES[size]
    config = language_model(model, None, vocab_size, context, d_model=d, layers=layers, heads=heads)
    return config.with_dropout(0.0).replace(remat=remat)


def make_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--devices", type=cli.int_list(1), default="1,2,4",
                   help="device counts to sweep, in total over all processes (comma-separated)")
    p.add_argument("--processes", type=cli.int_list(1), default=None,
                   help="CPU: process counts to sweep (comma-separated), each on localhost with devices/processes "
                        "forced devices per process; elsewhere only the count running (default: 1, or the "
                        "processes launched by hand)")
    p.add_argument("--batch", type=cli.int_list(1), default="8,16",
                   help="global batch sizes (rows per step over all devices, comma-separated)")
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
    p.add_argument("--timeout", type=cli.positive_float, default=3600.0,
                   help="CPU: seconds the worker processes of one device and process count may take; then "
                        "all of them are killed")
    p.add_argument("--out", default="runs/scaling", help="directory for scaling.csv and scaling.png")
    p.add_argument("--seed", type=cli.non_negative_int, default=0, help="seed for init and the synthetic batches")
    p.add_argument("--worker", type=cli.positive_int, default=None, help=argparse.SUPPRESS)  # CPU: one device count
    distributed.add_flags(p, p.group("multi-host"))
    return p


def check_args(args) -> None:
    """What the flags' types cannot say alone: the sizes named, process counts that divide some
    device count (numbers are checked while parsing)."""
    args.device_counts, args.batches = args.devices, args.batch
    args.process_counts = args.processes or [1]
    args.size_names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not args.size_names:
        raise ValueError(f"--sizes names no size (choose among {tuple(SIZES)})")
    for size in args.size_names:
        if size not in SIZES:
            raise ValueError(f"--sizes must be among {tuple(SIZES)}, got {size!r}")
    for p in args.process_counts:
        if not any(n % p == 0 for n in args.device_counts):
            raise ValueError(f"--processes {p} divides none of --devices {','.join(map(str, args.device_counts))}: "
                             f"every process needs the same number of devices")


def launches_workers(args, backend: str, running: int) -> bool:
    """Whether this run launches localhost CPU workers for ``args.process_counts`` (a CPU run of
    one process) rather than measuring in the ``running`` processes; a ``--processes`` that the
    run cannot honour, or a one-process strategy over several, is a ValueError."""
    launch = backend == "cpu" and running == 1
    if not launch:
        if args.processes not in (None, [running]):
            raise ValueError(f"--processes {','.join(map(str, args.processes))}: only a CPU run of one process "
                             f"launches processes itself; this run has {running} process(es) on {backend}, so "
                             f"--processes can only be {running} (or left out)")
        args.process_counts = [running]
    if args.parallel in ONE_PROCESS_STRATEGIES and max(args.process_counts) > 1:
        raise ValueError(f"--parallel {args.parallel} runs in one process; with several processes use sharded, "
                         f"fsdp or shard_map")
    return launch


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
    rng = np.random.default_rng(args.seed)  # every process draws the same global batches
    ids = rng.integers(0, config.vocab_size, (4, batch, args.context + 1)).astype(np.int32)
    batches = [{"inputs": x[:, :-1], "targets": x[:, 1:]} for x in ids]
    sharding = getattr(strategy, "batch_sharding", None)  # single, pmap: one process, the host batch as it is
    if sharding is not None:  # each process keeps the rows its devices hold, sent to them every step
        batches = [distributed.local_rows(b, sharding=sharding) for b in batches]

    def run(i):
        nonlocal state
        feed = batches[i % len(batches)]
        state, metrics = step(state, feed if sharding is None else distributed.global_batch(feed, sharding))
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
    """Every (size, batch) point for each device count in ``counts``, in the processes running."""
    available = jax.devices()
    processes = jax.process_count()
    over = f" over {processes} processes" if processes > 1 else ""
    rows = []
    for n in counts:
        if n > len(available):
            raise ValueError(f"--devices asks for {n} devices but this run has {len(available)} "
                             f"({jax.default_backend()})")
        if processes > 1 and n != len(available):
            print(f"note: skipping {n} devices: with several processes every point uses all {len(available)}")
            continue
        for size in args.size_names:
            config = build_config(args.model, size, args.vocab_size, args.context, args.remat)
            for batch in args.batches:
                if batch % n:
                    print(f"note: skipping {size} batch {batch} on {n} devices: the batch does not divide by {n}")
                    continue
                row = measure_point(args, size, config, available[:n], batch)
                print(f"{size:>8} devices {n:>2}{over} batch {batch:>4}: {row['step_time_s'] * 1e3:8.1f} ms/step "
                      f"{row['tokens_per_s']:10.0f} tokens/s  (compile {row['compile_s']:.1f} s)", flush=True)
                rows.append(row)
    return rows


def run_cpu_workers(args, argv: list[str]) -> list[dict]:
    """CPU: for each process count P and device count N that P divides, P localhost workers with
    N/P forced host devices each run every point over the N devices; process 0's rows come back."""
    rows = []
    for p in args.process_counts:
        for n in args.device_counts:
            if n % p:
                print(f"note: skipping {n} devices over {p} processes: {n} does not divide by {p}")
                continue
            coordinator = f"127.0.0.1:{free_port()}" if p > 1 else None
            what = f"the worker for {n} devices" if p == 1 else f"the workers for {n} devices over {p} processes"
            out = launch([worker(argv, n, p, i, coordinator) for i in range(p)], what, args.timeout)
            rows += json.loads(next(line for line in out.splitlines()
                                    if line.startswith(RESULT_PREFIX))[len(RESULT_PREFIX):])
    return rows


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for one point's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(argv: list[str], devices: int, processes: int = 1, process_id: int = 0,
           coordinator: str | None = None) -> tuple[list[str], dict]:
    """The command and environment of one CPU worker of a ``devices``-device point over
    ``processes``: ``devices / processes`` forced host devices, importable from a checkout too, and
    the JAX_* variables of ``jax.distributed`` -- also given as flags after ``argv``, where they win
    over any multi-host flag the user gave the launching process."""
    join = [("--num-processes", distributed.ENV_NUM_PROCESSES, str(processes))]
    if processes > 1:
        join += [("--coordinator", distributed.ENV_COORDINATOR, coordinator),
                 ("--process-id", distributed.ENV_PROCESS_ID, str(process_id))]
    unset = (distributed.ENV_NUM_PROCESSES, distributed.ENV_COORDINATOR, distributed.ENV_PROCESS_ID)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    xla = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env.update({variable: value for _, variable, value in join}, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, (PACKAGE_ROOT, env.get("PYTHONPATH")))),
               XLA_FLAGS=" ".join(xla + [f"--xla_force_host_platform_device_count={devices // processes}"]))
    flags = [x for flag, _, value in join for x in (flag, value)]
    return [sys.executable, "-m", "jaxllm", "scaling", *argv, "--worker", str(devices), *flags], env


def launch(workers: list[tuple[list[str], dict]], what: str, timeout_s: float) -> str:
    """Run ``workers`` (``(command, environment)``, one process each) together and return process
    0's stdout, after printing its lines other than the rows. Process 0's stderr passes through;
    the others' output is kept and shown if they fail. If any process fails, or they have not all
    finished after ``timeout_s``, every one still running is killed and a ChildProcessError /
    TimeoutError (both OSErrors: one ``error:`` line from ``cli.run``) names ``what``."""
    procs, logs = [], []
    with tempfile.TemporaryDirectory(prefix="jaxllm-scaling-") as tmp:
        try:
            for i, (command, env) in enumerate(workers):
                logs.append(open(os.path.join(tmp, f"{i}.log"), "w+"))
                procs.append(subprocess.Popen(command, env=env, stdout=logs[i], text=True,
                                              stderr=None if i == 0 else subprocess.STDOUT))
            deadline = time.monotonic() + timeout_s
            while True:
                codes = [p.poll() for p in procs]
                failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
                if failed is not None:
                    raise ChildProcessError(_failure(what, failed, len(procs), codes[failed], logs[failed]))
                if None not in codes:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} did not finish within --timeout {timeout_s:g} s: "
                                       f"{'all its processes were' if len(procs) > 1 else 'it was'} killed")
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            out = ""
            if logs:
                logs[0].seek(0)
                out = logs[0].read()
                for line in out.splitlines():
                    if not line.startswith(RESULT_PREFIX):
                        print(line)
            for log in logs:
                log.close()
    return out


def _failure(what: str, index: int, count: int, code: int, log) -> str:
    """The error line of a failed worker; another process than 0 has its output printed first
    (process 0's stderr is already on the terminal)."""
    who = what if count == 1 else f"{what}: process {index} of {count}"
    if index > 0:
        log.seek(0)
        print("\n".join(f"[process {index}] {line}" for line in log.read().strip().splitlines()[-20:]),
              file=sys.stderr)
    return f"{who} failed (exit {code}); its error is above"


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})


def plot(rows: list[dict], path: str) -> None:
    """Strong scaling (fixed global batch), weak scaling (fixed rows per device), step time and,
    with ``--peak-flops``, MFU -- all against total devices; a line style per process count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_mfu = any(r["mfu"] is not None for r in rows)
    panels = 4 if with_mfu else 3  # one row: the legends go below the first two panels
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 6.5))
    axes = list(axes)
    process_counts = sorted({r["processes"] for r in rows})
    styles = {p: ("o-", "s--", "^:", "D-.")[i % 4] for i, p in enumerate(process_counts)}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def draw(ax, key, label, value):
        """One line per (key(row), processes): points sorted by devices."""
        series = sorted({(key(r), r["processes"]) for r in rows})
        shades = {k: colors[i % len(colors)] for i, k in enumerate(sorted({k for k, _ in series}))}
        for k, p in series:
            pts = sorted((r for r in rows if (key(r), r["processes"]) == (k, p)), key=lambda r: r["devices"])
            text = label(pts[0]) + (f", {p} process{'es' if p > 1 else ''}" if len(process_counts) > 1 else "")
            ax.plot([r["devices"] for r in pts], [value(r) for r in pts], styles[p], color=shades[k], label=text)

    size_order = lambda r: list(SIZES).index(r["size"])
    strong = lambda r: (size_order(r), r["global_batch"])
    params = lambda r: f"{r['size']} ({r['params'] / 1e6:.2f}M)"
    draw(axes[0], strong, lambda r: f"{params(r)}, batch {r['global_batch']}", lambda r: r["tokens_per_s"])
    draw(axes[1], lambda r: (size_order(r), r["global_batch"] // r["devices"]),
         lambda r: f"{params(r)}, {r['global_batch'] // r['devices']} rows/device", lambda r: r["tokens_per_s"])
    draw(axes[2], strong, lambda r: "", lambda r: r["step_time_s"] * 1e3)
    if with_mfu:
        draw(axes[3], strong, lambda r: "", lambda r: 100 * (r["mfu"] or 0))
    titles = ["strong scaling: tokens / s at a fixed global batch", "weak scaling: tokens / s at fixed rows per device",
              "step time (ms), fixed global batch", "model FLOPs utilisation (%)"]
    counts = sorted({r["devices"] for r in rows})
    for i, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_title(title, fontsize=10)
        if i < 3:
            ax.set_yscale("log")  # sizes differ by orders of magnitude
        ax.set_xlabel("devices (all processes)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.grid(alpha=0.3)
    for ax in axes[:2]:  # below the panel: inside it would hide the points
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    first = rows[0]
    note = (" -- forced host devices share the same CPU cores: correctness, not speed"
            if first["backend"] == "cpu" else "")
    strategies = "/".join(sorted({r["parallel"] for r in rows}))
    fig.suptitle(f"{first['model']}, {strategies}, {first['dtype']}{', remat' if first['remat'] else ''}, "
                 f"context {first['context']}, {'/'.join(map(str, process_counts))} process(es); "
                 f"{first['backend']} ({first['device_kind']}){note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def work(args) -> list[dict]:
    """A CPU worker (``--worker N``): every point on N devices over the processes its flags join;
    process 0 prints the rows. A failure among several processes ends this one at once: the exit
    of ``jax.distributed`` would wait for the others at a barrier while they wait for this one."""
    try:
        check_args(args)
        distributed.initialize_from_args(args)
        rows = run_points(args, [args.worker])
    except Exception:
        if not jax.distributed.is_initialized():
            raise
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if jax.process_index() == 0:
        print(RESULT_PREFIX + json.dumps(rows), flush=True)
    return rows


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    if args.worker is not None:
        return work(args)
    check_args(args)
    distributed.initialize_from_args(args)
    if launches_workers(args, jax.default_backend(), jax.process_count()):
        rows = run_cpu_workers(args, argv)
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
