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


# --------------------------------------------------------------------------------------------
# Hugging Face checkpoints (GPT-2, Llama) <-> Flax params.
#
# Hugging Face names do not follow the twins' rule, so each family has a table of
# (Flax path, HF key, how the tensor maps): "same" (HF GPT-2's Conv1D weights are already x@W),
# "T" (nn.Linear (out, in) -> x@W (in, out)) or ("split", j, n) (column block j of n: GPT-2's
# fused c_attn). The Flax tree of the config still drives the check, so a missing, unexpected or
# mis-shaped tensor is named by its HF key. torch / safetensors / transformers load lazily.
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


def _hf_rope_theta(hf: dict):
    if "rope_theta" in hf and hf["rope_theta"] is not None:
        return hf["rope_theta"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"HF rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    return rope.get("rope_theta")


def _check_hf_config(config, hf: dict | None) -> None:
    """Raise ``ValueError`` naming every field where ``config`` and the HF config differ."""
    from jaxllm.models.gpt2 import GPT2Config
    from jaxllm.models.transformer import TransformerConfig

    problems = []

    def want(name, ours, theirs, close=False):
        if theirs is None:
            return
        same = np.isclose(float(ours), float(theirs), rtol=1e-6, atol=0) if close else ours == theirs
        if not same:
            problems.append(f"{name}: ours {ours!r}, HF {theirs!r}")

    if isinstance(config, GPT2Config):
        if not config.qkv_bias:
            problems.append("qkv_bias: HF GPT-2 has Q/K/V biases, so the config needs qkv_bias=True")
        if hf is not None:
            want("vocab_size", config.vocab_size, hf.get("vocab_size"))
            want("context_length (n_positions)", config.context_length, hf.get("n_positions"))
            want("emb_dim (n_embd)", config.emb_dim, hf.get("n_embd"))
            want("n_heads (n_head)", config.n_heads, hf.get("n_head"))
            want("n_layers (n_layer)", config.n_layers, hf.get("n_layer"))
            want("layer_norm_epsilon", 1e-5, hf.get("layer_norm_epsilon"), close=True)
            if hf.get("n_inner") not in (None, 4 * config.emb_dim):
                problems.append(f"n_inner: ours {4 * config.emb_dim}, HF {hf['n_inner']}")
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                problems.append(f"activation_function: ours tanh GELU (gelu_new), HF {act!r}")
            for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
                if hf.get(flag):
                    problems.append(f"{flag}=True is not supported")
            if hf.get("scale_attn_weights") is False:
                problems.append("scale_attn_weights=False is not supported")
    elif isinstance(config, TransformerConfig):
        layout = dict(qkv_layout="fused", rope="rotate_half", mlp="swiglu", use_bias=False, final_norm=True)
        for name, value in layout.items():
            if getattr(config, name) != value:
                problems.append(f"{name}: the Llama layout needs {value!r}, got {getattr(config, name)!r}")
        if hf is not None:
            want("vocab_size", config.vocab_size, hf.get("vocab_size"))
            want("d_model (hidden_size)", config.d_model, hf.get("hidden_size"))
            want("num_heads (num_attention_heads)", config.num_heads, hf.get("num_attention_heads"))
            want("kv_heads (num_key_value_heads)", config.kv_heads,
                 hf.get("num_key_value_heads") or hf.get("num_attention_heads"))
            want("num_layers (num_hidden_layers)", config.num_layers, hf.get("num_hidden_layers"))
            want("mlp_hidden (intermediate_size)", config.hidden_dim, hf.get("intermediate_size"))
            want("norm_eps (rms_norm_eps)", config.norm_eps, hf.get("rms_norm_eps"), close=True)
            want("rope_base (rope_theta)", config.rope_base, _hf_rope_theta(hf), close=True)
            want("head_dim", config.head_dim, hf.get("head_dim"))
            want("tie_embeddings (tie_word_embeddings)", config.tie_embeddings, hf.get("tie_word_embeddings"))
            want("hidden_act", "silu", hf.get("hidden_act"))
            for flag in ("attention_bias", "mlp_bias"):
                if hf.get(flag):
                    problems.append(f"{flag}=True is not supported")
    else:
        raise TypeError(f"no Hugging Face mapping for {type(config).__name__}")
    if problems:
        raise ValueError(f"{type(config).__name__} does not match the HF checkpoint: " + "; ".join(problems))


def _hf_table(config) -> list[tuple[tuple[str, ...], str, Any]]:
    """(Flax path, HF key, transform) for every Flax parameter of ``config``."""
    from jaxllm.models.gpt2 import GPT2Config

    table = []
    if isinstance(config, GPT2Config):
        table += [(("tok_emb", "embedding"), "wte.weight", "same"),
                  (("pos_emb", "embedding"), "wpe.weight", "same")]
        for i in range(config.n_layers):
            b, h = f"trf_blocks_{i}", f"h.{i}"
            for j, name in enumerate(("W_query", "W_key", "W_value")):
                table += [((b, "att", name, "kernel"), f"{h}.attn.c_attn.weight", ("split", j, 3)),
                          ((b, "att", name, "bias"), f"{h}.attn.c_attn.bias", ("split", j, 3))]
            table += [((b, "att", "out_proj", "kernel"), f"{h}.attn.c_proj.weight", "same"),
                      ((b, "att", "out_proj", "bias"), f"{h}.attn.c_proj.bias", "same"),
                      ((b, "ff", "layers_0", "kernel"), f"{h}.mlp.c_fc.weight", "same"),
                      ((b, "ff", "layers_0", "bias"), f"{h}.mlp.c_fc.bias", "same"),
                      ((b, "ff", "layers_2", "kernel"), f"{h}.mlp.c_proj.weight", "same"),
                      ((b, "ff", "layers_2", "bias"), f"{h}.mlp.c_proj.bias", "same")]
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                table += [((b, ours, "scale"), f"{h}.{theirs}.weight", "same"),
                          ((b, ours, "shift"), f"{h}.{theirs}.bias", "same")]
        table += [(("final_norm", "scale"), "ln_f.weight", "same"),
                  (("final_norm", "shift"), "ln_f.bias", "same")]
        if not config.tie_embeddings:
            table.append((("out_head", "kernel"), "lm_head.weight", "T"))
        return table
    table.append((("embedding", "embedding"), "model.embed_tokens.weight", "same"))
    for i in range(config.num_layers):
        b, h = f"layers_{i}", f"model.layers.{i}"
        for ours, theirs in (("W_Q", "q_proj"), ("W_K", "k_proj"), ("W_V", "v_proj"), ("W_O", "o_proj")):
            table.append(((b, "attn", ours), f"{h}.self_attn.{theirs}.weight", "T"))
        for ours, theirs in (("W_1", "gate_proj"), ("W_3", "up_proj"), ("W_2", "down_proj")):
            table.append(((b, "mlp", ours), f"{h}.mlp.{theirs}.weight", "T"))
        table += [((b, "norm1", "scale"), f"{h}.input_layernorm.weight", "same"),
                  ((b, "norm2", "scale"), f"{h}.post_attention_layernorm.weight", "same")]
    table.append((("final_norm", "scale"), "model.norm.weight", "same"))
    if not config.tie_embeddings:
        table.append((("output",), "lm_head.weight", "T"))
    return table


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
    """A local Hugging Face checkpoint -> Flax params for ``config``.

    ``config``: a ``GPT2Config`` (HF ``GPT2LMHeadModel``; needs ``qkv_bias=True``) or a Llama-layout
    ``TransformerConfig`` (``transformer.llama(...)``; HF ``LlamaForCausalLM``). ``source``: a
    directory holding ``model.safetensors`` or ``pytorch_model.bin`` (``torch.load`` with
    ``weights_only=True``), one such file, or a loaded state dict (torch tensors or numpy). The HF
    config (``hf_config``, or ``config.json`` beside the weights when present) is checked field by
    field against ``config``. GPT-2 keys may carry the ``transformer.`` prefix or not; its
    ``attn.bias`` / ``attn.masked_bias`` buffers are ignored. HF ties GPT-2's ``lm_head`` to
    ``wte``: an untied ``config`` gets ``lm_head.weight`` (transposed) when the checkpoint has it,
    else ``wte``; a tied one drops ``lm_head.weight`` (it must then equal the embedding). Raises
    ``ValueError`` naming every missing key, every unexpected key (when ``strict``), and any
    tensor whose shape does not fit.
    """
    from jaxllm.models.gpt2 import GPT2Config

    _check_hf_config(config, _read_hf_config(source, hf_config))
    state = {k: v for k, v in load_hf_state_dict(source).items() if not _HF_IGNORED.search(k)}
    gpt2 = isinstance(config, GPT2Config)
    if gpt2:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        if "lm_head.weight" in state and "wte.weight" in state and config.tie_embeddings:
            if not np.array_equal(state["lm_head.weight"], state["wte.weight"]):
                raise ValueError("lm_head.weight differs from wte.weight, so the checkpoint is untied: "
                                 "use tie_embeddings=False")
            state.pop("lm_head.weight")
        if not config.tie_embeddings and "lm_head.weight" not in state and "wte.weight" in state:
            state["lm_head.weight"] = state["wte.weight"]  # HF GPT-2 ties; safetensors drops the copy
    elif config.tie_embeddings and "lm_head.weight" in state:
        if "model.embed_tokens.weight" in state and not np.array_equal(
                state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight, so the checkpoint "
                             "is untied: use tie_embeddings=False")
        state.pop("lm_head.weight")

    paths, shapes, treedef = _paths(param_shapes(config))
    table = {path: (key, transform) for path, key, transform in _hf_table(config)}
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


def to_hf_llama(config, params: Params) -> dict[str, np.ndarray]:
    """Flax params of a Llama-layout ``TransformerConfig`` -> ``{HF key: numpy array}`` in
    ``LlamaForCausalLM``'s names and layouts (with tied embeddings ``lm_head.weight`` is a copy of
    ``model.embed_tokens.weight``, as HF's ``state_dict`` lists both). Load with ``model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)``."""
    from jaxllm.models.transformer import TransformerConfig

    if not isinstance(config, TransformerConfig):
        raise TypeError(f"to_hf_llama needs a TransformerConfig, got {type(config).__name__}")
    _check_hf_config(config, None)
    paths, leaves, _ = _paths(params)
    flat = dict(zip(paths, leaves))
    table = _hf_table(config)
    expected = {p for p, _, _ in table}
    if set(flat) != expected:
        raise ValueError(f"params do not match {type(config).__name__}: missing "
                         f"{sorted('/'.join(p) for p in expected - set(flat))}, unexpected "
                         f"{sorted('/'.join(p) for p in set(flat) - expected)}")
    state = {key: np.array(_apply(transform, np.asarray(flat[path])), order="C", copy=True)
             for path, key, transform in table}
    if config.tie_embeddings:  # HF's state_dict lists the tied head too, so strict loading wants it
        state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
    return state


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
