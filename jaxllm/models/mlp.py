"""Multi-layer perceptrons: Raschka's appendix-A ``NeuralNetwork`` and Burkov's two-layer net.

Dense layers are named by their index in the twin's ``nn.Sequential`` (activations take the
odd indices): ``layers_0, layers_2, ...`` for Raschka's ``self.layers = nn.Sequential(...)``,
or bare ``0, 2, ...`` when the twin *is* an ``nn.Sequential`` (Burkov's two-layer net).
The model returns logits; a final sigmoid/softmax belongs to prediction, not training.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig, register
from jaxllm.nn.init import torch_dense
from jaxllm.validate import check_features

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@register
@dataclasses.dataclass(frozen=True)
class MLPConfig(ModelConfig):
    family: ClassVar[str] = "mlp"
    num_inputs: int = 2
    num_outputs: int = 2
    hidden: tuple[int, ...] = (30, 20)
    activation: str = "relu"
    sequential_root: bool = False  # True: the twin is a bare nn.Sequential (keys "0.weight")

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.num_inputs < 1 or self.num_outputs < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"layer widths must be >= 1, got {self.num_inputs}, {self.hidden}, {self.num_outputs}")

    def build(self):
        return MLP(self)

    def example_input(self, batch: int = 1):
        return jnp.zeros((batch, self.num_inputs), jnp.float32)

    def validate_input(self, x):
        return check_features(x, self.num_inputs).astype("float32")

    @property
    def num_classes(self) -> int:
        """One output is a binary classifier (logit of class 1); more are softmax classes."""
        return 2 if self.num_outputs == 1 else self.num_outputs

    def layer_names(self) -> list[str]:
        prefix = "" if self.sequential_root else "layers_"
        return [f"{prefix}{2 * i}" for i in range(len(self.hidden) + 1)]


def raschka_appendix_a(num_inputs: int = 2, num_outputs: int = 2) -> MLPConfig:
    """``NeuralNetwork(num_inputs, num_outputs)``: in -> 30 -> ReLU -> 20 -> ReLU -> out."""
    return MLPConfig(num_inputs, num_outputs, (30, 20), "relu")


def burkov_two_layer(num_inputs: int = 2) -> MLPConfig:
    """Burkov ch. 1: ``Linear(2, 100) -> Sigmoid -> Linear(100, 1) (-> Sigmoid for prediction)``."""
    return MLPConfig(num_inputs, 1, (100,), "sigmoid", sequential_root=True)


class MLP(nn.Module):
    """x: float32[batch, num_inputs] -> logits float32[batch, num_outputs]."""

    config: MLPConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = ACTIVATIONS[cfg.activation]
        widths = (cfg.num_inputs, *cfg.hidden, cfg.num_outputs)
        names = cfg.layer_names()
        for i, name in enumerate(names):
            x = torch_dense(widths[i + 1], widths[i], name=name)(x)
            if i < len(names) - 1:
                x = act(x)
        return x
