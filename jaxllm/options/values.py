"""Flag value types: each turns the text a user typed (or a config.yaml value, as text) into a
checked value, or raises ``argparse.ArgumentTypeError`` with the reason -- printed as ``error:
argument --steps: must be >= 1, got 0`` before any data is read or anything written."""

from __future__ import annotations

import argparse
import os
from typing import Callable


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
