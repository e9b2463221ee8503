"""What every benchmark suite shares: interleaved timing, statistics, the machine, tables, JSON.

Timing rules (docs/design.md, "How to measure"):

* every case is a zero-argument callable that does one unit of work and waits for it
  (``jax.block_until_ready`` / ``loss.item()``), so wall time is the work's time;
* the first call is timed on its own (compile + first run) and reported separately;
* then ``warmup`` untimed calls, then ``rounds`` rounds in which every case runs once, the order
  rotating each round, so a burst of load from other processes hits every case alike and the
  ratios between cases (measured in the same rounds) stay meaningful on a busy machine;
* a case is summarised by its median, min and max wall time and its median process CPU time
  (all threads; on a machine shared with other processes wall time grows with their load while
  CPU time mostly does not, which is the check that a slow number is the machine, not the code).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable


@dataclasses.dataclass
class Stats:
    """Wall seconds per call (``times``) and process CPU seconds per call (``cpu``)."""

    times: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def summary(self, units_per_call: float | None = None, unit: str = "tokens") -> dict[str, Any]:
        """Seconds per call (median, min, max, CPU median) and, given ``units_per_call``, the
        throughput ``<unit>_per_s`` (median) with its range ``<unit>_per_s_min/max``."""
        out = {"n": len(self.times), "median_s": self.median, "min_s": self.min, "max_s": self.max,
               "cpu_median_s": self.cpu_median}
        if units_per_call is not None:
            out[f"{unit}_per_s"] = units_per_call / self.median
            out[f"{unit}_per_s_min"] = units_per_call / self.max
            out[f"{unit}_per_s_max"] = units_per_call / self.min
        return out


def timed_call(fn: Callable[[], Any]) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call of ``fn``."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall0, time.process_time() - cpu0


def first_call(fn: Callable[[], Any]) -> float:
    """Wall seconds of the first call (for a jitted function: trace + compile + one run)."""
    return timed_call(fn)[0]


def interleaved(cases: dict[str, Callable[[], Any]], *, rounds: int, warmup: int = 1) -> dict[str, Stats]:
    """Time every case ``rounds`` times, one call of each per round, rotating the order.

    ``warmup`` untimed calls of each case come first (the first, compiling call should already
    have been made and timed with ``first_call``)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            wall, used = timed_call(cases[name])
            times[name].append(wall)
            cpu[name].append(used)
    return {n: Stats(times[n], cpu[n]) for n in names}


# -- the machine --------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, load, thread settings, XLA flags, devices and library versions."""
    import jax
    import jaxlib

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": load_average(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                               "MKL_NUM_THREADS", "JAX_PLATFORMS")},
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
    }
    for name in ("flax", "optax", "numpy"):
        info[name] = _version(name)
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_interop_threads=torch.get_num_interop_threads(),
                    torch_cuda=torch.cuda.is_available())
    except ImportError:
        info["torch"] = None
    return info


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return None


def load_note(load_before: list[float] | None, cores: int | None) -> str | None:
    """A warning line when other processes loaded the machine during the run, else None."""
    load_after = load_average()
    if not load_before or not load_after or not cores:
        return None
    worst = max(load_before[0], load_after[0])
    if worst <= 0.5 * cores:
        return None
    advice = "" if os.environ.get("OMP_WAIT_POLICY") else (
        " PyTorch's OpenMP threads spin-wait and collapse when another process competes: "
        "set OMP_WAIT_POLICY=PASSIVE for steadier torch numbers.")
    return (f"note: load average {worst:.1f} on {cores} cores (before {load_before[0]:.1f}, after "
            f"{load_after[0]:.1f}): other processes competed, absolute numbers are low and noisy; "
            f"compare the ratios measured in the same rounds.{advice}")


# -- output -------------------------------------------------------------------------------------

def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` are ``(key, header)`` pairs, missing values print as '-'."""
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if value == 0:
                return "0"
            if abs(value) >= 100:
                return f"{value:,.0f}"
            if abs(value) >= 10:
                return f"{value:.1f}"
            return f"{value:.2f}" if abs(value) >= 0.01 else f"{value:.2g}"
        return str(value)

    body = [[cell(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, (_, h) in enumerate(columns)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line([h for _, h in columns]), line(["-" * w for w in widths])] + [line(b) for b in body])


def fmt_range(lo: float | None, hi: float | None) -> str | None:
    """``"lo-hi"`` with thousands separators, for a min-max column."""
    if lo is None or hi is None:
        return None
    return f"{lo:,.0f}-{hi:,.0f}" if hi >= 100 else f"{lo:.2f}-{hi:.2f}"


def write_result(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (directories created; atomic replace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` or None when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b
