"""PyTorch state dicts <-> Flax params, by rule rather than by per-model tables.

The Flax models name their parameters after the twin's ``state_dict`` (DESIGN.md), so one
rule maps every family:

* module path: Flax ``trf_blocks_0/att`` <-> torch ``trf_blocks.0.att`` (a list index that Flax
  writes as ``name_N`` is torch's ``name.N``); a bare index (``0``) is an ``nn.Sequential`` slot;
* leaf ``kernel`` <-> ``weight``: a dense kernel ``(in, out)`` is the transpose of
  ``nn.Linear.weight (out, in)``; a conv kernel ``(kh, kw, in, out)`` is ``Conv2d.weight
  (out, in, kh, kw)`` permuted;
* leaf ``embedding`` <-> ``weight`` unchanged; every other leaf (``bias``, ``scale``, the books'
  x@W-layout matrices such as ``W_Q``) keeps its name and layout.

The Flax parameter tree of ``config`` (from ``jax.eval_shape``, nothing allocated) drives the
conversion, so a missing, unexpected or mis-shaped tensor is reported by name.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

Params = dict[str, Any]

_LIST_ITEM = re.compile(r"^(.+)_(\d+)$")


def param_shapes(config) -> Params:
    """The Flax parameter tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves."""
    model = config.build()
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), config.example_input()))
    return variables["params"]


def torch_key(path: tuple[str, ...]) -> str:
    """Flax path ``("trf_blocks_0", "att", "kernel")`` -> torch key ``"trf_blocks.0.att.weight"``."""
    *modules, leaf = path
    parts = []
    for name in modules:
        m = _LIST_ITEM.match(name)
        parts.extend([m.group(1), m.group(2)] if m else [name])
    parts.append("weight" if leaf in ("kernel", "embedding") else leaf)
    return ".".join(parts)


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    return value


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    return value


def _as_numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):  # a torch.Tensor, without importing torch
        tensor = tensor.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        tensor = tensor.numpy()
    return np.asarray(tensor)


def _paths(tree: Params):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [tuple(k.key for k in path) for path, _ in flat]
    return paths, [leaf for _, leaf in flat], treedef


def from_torch(config, state_dict: Mapping[str, Any], *, strict: bool = True) -> Params:
    """A twin's (= the book's) ``state_dict`` -> Flax params for ``config``.

    Tensors may be torch tensors or numpy arrays. Raises ``ValueError`` naming every missing key,
    every unexpected key (when ``strict``) and any shape that does not fit the config.
    """
    paths, shapes, treedef = _paths(param_shapes(config))
    keys = [torch_key(p) for p in paths]
    missing = [k for k in keys if k not in state_dict]
    unexpected = sorted(set(state_dict) - set(keys)) if strict else []
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match {type(config).__name__}: "
            f"missing {missing or 'nothing'}; unexpected {unexpected or 'nothing'}"
        )
    leaves = []
    for path, key, shape in zip(paths, keys, shapes):
        value = _to_flax_layout(path[-1], _as_numpy(state_dict[key]))
        if value.shape != shape.shape:
            raise ValueError(
                f"{key}: expected a tensor that maps to Flax shape {shape.shape}, got torch shape "
                f"{tuple(_as_numpy(state_dict[key]).shape)}"
            )
        leaves.append(np.asarray(value, dtype=shape.dtype))
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(v) for v in leaves])


def to_torch_numpy(params: Params) -> dict[str, np.ndarray]:
    """Flax params -> ``{torch_key: numpy array in torch layout}`` (no torch needed)."""
    paths, leaves, _ = _paths(params)
    return {
        torch_key(p): np.ascontiguousarray(_to_torch_layout(p[-1], np.asarray(v)))
        for p, v in zip(paths, leaves)
    }


def to_torch(config, params: Params) -> dict[str, "Any"]:
    """Flax params -> a ``state_dict`` of torch tensors that the twin loads with ``strict=True``."""
    import torch

    paths, shapes, _ = _paths(param_shapes(config))
    expected = {torch_key(p) for p in paths}
    converted = to_torch_numpy(params)
    if set(converted) != expected:
        raise ValueError(
            f"params do not match {type(config).__name__}: missing "
            f"{sorted(expected - set(converted))}, unexpected {sorted(set(converted) - expected)}"
        )
    return {k: torch.from_numpy(v.copy()) for k, v in converted.items()}
