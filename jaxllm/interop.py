"""PyTorch state dicts <-> Flax params, by rule rather than by per-model tables.

The Flax models name their parameters after the twin's ``state_dict`` (docs/design.md,
"Functional conventions"), so one rule maps every family:

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
    return config.param_shapes()


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


# --------------------------------------------------------------------------------------------
# Hugging Face checkpoints (GPT-2, Llama) <-> Flax params.
#
# Hugging Face names do not follow the twins' rule, so each language-model config carries its
# mapping (jaxllm.models.lm): ``hf_param_table()`` lists (Flax path, HF key, how the tensor maps):
# "same" (HF GPT-2's Conv1D weights are already x@W), "T" (nn.Linear (out, in) -> x@W (in, out))
# or ("split", j, n) (column block j of n: GPT-2's fused c_attn); ``hf_state_in`` /
# ``hf_state_out`` handle tying and prefixes; ``hf_mismatches`` compares configs. What is here
# applies them by rule. The Flax tree of the config still drives the check, so a missing,
# unexpected or mis-shaped tensor is named by its HF key. torch / safetensors load lazily.
# --------------------------------------------------------------------------------------------

_HF_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|(^|\.)rotary_emb\.inv_freq$")


def load_hf_state_dict(source) -> dict[str, np.ndarray]:
    """A local HF checkpoint directory (``model.safetensors`` or ``pytorch_model.bin``, the latter
    read with ``torch.load(..., weights_only=True)``), a single such file, or an already-loaded
    mapping -> ``{key: numpy array}``. Sharded checkpoints are not supported. Nothing downloads.
    A truncated or corrupt file, or a pickle holding anything but tensors (refused by the
    weights-only unpickler before anything in it runs), raises ``ValueError`` naming the file."""
    import os

    if isinstance(source, Mapping):
        return {k: _as_numpy(v) for k, v in source.items()}
    path = os.fspath(source)
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{source}: no model.safetensors or pytorch_model.bin "
                                    "(sharded checkpoints are not supported)")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except SafetensorError as exc:  # truncated or not a safetensors file
            raise ValueError(f"{path} is not a valid safetensors file: {exc}") from exc
    import pickle

    import torch

    try:  # weights_only: a pickle that would import or call anything else is refused, never run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = re.search(r"Unsupported global: GLOBAL (\S+)|WeightsUnpickler error: ([^\n]+)", str(exc))
        reason = f" (it wants {reason.group(1)})" if reason and reason.group(1) else (
            f" ({reason.group(2).strip()})" if reason else "")
        raise ValueError(f"{path} is not a weights-only PyTorch checkpoint{reason}: refused, nothing in it "
                         "was run") from exc
    except (RuntimeError, EOFError, KeyError, ValueError) as exc:  # truncated or not a torch.save file
        raise ValueError(f"{path} is not a valid PyTorch checkpoint (truncated or corrupt?): {exc!r}") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: _as_numpy(v) for k, v in state.items()}


def _read_hf_config(source, hf_config) -> dict | None:
    """``hf_config`` (a dict or a ``transformers`` config), else ``config.json`` beside the weights."""
    import json
    import os

    if hf_config is not None:
        return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if isinstance(source, Mapping):
        return None
    path = os.fspath(source)
    path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def _check_hf_config(config, hf: dict | None) -> None:
    """Raise ``ValueError`` naming every field where ``config`` and the HF config differ."""
    problems = config.hf_mismatches(hf)
    if problems:
        raise ValueError(f"{type(config).__name__} does not match the HF checkpoint: " + "; ".join(problems))


def _apply(transform, value: np.ndarray) -> np.ndarray:
    if transform == "same":
        return value
    if transform == "T":
        return value.T if value.ndim == 2 else value  # a 1-d tensor is left for the shape check
    _, j, n = transform
    if value.shape[-1] % n:
        return value  # the shape check reports it
    width = value.shape[-1] // n
    return value[..., j * width:(j + 1) * width]


def from_hf(config, source, *, hf_config=None, strict: bool = True) -> Params:
    """A local Hugging Face checkpoint -> Flax params for ``config``, a language-model config with a
    Hugging Face mapping (``GPT2Config`` with ``qkv_bias=True`` for ``GPT2LMHeadModel``, a
    llama-layout ``TransformerConfig`` for ``LlamaForCausalLM``).

    ``source``: a directory holding ``model.safetensors`` or ``pytorch_model.bin`` (``torch.load``
    with ``weights_only=True``), one such file, or a loaded state dict (torch tensors or numpy).
    The HF config (``hf_config``, or ``config.json`` beside the weights when present) is checked
    field by field against ``config``. The config's ``hf_state_in`` handles prefixes and tying
    (GPT-2 keys may carry ``transformer.``; HF ties GPT-2's ``lm_head`` to ``wte``: an untied
    ``config`` gets ``lm_head.weight`` when the checkpoint has it, else ``wte``; a tied one drops
    ``lm_head.weight``, which must then equal the embedding); buffers (``attn.bias``,
    ``rotary_emb.inv_freq``) are ignored. Raises ``ValueError`` naming every missing key, every
    unexpected key (when ``strict``), and any tensor whose shape does not fit.
    """
    _check_hf_config(config, _read_hf_config(source, hf_config))
    state = {k: v for k, v in load_hf_state_dict(source).items() if not _HF_IGNORED.search(k)}
    state = config.hf_state_in(state)
    paths, shapes, treedef = _paths(param_shapes(config))
    table = {path: (key, transform) for path, key, transform in config.hf_param_table()}
    needed = {key for key, _ in table.values()}
    missing = sorted(k for k in needed if k not in state)
    unexpected = sorted(set(state) - needed) if strict else []
    if missing or unexpected or set(table) != set(paths):
        raise ValueError(f"HF state dict does not match {type(config).__name__}: "
                         f"missing {missing or 'nothing'}; unexpected {unexpected or 'nothing'}")
    leaves = []
    for path, shape in zip(paths, shapes):
        key, transform = table[path]
        value = _apply(transform, state[key])
        if value.shape != shape.shape:
            raise ValueError(f"{key}: expected a tensor that maps to Flax {'/'.join(path)} of shape "
                             f"{shape.shape}, got HF shape {tuple(state[key].shape)}")
        leaves.append(jax.numpy.asarray(np.asarray(value, dtype=shape.dtype)))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def to_hf(config, params: Params) -> dict[str, np.ndarray]:
    """Flax params -> ``{HF key: numpy array}`` in the names and layouts of the config's Hugging
    Face model (``GPT2LMHeadModel``, ``LlamaForCausalLM``), as its ``state_dict`` lists them (a tied
    head included). Load with ``model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)``;
    ``config.to_hf_config()`` is the matching HF config."""
    _check_hf_config(config, None)
    paths, leaves, _ = _paths(params)
    flat = dict(zip(paths, leaves))
    table = config.hf_param_table()
    expected = {p for p, _, _ in table}
    if set(flat) != expected:
        raise ValueError(f"params do not match {type(config).__name__}: missing "
                         f"{sorted('/'.join(p) for p in expected - set(flat))}, unexpected "
                         f"{sorted('/'.join(p) for p in set(flat) - expected)}")
    state = {}
    for path, key, transform in table:
        value = _unapply(transform, np.asarray(flat[path]))
        state[key] = value if not isinstance(transform, tuple) else _join(state.get(key), value, transform)
    return config.hf_state_out({k: np.array(v, order="C", copy=True) for k, v in state.items()})


def _unapply(transform, value: np.ndarray) -> np.ndarray:
    """The inverse of ``_apply`` for one Flax tensor (a split's block is placed by ``_join``)."""
    if transform == "T":
        return value.T if value.ndim == 2 else value
    return value


def _join(current, block: np.ndarray, transform) -> np.ndarray:
    """Place column block j of n (``("split", j, n)``) into the fused HF tensor being built."""
    _, j, n = transform
    width = block.shape[-1]
    if current is None:
        current = np.zeros(block.shape[:-1] + (width * n,), block.dtype)
    current[..., j * width:(j + 1) * width] = block
    return current


def interleaved_to_rotate_half_params(config, params: Params) -> Params:
    """A ``TransformerConfig`` model's params for interleaved RoPE -> the same model's params for
    rotate-half RoPE (``dataclasses.replace(config, rope="rotate_half")``): each head's W_Q and W_K
    output columns are permuted by ``nn.rope.interleaved_to_half(head_dim)``. RoPE rotates the same
    pairs, now at lanes ``(i, i + d/2)`` instead of ``(2i, 2i+1)``, and q·k is unchanged by permuting
    both alike, so attention scores and logits are the same. Works for both Q/K/V layouts."""
    from jaxllm.nn.rope import interleaved_to_half

    if config.rope != "interleaved":
        raise ValueError(f"config.rope must be 'interleaved', got {config.rope!r}")
    dh = config.head_dim
    perm = interleaved_to_half(dh)

    def per_head_columns(w, heads):
        w = np.asarray(w)
        idx = (np.arange(heads)[:, None] * dh + perm[None, :]).reshape(-1)
        return jax.numpy.asarray(w[:, idx])

    out = jax.tree_util.tree_map(lambda x: x, params)  # a fresh tree with the same leaves
    out = dict(out)
    for i in range(config.num_layers):
        layer = dict(out[f"layers_{i}"])
        attn = dict(layer["attn"])
        if config.qkv_layout == "per_head":
            for h in range(config.num_heads):
                head = dict(attn[f"heads_{h}"])
                head["W_Q"] = per_head_columns(head["W_Q"], 1)
                head["W_K"] = per_head_columns(head["W_K"], 1)
                attn[f"heads_{h}"] = head
        else:
            attn["W_Q"] = per_head_columns(attn["W_Q"], config.num_heads)
            attn["W_K"] = per_head_columns(attn["W_K"], config.kv_heads)
        layer["attn"] = attn
        out[f"layers_{i}"] = layer
    return out
