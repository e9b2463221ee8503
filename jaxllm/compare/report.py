"""A comparison's outputs: ``compare.json`` (everything ``engine.run`` measured), ``compare.png``
(losses overlaid, their difference and the parameter drift on a log scale, speeds), TensorBoard
scalars under ``jax/``, ``torch/`` and ``diff/``, and a short text report."""

from __future__ import annotations

import json
import math
import os

from jaxllm.runio import write_atomically
from jaxllm.tolerance import Tolerance, allowed

SIDE_LABELS = {"jax": "JAX jit", "torch": "PyTorch eager", "torch_compile": "torch.compile"}


def event_rows(row: dict) -> list[dict]:
    """A step's row as TensorBoard rows: ``jax/loss``, ``torch/loss`` (``torch_compile/loss``),
    ``diff/loss``, ``diff/drift_max``, ``diff/drift_rms``."""
    sides = [{"step": row["step"], "split": side, "loss": row[side]} for side in SIDE_LABELS if side in row]
    return [*sides, {"step": row["step"], "split": "diff", "loss": row["diff"], "drift_max": row["drift_max"],
                     "drift_rms": row["drift_rms"]}]


def write(result: dict, out: str) -> None:
    write_atomically(os.path.join(out, "compare.json"), json.dumps(result, indent=1) + "\n")
    plot(result, os.path.join(out, "compare.png"))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
    losses, diff, drift, speed = axes.flat
    for side, style in (("jax", "-"), ("torch", "--"), ("torch_compile", ":")):
        if side in rows[0]:
            losses.plot(steps, [r[side] for r in rows], style, label=SIDE_LABELS[side])
    losses.set(title=f"{result['title']}: loss ({result['dtype']})", xlabel="step", ylabel="loss")
    losses.legend()
    positive = lambda values: [v if v > 0 else math.nan for v in values]  # zero differences: no point on a log axis
    diff.plot(steps, positive([r["diff"] for r in rows]), label="|JAX - PyTorch| loss")
    tol = Tolerance(**result["tolerance"])
    diff.plot(steps, [float(allowed(r["torch"], tol)) for r in rows], ":", color="gray", label="parity tolerance")
    if result["parted_at_step"]:
        diff.axvline(result["parted_at_step"], color="C3", alpha=0.5, label=f"parted at step {result['parted_at_step']}")
    diff.set(title="loss difference", xlabel="step", yscale="log")
    diff.legend(fontsize=8)
    drift.plot(steps, positive([r["drift_max"] for r in rows]), label="max |JAX - PyTorch|")
    drift.plot(steps, positive([r["drift_rms"] for r in rows]), label="RMS")
    drift.set(title="parameter drift", xlabel="step", yscale="log")
    drift.legend(fontsize=8)
    names = [s for s in SIDE_LABELS if s in result["speed"]]
    values = [result["speed"][s]["units_per_s"] or 0 for s in names]
    speed.bar([SIDE_LABELS[s] for s in names], values, color=[f"C{i}" for i in range(len(names))])
    speed.set(title=f"{result['unit']} per second (median step)", ylabel=f"{result['unit']}/s")
    for i, v in enumerate(values):
        speed.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    with open(path + ".tmp", "wb") as f:
        fig.savefig(f, format="png")
    os.replace(path + ".tmp", path)
    plt.close(fig)


def text(result: dict) -> str:
    """The report printed at the end."""
    rows, last = result["rows"], result["rows"][-1]
    parted = result["parted_at_step"]
    lines = [f"{result['title']}, {result['steps']} steps, {result['dtype']}, {result['optimizer']}:"]
    lines.append(f"  final loss: JAX {last['jax']:.6g}, PyTorch {last['torch']:.6g} (difference {last['diff']:.2e})")
    lines.append("  trajectories: " + (f"parted at step {parted} (loss difference beyond the parity tolerance, "
                                       f"rtol {result['tolerance']['rtol']:g}, atol {result['tolerance']['atol']:g})"
                                       if parted else "within the parity tolerance at every step"))
    lines.append(f"  parameter drift at the end: max {last['drift_max']:.2e}, RMS {last['drift_rms']:.2e} "
                 f"(step 1: max {rows[0]['drift_max']:.2e})")
    grads = result["gradients_at_step_0"]
    worst = max(grads, key=lambda n: grads[n]["relative"])
    outside = [n for n, g in grads.items() if not g["within"]]
    lines.append(f"  gradients at step 0: worst {worst} ({grads[worst]['relative']:.2e} of its scale); "
                 + (f"{len(outside)} of {len(grads)} beyond the tolerance" if outside else "all within the tolerance"))
    for side, s in result["speed"].items():
        lines.append(f"  {SIDE_LABELS[side]:>14}: {s['units_per_s']:,.0f} {result['unit']}/s, first step "
                     f"{s['first_step_s']:.2f} s")
    if "continuation" in result:
        c = result["continuation"]
        lines.append(f"  greedy continuations of {c['prompt']!r} ({c['tokens']} tokens): "
                     + ("identical" if c["identical"] else f"differ\n    JAX:     {c['jax']!r}\n"
                                                           f"    PyTorch: {c['torch']!r}"))
    return "\n".join(lines)
