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
