"""Helpers for comparing a Flax model with its PyTorch twin (weights copied through interop)."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import torch

from jaxllm import interop

# --- the tolerance policy of every parity test ------------------------------------------------
#
# Two correct fp32 implementations of the same computation differ only by rounding. fp32's unit
# roundoff is u = 6e-8; a dot product or sum over K terms evaluated in another order (XLA vs
# ATen blocking, AVX2 vs AVX-512 kernels, FMA or not, a GPU's reduction tree) differs by about
# sqrt(K) * u times the size of its *terms*, and the difference then flows through every later
# operation. So an error is relative to the scale of the tensor, not of each element: an entry near
# zero is a sum of terms of the tensor's size and carries their rounding. Every comparison is
#
#     |actual - expected| <= rtol * |expected| + atol * scale,   scale = max(rms(expected), SCALE_FLOOR)
#
# with (rtol, atol) per kind of result:
#   * OUTPUT -- one forward (logits, hidden states, cached vs full decoding): tens of chained
#     ops of K <= a few thousand terms, and a trained-looking network amplifies what enters it:
#     measured against a float64 run, the LoRA GPT-2 test's fp32 logits are off by 1.3e-5 of
#     their RMS in PyTorch and 2.6e-6 in JAX (each module's own rounding is <= 3e-6 of its scale;
#     the large adapters grow it block by block). So two implementations may differ by ~1.5e-5 of
#     the scale: rtol = atol = 2e-5. (That test's worst entry, 2.1e-5 on a logit of 1.4 with RMS
#     1.45, broke the old pure atol=1e-5 on an AVX-512 Xeon and uses 0.36 of this bound.)
#   * GRAD -- one backward: twice the chain plus reductions over batch x time, and softmax /
#     normalisation backwards subtract nearly equal terms: rtol 1e-4, atol 1e-5 of the scale;
#   * TRAJECTORY -- losses and parameters after N optimiser steps: the GRAD error of every step,
#     with Adam dividing by sqrt(v) (which amplifies it where gradients are tiny): rtol 1e-4,
#     atol 1e-5 of the scale.
# SCALE_FLOOR: a tensor whose RMS is far below its terms' size (a gradient that cancels to ~0, a
# bias gradient summing softmax gradients) is noise of those terms; 0.1 is the smallest term size
# these models produce (initial weights ~ 0.02-1, activations ~ 1), so its atol floor is 1e-6 -- the
# old fixed gradient atol. A GPU with jax_default_matmul_precision="highest" rounds like this too
# (fp32 FMAs, another reduction order); the last H100 run passed the old fixed tolerances, this
# policy has not been run on a GPU yet.


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


def assert_close(actual, expected, tol: Tolerance, *, err_msg: str = "") -> None:
    """``actual`` equals ``expected`` to what fp32 rounding explains for this kind of result (see above)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    atol = tol.atol * scale_of(expected)
    _report(actual, expected, tol.rtol, atol, err_msg)
    np.testing.assert_allclose(actual, expected, rtol=tol.rtol, atol=atol, err_msg=err_msg)


def _report(actual, expected, rtol, atol, what) -> None:
    """With JAXLLM_TOLERANCE_REPORT=FILE, append how much of its bound each comparison used (the
    margin a new CPU or GPU has before a parity test fails)."""
    path = os.environ.get("JAXLLM_TOLERANCE_REPORT")
    if not path or actual.shape != expected.shape or not actual.size:
        return
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    used = float(np.max(np.abs(a - e) / (rtol * np.abs(e) + atol)))
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with open(path, "a") as f:
        f.write(f"{used:.4f}\t{test}\t{what}\n")


def to_numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def torch_grads(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: p.grad.detach().numpy().copy() for name, p in module.named_parameters()}


def assert_same_tensors(jax_tree, torch_named: dict[str, np.ndarray], tol: Tolerance, *, what: str):
    """Compare a Flax-layout pytree with torch-named tensors, name by name."""
    converted = interop.to_torch_numpy(jax.device_get(jax_tree))
    assert set(converted) == set(torch_named), f"{what}: names differ {set(converted) ^ set(torch_named)}"
    for name, value in converted.items():
        assert_close(value, torch_named[name], tol, err_msg=f"{what}: {name}")


def run_both_trajectories(train_step, state, twin: torch.nn.Module, torch_opt, torch_loss, batches):
    """The same batches through a jitted JAX train step and the twin's five-step loop.

    Returns ``(final_state, jax_losses, torch_losses)``; ``torch_loss(twin, batch)`` is the twin's loss.
    """
    jax_losses = []
    for batch in batches:
        state, metrics = train_step(state, batch)
        jax_losses.append(float(metrics["loss"]))
    torch_losses = []
    for batch in batches:
        torch_opt.zero_grad()
        loss = torch_loss(twin, batch)
        loss.backward()
        torch_opt.step()
        torch_losses.append(loss.item())
    return state, jax_losses, torch_losses
