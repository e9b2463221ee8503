"""Helpers for comparing a Flax model with its PyTorch twin (weights copied through interop)."""

from __future__ import annotations

import os

import jax
import numpy as np
import torch

from jaxllm import interop
# the tolerance policy of every parity test (jaxllm/tolerance.py says why each bound is what it is)
from jaxllm.tolerance import GRAD, OUTPUT, TRAJECTORY, Tolerance, bound_used, scale_of  # noqa: F401


def assert_close(actual, expected, tol: Tolerance, *, err_msg: str = "") -> None:
    """``actual`` equals ``expected`` to what fp32 rounding explains for this kind of result."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    atol = tol.atol * scale_of(expected)
    _report(actual, expected, tol, err_msg)
    np.testing.assert_allclose(actual, expected, rtol=tol.rtol, atol=atol, err_msg=err_msg)


def _report(actual, expected, tol, what) -> None:
    """With JAXLLM_TOLERANCE_REPORT=FILE, append how much of its bound each comparison used (the
    margin a new CPU or GPU has before a parity test fails)."""
    path = os.environ.get("JAXLLM_TOLERANCE_REPORT")
    if not path or actual.shape != expected.shape or not actual.size:
        return
    used = bound_used(actual, expected, tol)
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
