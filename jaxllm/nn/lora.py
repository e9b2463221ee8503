"""LoRA (Hu et al. 2021; Raschka app. E): a transform of the parameter tree plus a model flag.

``add_lora`` puts a low-rank pair next to each chosen weight matrix ``W [in, out]``::

    y = x W + b + scale * (x A) B        A [in, r],  B [r, out] = 0 at the start,  scale = alpha / r

* A Dense module's ``{kernel, bias}`` gets siblings ``lora_A``, ``lora_B``
  (``trf_blocks_0/att/W_query/{kernel, bias, lora_A, lora_B}``, the twin's ``X.lora.A/B``).
* A raw 2-D weight outside a Dense (the Burkov decoder's ``layers_0/attn/heads_0/W_Q``, ``W_O``,
  ``mlp/W_1``, the top-level ``output``) gets siblings ``<name>_lora_A``, ``<name>_lora_B``.

``apply_with_lora(apply_fn, cfg)`` is the model flag. The model code is untouched:

* Dense: a Flax method interceptor (``flax.linen.intercept_methods``) adds ``scale * (x A) B`` to
  the output of every ``nn.Dense.__call__`` whose scope holds ``lora_A``/``lora_B`` (Linen ignores
  params a module never reads, so the extra leaves sit there harmlessly). The factored form never
  builds ``W + scale A B``; with the frozen weights' gradients stopped
  (``training.freeze.stop_frozen_gradients``) the backward pass skips the full-size ``dW``.
* Raw weights: merged on the fly (``W + scale A B``, differentiable in ``A`` and ``B``) before
  ``apply_fn`` runs. This path costs a full-size ``[in, out]`` product and gradient per adapter.

Presets: ``raschka`` (every 2-D weight matrix that is not an embedding table, the
classification head included; ``A ~ U(+-1/sqrt(r))``, torch's ``kaiming_uniform_(a=sqrt(5))`` on
the ``(in, r)`` tensor) and ``peft`` (targets chosen by regex; ``A ~ U(+-1/sqrt(in))``, as Hugging
Face PEFT's ``lora_A`` Linear). Both: ``B = 0``, ``scale = alpha / r``.

Training only the adapters: ``jaxllm.training.freeze.lora_optimizer(optimizer, params)`` (no
optimiser state for frozen weights). Inference: ``merge`` folds the adapters into the base kernels, ``unmerge`` takes them
back out. Files: ``save_lora`` writes only the adapters (safetensors, the config in the metadata),
``load_lora`` puts them onto a base checkpoint's params.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.dtypes import promote_dtype


__all__ = ["LoRAConfig", "raschka", "peft", "add_lora", "is_lora_path", "lora_mask",
           "apply_with_lora", "merge", "unmerge", "lora_state", "without_lora", "attach_lora",
           "save_lora", "load_lora", "INITS"]

INITS = ("raschka", "peft")
LORA_A, LORA_B = "lora_A", "lora_B"
_FORMAT = "jaxllm-lora"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r >= 1; alpha > 0 (scale = alpha / r); init ``raschka`` (A ~ U(+-1/sqrt(r))) or
    ``peft`` (A ~ U(+-1/sqrt(in))); targets: regexes searched (``re.search``) in each weight's path
    string (``"trf_blocks_0/att/W_query/kernel"``); ``()`` = every 2-D weight matrix that is not an
    embedding table (all Dense kernels, the head included)."""

    rank: int = 16
    alpha: float = 16.0
    init: str = "raschka"
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.targets, str):
            raise ValueError(f"targets must be a sequence of regexes, got the string {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ValueError(f"LoRA target {pattern!r} is not a valid regex: {err}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": int(self.rank), "alpha": float(self.alpha), "init": self.init,
                "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoRAConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"LoRA config has unknown fields {sorted(unknown)}")
        return cls(**{**data, "targets": tuple(data.get("targets", ()))})


def raschka(rank: int = 16, alpha: float = 16.0) -> LoRAConfig:
    """Raschka app. E: every Linear (the classification head too), A ~ U(+-1/sqrt(r)), B = 0."""
    return LoRAConfig(rank=rank, alpha=alpha, init="raschka")


def peft(targets, rank: int = 16, alpha: float = 32.0) -> LoRAConfig:
    """Hugging Face PEFT's LoRA on the weights whose path matches one of ``targets`` (regexes),
    A ~ U(+-1/sqrt(in)), B = 0. The defaults are Burkov ch. 5's r = 16, alpha = 32."""
    if isinstance(targets, str):
        targets = (targets,)
    if not targets:
        raise ValueError("the peft preset needs at least one target pattern")
    return LoRAConfig(rank=rank, alpha=alpha, init="peft", targets=tuple(targets))


# ---------------------------------------------------------------------------------------------
# Where the adapters live in the tree.
# ---------------------------------------------------------------------------------------------

def is_lora_path(path: str) -> bool:
    """True for a LoRA leaf's path string: ``.../lora_A``, ``.../lora_B``, ``.../W_Q_lora_A`` ..."""
    leaf = path.rsplit("/", 1)[-1]
    return leaf in (LORA_A, LORA_B) or leaf.endswith(("_" + LORA_A, "_" + LORA_B))


def _adapter_keys(weight: tuple) -> tuple[tuple, tuple]:
    """A weight's flat key -> the flat keys of its (A, B)."""
    *parent, name = weight
    if name == "kernel":
        return (*parent, LORA_A), (*parent, LORA_B)
    return (*parent, f"{name}_{LORA_A}"), (*parent, f"{name}_{LORA_B}")


def _weight_key(a_key: tuple) -> tuple:
    """The flat key of an ``A`` leaf -> the flat key of the weight it adapts."""
    *parent, name = a_key
    return (*parent, "kernel") if name == LORA_A else (*parent, name[: -len("_" + LORA_A)])


def _flat(tree) -> dict[tuple, Any]:
    return traverse_util.flatten_dict(tree)


def _join(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _pairs(flat: Mapping[tuple, Any]) -> list[tuple[tuple, tuple, tuple]]:
    """Every (weight, A, B) flat-key triple in ``flat``; an A without its B (or the reverse) raises."""
    lora = {k for k in flat if is_lora_path(_join(k))}
    triples = []
    for key in sorted(k for k in lora if k[-1].endswith(LORA_A)):
        weight = _weight_key(key)
        a_key, b_key = _adapter_keys(weight)
        if b_key not in lora:
            raise ValueError(f"LoRA weight {_join(a_key)} has no partner {_join(b_key)}")
        triples.append((weight, a_key, b_key))
    orphans = lora - {k for _, a, b in triples for k in (a, b)}
    if orphans:
        raise ValueError(f"LoRA weights without a partner lora_A: {sorted(_join(k) for k in orphans)}")
    return triples


def _is_candidate(key: tuple, value) -> bool:
    """A 2-D floating weight matrix that is not an embedding table nor itself a LoRA leaf."""
    return (len(np.shape(value)) == 2 and key[-1] != "embedding" and not is_lora_path(_join(key))
            and jnp.issubdtype(value.dtype, jnp.floating))


def _choose(flat: Mapping[tuple, Any], cfg: LoRAConfig) -> list[tuple]:
    candidates = sorted(k for k, v in flat.items() if _is_candidate(k, v))
    if not candidates:
        raise ValueError("params hold no 2-D weight matrix (other than embeddings) to adapt")
    if not cfg.targets:
        return candidates
    names = {k: _join(k) for k in candidates}
    for pattern in cfg.targets:
        if not any(re.search(pattern, name) for name in names.values()):
            examples = ", ".join(list(names.values())[:6])
            raise ValueError(f"LoRA target pattern {pattern!r} matches no weight matrix; "
                             f"weights look like: {examples}, ...")
    return [k for k in candidates if any(re.search(p, names[k]) for p in cfg.targets)]


def add_lora(params, cfg: LoRAConfig, key) -> dict:
    """params (base layout) -> a new tree with ``lora_A float[in, r]`` (uniform, see the preset)
    and ``lora_B float[r, out]`` (zeros) next to every targeted ``W float[in, out]``. Each adapter
    draws from its own key (``key`` split over the targets in path order). Works under
    ``jax.eval_shape``. Raises ``ValueError`` if params already hold LoRA weights or a target
    pattern matches nothing."""
    flat = _flat(params)
    if any(is_lora_path(_join(k)) for k in flat):
        raise ValueError("params already hold LoRA weights; add_lora expects base params (see without_lora)")
    chosen = _choose(flat, cfg)
    keys = jax.random.split(key, len(chosen))
    out = dict(flat)
    for weight, sub in zip(chosen, keys):
        w = flat[weight]
        fan_in, fan_out = w.shape
        bound = 1.0 / math.sqrt(cfg.rank if cfg.init == "raschka" else fan_in)
        a_key, b_key = _adapter_keys(weight)
        out[a_key] = jax.random.uniform(sub, (fan_in, cfg.rank), w.dtype, -bound, bound)
        out[b_key] = jnp.zeros((cfg.rank, fan_out), w.dtype)
    return traverse_util.unflatten_dict(out)


def _path_str(path) -> str:
    """A jax key path -> ``"trf_blocks_0/att/W_query/kernel"``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def lora_mask(params):
    """pytree of bool shaped like ``params``: True exactly on the LoRA leaves."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_lora_path(_path_str(path)), params)


def lora_state(params) -> dict[str, Any]:
    """Only the LoRA leaves, ``{"trf_blocks_0/att/W_query/lora_A": array, ...}``."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_path_str(p): v for p, v in leaves if is_lora_path(_path_str(p))}


def without_lora(params) -> dict:
    """params with the LoRA leaves dropped (the base weights as they are, not merged)."""
    return traverse_util.unflatten_dict({k: v for k, v in _flat(params).items() if not is_lora_path(_join(k))})


# ---------------------------------------------------------------------------------------------
# The model flag.
# ---------------------------------------------------------------------------------------------

def _merge_raw(params, scale: float):
    """Fold the raw-weight adapters (``<name>_lora_A/B``) into their weights; Dense adapters stay."""
    flat = _flat(params)
    raw = [t for t in _pairs(flat) if t[1][-1] != LORA_A]
    if not raw:
        return params
    for weight, a_key, b_key in raw:
        if weight not in flat:
            raise ValueError(f"LoRA weight {_join(a_key)} adapts {_join(weight)}, which params lack")
        flat[weight] = flat[weight] + scale * (flat.pop(a_key) @ flat.pop(b_key))
    return traverse_util.unflatten_dict(flat)


def _is_jitted(fn) -> bool:
    return hasattr(fn, "lower") and hasattr(fn, "trace")


def apply_with_lora(apply_fn: Callable, cfg: LoRAConfig) -> Callable:
    """``apply_fn(params, *args, **kw)`` -> ``apply_fn'(params_with_lora, *args, **kw)`` computing
    ``y = x W + b + scale * (x A) B`` at every adapted weight (scale = ``cfg.alpha / cfg.rank``).

    ``apply_fn`` must call the Flax model (``model.apply``) and must not be jitted itself: a jit
    cache hit skips the Python code the interceptor lives in, so jit the returned function instead.
    If the params hold Dense adapters and no Dense ever reached the interceptor (a jitted function
    hidden inside ``apply_fn``, or a model without ``nn.Dense``), it raises ``ValueError`` rather
    than silently computing the base model. Params without LoRA leaves pass through unchanged."""
    if _is_jitted(apply_fn):
        raise ValueError("apply_with_lora needs the un-jitted apply function (e.g. config.logits); "
                         "jit the function it returns")
    scale = cfg.scale

    def apply_lora(params, *args, **kwargs):
        has_dense_adapters = any(k[-1] == LORA_A for k in _flat(params))
        adapted = []

        def interceptor(next_fun, call_args, call_kwargs, context):
            module = context.module
            if (context.method_name != "__call__" or module.scope is None
                    or not module.has_variable("params", LORA_A)):
                return next_fun(*call_args, **call_kwargs)
            if not isinstance(module, nn.Dense):
                raise ValueError(f"LoRA weights sit in {'/'.join(module.path)}, a {type(module).__name__}; "
                                 "only nn.Dense kernels are adapted in place")
            x = call_args[0] if call_args else call_kwargs["inputs"]
            y = next_fun(*call_args, **call_kwargs)
            a = module.get_variable("params", LORA_A)
            b = module.get_variable("params", LORA_B)
            if b is None:
                raise ValueError(f"LoRA weight {'/'.join(module.path)}/lora_A has no partner lora_B")
            x, a, b = promote_dtype(x, a, b, dtype=module.dtype)
            low_rank = jnp.matmul(jnp.matmul(x, a, precision=module.precision), b, precision=module.precision)
            adapted.append(module.path)
            return y + scale * low_rank

        with nn.intercept_methods(interceptor):
            out = apply_fn(_merge_raw(params, scale), *args, **kwargs)
        if has_dense_adapters and not adapted:
            raise ValueError("params hold LoRA weights on Dense kernels but no nn.Dense call reached the LoRA "
                             "interceptor: apply_fn probably calls an already-jitted function whose cache hides "
                             "it; pass the un-jitted model call and jit the result")
        return out

    return apply_lora


# ---------------------------------------------------------------------------------------------
# Merge for inference, unmerge, files.
# ---------------------------------------------------------------------------------------------

def merge(params, cfg: LoRAConfig) -> dict:
    """params with LoRA -> base-layout params: every adapted ``W`` becomes ``W + scale * A @ B``
    and the LoRA leaves are gone, so the plain model computes what ``apply_with_lora`` does."""
    flat = _flat(params)
    for weight, a_key, b_key in _pairs(flat):
        if weight not in flat:
            raise ValueError(f"LoRA weight {_join(a_key)} adapts {_join(weight)}, which params lack")
        flat[weight] = flat[weight] + cfg.scale * (flat.pop(a_key) @ flat.pop(b_key))
    return traverse_util.unflatten_dict(flat)


def _as_state(lora_params) -> dict[str, Any]:
    """A LoRA tree or an already-flat ``lora_state`` dict -> ``{path string: array}`` (a flat
    dict's keys are their own path strings, so ``lora_state`` serves both)."""
    return lora_state(lora_params)


def attach_lora(base_params, lora, *, rank: int | None = None) -> dict:
    """base params + adapters (a ``lora_state`` dict or any tree holding LoRA leaves) -> params
    with LoRA. Every adapter's weight must exist in ``base_params`` with ``W [in, out]``,
    ``A [in, r]``, ``B [r, out]`` (and ``r == rank`` when given), else ``ValueError`` naming it."""
    state = _as_state(lora)
    if not state:
        raise ValueError("no LoRA weights to attach")
    flat = _flat(base_params)
    present = sorted(_join(k) for k in flat if is_lora_path(_join(k)))
    if present:
        raise ValueError(f"base params already hold LoRA weights ({present[0]}, ...)")
    adapters = {tuple(k.split("/")): v for k, v in state.items()}
    for weight, a_key, b_key in _pairs(adapters):
        if weight not in flat:
            raise ValueError(f"LoRA adapter {_join(a_key)}: the base params have no weight {_join(weight)}")
        w_shape, a_shape, b_shape = np.shape(flat[weight]), np.shape(adapters[a_key]), np.shape(adapters[b_key])
        r = a_shape[1] if len(a_shape) == 2 else None
        if (len(w_shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != w_shape[0]
                or b_shape != (r, w_shape[1]) or (rank is not None and r != rank)):
            raise ValueError(f"LoRA adapter {_join(a_key)}/{b_key[-1]} of shapes {a_shape}, {b_shape} does not "
                             f"fit {_join(weight)} of shape {w_shape} (need A [in, r], B [r, out]"
                             f"{'' if rank is None else f', r = {rank}'})")
    flat.update({k: jnp.asarray(v) for k, v in adapters.items()})
    return traverse_util.unflatten_dict(flat)


def unmerge(merged_params, lora_params, cfg: LoRAConfig) -> dict:
    """Undo ``merge``: ``W - scale * A @ B`` for every adapter in ``lora_params`` (a LoRA tree or a
    ``lora_state`` dict), with the LoRA leaves put back. Exact up to float rounding."""
    state = _as_state(lora_params)
    params = attach_lora(merged_params, state, rank=cfg.rank)
    flat = _flat(params)
    for weight, a_key, b_key in _pairs(flat):
        flat[weight] = flat[weight] - cfg.scale * (flat[a_key] @ flat[b_key])
    return traverse_util.unflatten_dict(flat)


def save_lora(path, params, cfg: LoRAConfig) -> None:
    """Write only the LoRA leaves of ``params`` to a safetensors file, ``cfg`` in its metadata.
    Written to a temporary file then renamed, so a failed save never clobbers a good file."""
    from safetensors.numpy import save_file

    state = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in lora_state(params).items()}
    if not state:
        raise ValueError("params hold no LoRA weights to save")
    _pairs({tuple(k.split("/")): v for k, v in state.items()})  # every A has its B
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": _FORMAT, "lora_config": json.dumps(cfg.to_dict())})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_lora(path, base_params) -> tuple[dict, LoRAConfig]:
    """A ``save_lora`` file + base params -> ``(params_with_lora, cfg)``. Every adapter's weight
    must exist in ``base_params`` with a matching shape, else ``ValueError`` naming the adapter; a
    truncated or foreign file raises ``ValueError`` naming the file."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LoRA file")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT or "lora_config" not in metadata:
                raise ValueError(f"{path} is not a LoRA file written by save_lora (no '{_FORMAT}' metadata)")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:  # truncated or not a safetensors file
        raise ValueError(f"{path} is not a valid LoRA (safetensors) file: {exc}") from exc
    try:
        cfg = LoRAConfig.from_dict(json.loads(metadata["lora_config"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path} has an unreadable LoRA config in its metadata: {exc}") from exc
    return attach_lora(base_params, state, rank=cfg.rank), cfg
