"""Helpers for comparing a Flax model with its PyTorch twin (weights copied through interop)."""

from __future__ import annotations

import jax
import numpy as np
import torch

from jaxllm import interop

OUT_ATOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-6


def to_numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def torch_grads(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: p.grad.detach().numpy().copy() for name, p in module.named_parameters()}


def assert_same_tensors(jax_tree, torch_named: dict[str, np.ndarray], *, rtol, atol, what: str):
    """Compare a Flax-layout pytree with torch-named tensors, name by name."""
    converted = interop.to_torch_numpy(jax.device_get(jax_tree))
    assert set(converted) == set(torch_named), f"{what}: names differ {set(converted) ^ set(torch_named)}"
    for name, value in converted.items():
        np.testing.assert_allclose(value, torch_named[name], rtol=rtol, atol=atol, err_msg=f"{what}: {name}")


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
