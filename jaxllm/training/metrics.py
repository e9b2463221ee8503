"""Metrics on disk: one JSON object per line in ``metrics.jsonl``, a ``summary.json``, a loss PNG.

The processes of a multi-host run share its output directory: every writer here writes on process
0 only (``jaxllm.runio``) and does nothing elsewhere, so a job writes its run files the same way
on one process or many.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from jaxllm.runio import is_first_process, naming_the_file


class MetricsLog:
    """Append-only ``metrics.jsonl``. Rows: ``{"step", "split": "train"|"eval", <metric>: float}``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows or not is_first_process():
            return
        with naming_the_file(self.path), open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """The rows; a line that is not one (cut by a full disk, edited) is refused naming the file and line."""
        if not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or "step" not in row:
                        raise ValueError("not a metrics row")
                except ValueError as exc:
                    raise ValueError(f"{self.path} line {number} is not a metrics row ({exc}): restore the file, or "
                                     "delete that line and the ones after it (a resumed run logs its steps again)"
                                     ) from None
                rows.append(row)
        return rows

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run re-logs them; no duplicates)."""
        if not is_first_process():
            return
        rows = [r for r in self.read() if r["step"] <= step]
        with open(self.path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def _ema(values, alpha: float) -> list[float]:
    out, avg = [], values[0]
    for v in values:
        avg = alpha * v + (1 - alpha) * avg
        out.append(avg)
    return out


def plot_losses(rows: list[dict[str, Any]], png_path: str | os.PathLike, *, title: str = "") -> None:
    """Train loss per step (and eval loss where logged) against step, log-scaled when it spans decades."""
    if not is_first_process():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for split in ("train", "eval"):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("split") == split and "loss" in r]
        pts = [(s, v) for s, v in pts if math.isfinite(v)]
        if not pts:
            continue
        steps, losses = zip(*pts)
        if split == "eval":
            ax.plot(steps, losses, "o-", color="C1", markersize=3, label="eval loss")
        elif len(losses) > 50:  # noisy mini-batch losses: faint raw curve plus a moving average
            ax.plot(steps, losses, color="C0", alpha=0.25, linewidth=0.8)
            ax.plot(steps, _ema(losses, 2 / (len(losses) / 50 + 1)), color="C0", label="train loss (EMA)")
        else:
            ax.plot(steps, losses, color="C0", label="train loss")
    losses = [r["loss"] for r in rows if "loss" in r and math.isfinite(r["loss"]) and r["loss"] > 0]
    if losses and max(losses) / min(losses) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
