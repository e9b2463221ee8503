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

    jaxllm scaling --devices 1,2,4 --batch 8,16 --sizes d64,d256 --steps 10
    jaxllm scaling --processes 1,2 --devices 2,4 --batch 8,16 --sizes d64   # CPU: + 2 processes
    jaxllm scaling --devices 1 --sizes d256,d512 --batch 32,64 --dtype bfloat16 --peak-flops 989e12
"""

from __future__ import annotations

import csv
import dataclasses
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
from jaxllm.options import Compilation, MultiHost, Precision, option
from jaxllm.options.values import int_list, non_negative_int, positive_float, positive_int
from jaxllm.training import distributed
from jaxllm.training.losses import lm_loss
from jaxllm.training.parallel import STRATEGIES, make_strategy
from jaxllm.training.precision import mixed_precision

SIZES = {  # name (its width, apart from the jobs' presets) -> (d_model, layers, heads)
    "d64": (64, 2, 4),
    "d256": (256, 4, 4),
    "d512": (512, 8, 8),
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


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    __doc__ = __doc__
    sizes: str = option("d64,d256", "model sizes among " + ", ".join(
        f"{name} ({d} wide, {layers} layers, {heads} heads)" for name, (d, layers, heads) in SIZES.items()),
        section="model")
    model: str = option("decoder", "decoder: Burkov's (RoPE, RMSNorm); gpt2: learned positions, LayerNorm",
                        choices=("decoder", "gpt2"), section="model")
    context: int = option(128, "tokens per row", type=positive_int, section="model")
    vocab_size: int = option(512, "vocabulary of the synthetic tokens", type=positive_int, section="model")
    # comma-separated lists: their defaults written as they are typed
    device_counts: tuple[int, ...] = option((1, 2, 4), "device counts to sweep, in total over all processes "
                                                       "(comma-separated) (default: 1,2,4)", type=int_list(1),
                                            metavar="DEVICES", section="devices and memory", flag="devices")
    processes: tuple[int, ...] | None = option(
        None, "CPU: process counts to sweep (comma-separated), each on localhost with devices/processes forced "
              "devices per process; elsewhere only the count running (default: 1, or the processes launched by "
              "hand)", type=int_list(1), section="devices and memory")
    batch: tuple[int, ...] = option((8, 16), "global batch sizes (rows per step over all devices, comma-separated) "
                                             "(default: 8,16)", type=int_list(1), section="devices and memory")
    parallel: str = option("auto", "device strategy (auto: single on 1 device, sharded on several)",
                           choices=("auto", *STRATEGIES), section="devices and memory")
    precision: Precision = Precision()
    steps: int = option(10, "timed steps per point", type=positive_int)
    warmup: int = option(2, "untimed steps after the compiling one", type=non_negative_int)
    peak_flops: float | None = option(None, "peak FLOP/s of ONE device (e.g. 989e12 for an H100's dense bf16) for "
                                            "the MFU column", type=positive_float)
    timeout: float = option(3600.0, "CPU: seconds the worker processes of one device and process count may take; "
                                    "then all of them are killed", type=positive_float)
    out: str = option("runs/scaling", "directory for scaling.csv and scaling.png")
    seed: int = option(0, "seed for init and the synthetic batches", type=non_negative_int)
    worker: int | None = option(None, "CPU: the device count of one worker this job launches itself",
                                type=positive_int, hidden=True)
    compilation: Compilation = Compilation()
    hosts: MultiHost = MultiHost()

    @property
    def size_names(self) -> tuple[str, ...]:
        """``--sizes``, split."""
        return tuple(s.strip() for s in self.sizes.split(",") if s.strip())

    def check(self) -> None:
        """What the flags' types cannot say alone: the sizes named, process counts that divide some
        device count (numbers are checked while parsing); a ValueError otherwise."""
        if not self.size_names:
            raise ValueError(f"--sizes names no size (choose among {tuple(SIZES)})")
        for size in self.size_names:
            if size not in SIZES:
                raise ValueError(f"--sizes must be among {tuple(SIZES)}, got {size!r}")
        for p in self.processes or (1,):
            if not any(n % p == 0 for n in self.device_counts):
                raise ValueError(f"--processes {p} divides none of --devices "
                                 f"{','.join(map(str, self.device_counts))}: "
                                 f"every process needs the same number of devices")


def launched_here(backend: str, running: int) -> bool:
    """Whether a run on ``backend`` with ``running`` processes launches localhost CPU workers (a CPU
    run of one process) rather than measuring in the processes running."""
    return backend == "cpu" and running == 1


def process_counts(config: ScalingConfig, backend: str, running: int) -> tuple[int, ...]:
    """The process counts the sweep measures: ``--processes`` (default 1) where this run launches
    its CPU workers, else the ``running`` processes."""
    return (config.processes or (1,)) if launched_here(backend, running) else (running,)


def launches_workers(config: ScalingConfig, backend: str, running: int) -> bool:
    """Whether this run launches localhost CPU workers for ``process_counts`` (a CPU run of one
    process) rather than measuring in the ``running`` processes; a ``--processes`` that the run
    cannot honour, or a one-process strategy over several, is a ValueError."""
    launch = launched_here(backend, running)
    if not launch and config.processes not in (None, (running,)):
        raise ValueError(f"--processes {','.join(map(str, config.processes))}: only a CPU run of one process "
                         f"launches processes itself; this run has {running} process(es) on {backend}, so "
                         f"--processes can only be {running} (or left out)")
    if config.parallel in ONE_PROCESS_STRATEGIES and max(process_counts(config, backend, running)) > 1:
        raise ValueError(f"--parallel {config.parallel} runs in one process; with several processes use sharded, "
                         f"fsdp or shard_map")
    return launch


def measure_point(cfg: ScalingConfig, size: str, config, devices, batch: int) -> dict:
    """Compile, warm up and time one (size, devices, batch) point; returns one CSV row."""
    n = len(devices)
    name = cfg.parallel if cfg.parallel != "auto" else ("sharded" if n > 1 else "single")
    strategy = make_strategy(name, devices=devices)
    optimizer = optax.adamw(1e-3, weight_decay=0.0)
    params = config.init(jax.random.PRNGKey(cfg.seed))
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    state = strategy.place(TrainState.create(params, optimizer, jax.random.PRNGKey(cfg.seed + 1)))
    step = strategy.train_step(mixed_precision(lm_loss(config), cfg.precision.dtype), optimizer)
    rng = np.random.default_rng(cfg.seed)  # every process draws the same global batches
    ids = rng.integers(0, config.vocab_size, (4, batch, cfg.context + 1)).astype(np.int32)
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
    for i in range(cfg.warmup):
        losses.append(run(1 + i))
    times = []
    for i in range(cfg.steps):
        t0 = time.perf_counter()
        losses.append(run(1 + cfg.warmup + i))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = batch * cfg.context
    tps = tokens / step_s
    mfu = 6 * n_params * tps / (cfg.peak_flops * n) if cfg.peak_flops else None
    return {"model": cfg.model, "size": size, "params": n_params, "devices": n,
            "processes": jax.process_count(), "parallel": strategy.name, "dtype": cfg.precision.dtype,
            "remat": cfg.precision.remat, "global_batch": batch, "context": cfg.context, "tokens_per_step": tokens,
            "compile_s": round(compile_s, 3), "step_time_s": step_s, "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / n, "mfu": mfu, "loss_first": losses[0], "loss_last": losses[-1],
            "backend": jax.default_backend(), "device_kind": devices[0].device_kind}


def run_points(cfg: ScalingConfig, counts: list[int]) -> list[dict]:
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
        for size in cfg.size_names:
            config = build_config(cfg.model, size, cfg.vocab_size, cfg.context, cfg.precision.remat)
            for batch in cfg.batch:
                if batch % n:
                    print(f"note: skipping {size} batch {batch} on {n} devices: the batch does not divide by {n}")
                    continue
                row = measure_point(cfg, size, config, available[:n], batch)
                print(f"{size:>8} devices {n:>2}{over} batch {batch:>4}: {row['step_time_s'] * 1e3:8.1f} ms/step "
                      f"{row['tokens_per_s']:10.0f} tokens/s  (compile {row['compile_s']:.1f} s)", flush=True)
                rows.append(row)
    return rows


def run_cpu_workers(cfg: ScalingConfig, argv: list[str], processes: tuple[int, ...]) -> list[dict]:
    """CPU: for each process count P (of ``processes``) and device count N that P divides, P
    localhost workers with N/P forced host devices each run every point over the N devices;
    process 0's rows come back."""
    rows = []
    for p in processes:
        for n in cfg.device_counts:
            if n % p:
                print(f"note: skipping {n} devices over {p} processes: {n} does not divide by {p}")
                continue
            coordinator = f"127.0.0.1:{free_port()}" if p > 1 else None
            what = f"the worker for {n} devices" if p == 1 else f"the workers for {n} devices over {p} processes"
            out = launch([worker(argv, n, p, i, coordinator) for i in range(p)], what, cfg.timeout)
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


def work(cfg: ScalingConfig) -> list[dict]:
    """A CPU worker (``--worker N``): every point on N devices over the processes its flags join
    (joined by ``cli.start``); process 0 prints the rows. A failure among several processes ends this
    one at once: the exit of ``jax.distributed`` would wait for the others at a barrier while they
    wait for this one."""
    try:
        cfg.check()
        rows = run_points(cfg, [cfg.worker])
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
    cfg = cli.parse(ScalingConfig, argv)
    cli.start(cfg)  # the compilation cache, and joining the processes of a multi-host run (no --out to claim)
    if cfg.worker is not None:
        return work(cfg)
    cfg.check()
    backend, running = jax.default_backend(), jax.process_count()
    if launches_workers(cfg, backend, running):
        rows = run_cpu_workers(cfg, argv, process_counts(cfg, backend, running))
    else:
        rows = run_points(cfg, list(cfg.device_counts))
    if not rows:
        raise ValueError("no point of the sweep could run (see the skipped points above)")
    if jax.process_index() == 0:
        os.makedirs(cfg.out, exist_ok=True)
        write_csv(rows, os.path.join(cfg.out, "scaling.csv"))
        plot(rows, os.path.join(cfg.out, "scaling.png"))
        print(f"{len(rows)} points -> {os.path.join(cfg.out, 'scaling.csv')}, {os.path.join(cfg.out, 'scaling.png')}")
    return rows
