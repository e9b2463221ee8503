"""Frozen-dataclass configs that serialise to JSON and rebuild their model.

Every model family has one config class registered here, so a checkpoint's ``config.json``
names its family and can be turned back into the right model without guessing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, ClassVar

_FAMILIES: dict[str, type["ModelConfig"]] = {}


def register(cls: type["ModelConfig"]) -> type["ModelConfig"]:
    """Class decorator: make ``cls`` loadable from its ``family`` name."""
    _FAMILIES[cls.family] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of every model config. Subclasses set ``family`` and implement ``build``."""

    family: ClassVar[str] = "base"

    def build(self):
        """Return the ``flax.linen.Module`` this config describes."""
        raise NotImplementedError

    def example_input(self, batch: int = 1):
        """A zero input of the right shape and dtype, for ``init`` and shape inference."""
        raise NotImplementedError

    def init(self, key) -> Any:
        """Fresh parameters from ``key``: the one way every model here is initialised (one
        compiled init per config)."""
        return _jitted_init(self)(key)

    def apply(self, params, inputs, **kwargs) -> Any:
        """The model's output for ``inputs`` (``build().apply`` on ``{"params": params}``)."""
        return self.build().apply({"params": params}, inputs, **kwargs)

    def param_shapes(self) -> Any:
        """The parameter tree with ``jax.ShapeDtypeStruct`` leaves (nothing is computed)."""
        import jax

        return jax.eval_shape(self.init, jax.random.PRNGKey(0))

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        return {"family": self.family, **fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=None)  # configs are frozen and hashable: one jitted init each
def _jitted_init(config: ModelConfig):
    import jax

    module = config.build()
    return jax.jit(lambda key: module.init(key, config.example_input())["params"])


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a config saved with ``to_dict`` (the ``family`` key picks the class)."""
    data = dict(data)
    family = data.pop("family", None)
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(_FAMILIES)}")
    cls = _FAMILIES[family]
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"config for {family!r} has unknown fields {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)
