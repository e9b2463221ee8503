"""How close two fp32 implementations of one computation must be: the tolerance policy of the
parity tests and of ``jaxllm compare``.

Two correct fp32 implementations of the same computation differ only by rounding. fp32's unit
roundoff is u = 6e-8; a dot product or sum over K terms evaluated in another order (XLA vs
ATen blocking, AVX2 vs AVX-512 kernels, FMA or not, a GPU's reduction tree) differs by about
sqrt(K) * u times the size of its *terms*, and the difference then flows through every later
operation. So an error is relative to the scale of the tensor, not of each element: an entry near
zero is a sum of terms of the tensor's size and carries their rounding. Every comparison is

    |actual - expected| <= rtol * |expected| + atol * scale,   scale = max(rms(expected), SCALE_FLOOR)

with (rtol, atol) per kind of result:

* OUTPUT -- one forward (logits, hidden states, cached vs full decoding): tens of chained ops of
  K <= a few thousand terms, and a trained-looking network amplifies what enters it: measured
  against a float64 run, the LoRA GPT-2 test's fp32 logits are off by 1.3e-5 of their RMS in
  PyTorch and 2.6e-6 in JAX (each module's own rounding is <= 3e-6 of its scale; the large
  adapters grow it block by block). So two implementations may differ by ~1.5e-5 of the scale:
  rtol = atol = 2e-5. (That test's worst entry, 2.1e-5 on a logit of 1.4 with RMS 1.45, broke a
  pure atol=1e-5 on an AVX-512 Xeon and uses 0.36 of this bound.)
* GRAD -- one backward: twice the chain plus reductions over batch x time, and softmax /
  normalisation backwards subtract nearly equal terms: rtol 1e-4, atol 1e-5 of the scale;
* TRAJECTORY -- losses and parameters after N optimiser steps: the GRAD error of every step,
  with Adam dividing by sqrt(v) (which amplifies it where gradients are tiny): rtol 1e-4,
  atol 1e-5 of the scale. It holds for the tens of steps the parity tests take; over hundreds,
  chaotic training amplifies rounding past it (``jaxllm compare`` reports the step where that
  happens).

SCALE_FLOOR: a tensor whose RMS is far below its terms' size (a gradient that cancels to ~0, a
bias gradient summing softmax gradients) is noise of those terms; 0.1 is the smallest term size
these models produce (initial weights ~ 0.02-1, activations ~ 1), so its atol floor is 1e-6. A GPU
with jax_default_matmul_precision="highest" rounds like this too (fp32 FMAs, another reduction
order).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float  # times the scale of the expected tensor


OUTPUT = Tolerance(rtol=2e-5, atol=2e-5)
GRAD = Tolerance(rtol=1e-4, atol=1e-5)
TRAJECTORY = Tolerance(rtol=1e-4, atol=1e-5)
SCALE_FLOOR = 0.1


def scale_of(expected) -> float:
    """The size the rounding of ``expected``'s computation is relative to: its RMS, at least SCALE_FLOOR."""
    expected = np.asarray(expected, np.float64)
    rms = float(np.sqrt(np.mean(np.square(expected)))) if expected.size else 0.0
    return max(rms, SCALE_FLOOR)


def allowed(expected, tol: Tolerance) -> np.ndarray:
    """The largest ``|actual - expected|`` ``tol`` allows, per element: ``rtol |expected| + atol scale``."""
    e = np.asarray(expected, np.float64)
    return tol.rtol * np.abs(e) + tol.atol * scale_of(e)


def bound_used(actual, expected, tol: Tolerance) -> float:
    """The largest ``|actual - expected| / (rtol |expected| + atol scale)``: at most 1 where ``actual``
    is within ``tol`` of ``expected``, 0 where they are equal."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {e.shape}")
    if not a.size:
        return 0.0
    return float(np.max(np.abs(a - e) / allowed(e, tol)))
