"""Raschka app. E: ``LoRALayer``, ``LinearWithLoRA``, ``replace_linear_with_lora``, written as the
book writes them, plus the name mapping to ``jaxllm.nn.lora``'s parameter tree.

    y = linear(x) + (alpha / rank) * (x @ A @ B)      A (in, r) kaiming-uniform(a=sqrt(5)), B (r, out) zeros

The scale is ``alpha / rank`` as in docs/models.md, "LoRA (Raschka app. E)" (and the book's
current code; the first printing multiplied by ``alpha`` alone). kaiming-uniform with a = sqrt(5)
on the ``(in, r)`` tensor has fan_in = r, so ``A ~ U(+-1/sqrt(r))``.

Names: a Linear ``X`` becomes ``X.linear.weight/.bias`` and ``X.lora.A/.B``. In Flax (see
``jaxllm.nn.lora``): ``X/kernel`` (= ``X.linear.weight`` transposed), ``X/bias``, ``X/lora_A``
(same ``(in, r)`` layout), ``X/lora_B``. ``lora_from_torch`` / ``lora_to_torch`` convert, reusing
``jaxllm.interop``'s rule for the base weights.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from flax import traverse_util

from jaxllm import interop
from jaxllm.nn import lora as jlora

_LINEAR = re.compile(r"^(.*)\.linear\.(weight|bias)$")
_LORA = re.compile(r"^(.*)\.lora\.(A|B)$")


class LoRALayer(torch.nn.Module):
    """x (..., in_dim) -> (alpha / rank) * (x @ A @ B): (..., out_dim)."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(in_dim, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # similar to standard weight initialization
        self.B = torch.nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha
        self.rank = rank

    def forward(self, x):
        return (self.alpha / self.rank) * (x @ self.A @ self.B)


class LinearWithLoRA(torch.nn.Module):
    """A frozen-or-not ``nn.Linear`` plus its ``LoRALayer``: ``linear(x) + lora(x)``."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    """Recursively wrap every ``nn.Linear`` of ``model`` in ``LinearWithLoRA`` (in place)."""
    for name, module in model.named_children():
        if isinstance(module, torch.nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)
    return model


def _torch_prefixes(config) -> dict[str, tuple]:
    """torch module prefix (``trf_blocks.0.att.W_query``) -> Flax module path of every Dense."""
    flat = traverse_util.flatten_dict(interop.param_shapes(config))
    return {interop.torch_key((*k[:-1], "kernel"))[: -len(".weight")]: k[:-1]
            for k, v in flat.items() if k[-1] == "kernel" and len(v.shape) == 2}


def lora_from_torch(config, state_dict, *, strict: bool = True) -> dict:
    """A state dict of a twin after ``replace_linear_with_lora`` -> Flax params with LoRA leaves.
    ``strict`` goes to ``interop.from_torch`` for the base weights (GPT-2 twins carry
    ``att.mask`` buffers: drop them with ``torch_ref.gpt2.drop_masks`` or pass ``strict=False``)."""
    base, adapters = {}, {}
    for key, value in state_dict.items():
        lora, linear = _LORA.match(key), _LINEAR.match(key)
        if lora:
            adapters[key] = (lora.group(1), lora.group(2), value)
        elif linear:
            base[f"{linear.group(1)}.{linear.group(2)}"] = value
        else:
            base[key] = value
    params = interop.from_torch(config, base, strict=strict)
    prefixes = _torch_prefixes(config)
    state = {}
    for key, (prefix, which, value) in adapters.items():
        if prefix not in prefixes:
            raise ValueError(f"{key}: {type(config).__name__} has no Linear named {prefix}")
        state["/".join((*prefixes[prefix], f"lora_{which}"))] = _numpy(value)
    if not state:
        raise ValueError("the state dict holds no LoRA weights (X.lora.A / X.lora.B)")
    return jlora.attach_lora(params, state)


def lora_to_torch(config, params) -> dict[str, torch.Tensor]:
    """Flax params with LoRA -> the twin's state dict after ``replace_linear_with_lora`` (no mask
    buffers; load with ``torch_ref.gpt2.load_without_masks`` for GPT-2). Only Dense adapters have
    twin names; raw-weight adapters (``W_Q_lora_A``) raise ``ValueError``."""
    state = jlora.lora_state(params)
    for path in state:
        if path.rsplit("/", 1)[-1] not in (jlora.LORA_A, jlora.LORA_B):
            raise ValueError(f"{path}: an adapter on a raw weight has no twin name (only nn.Linear is wrapped)")
    sd = interop.to_torch(config, jlora.without_lora(params))
    for path, value in state.items():
        *module, leaf = path.split("/")
        prefix = interop.torch_key((*module, "kernel"))[: -len(".weight")]
        for name in ("weight", "bias"):
            if f"{prefix}.{name}" in sd:
                sd[f"{prefix}.linear.{name}"] = sd.pop(f"{prefix}.{name}")
        sd[f"{prefix}.lora.{leaf[-1]}"] = torch.from_numpy(np.array(value, copy=True))
    return sd


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    return np.asarray(value)
