"""Linear and logistic regression: the "PyTorch in one hour" fundamentals and Burkov ch. 1.

Parameter names mirror the PyTorch twins' state dicts:
``nn.Linear(in, out)`` -> ``{"kernel", "bias"}`` at the root (linear regression);
``nn.Sequential(nn.Linear(in, 1), nn.Sigmoid())`` -> ``{"0": {"kernel", "bias"}}`` (logistic).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig, register
from jaxllm.nn.init import torch_bias_init, torch_dense, torch_kernel_init
from jaxllm.nn.ops import matmul
from jaxllm.validate import check_features


@register
@dataclasses.dataclass(frozen=True)
class LinearConfig(ModelConfig):
    family: ClassVar[str] = "linear"
    num_inputs: int = 1
    num_outputs: int = 1

    def build(self):
        return LinearRegression(self)

    def example_input(self, batch: int = 1):
        return jnp.zeros((batch, self.num_inputs), jnp.float32)

    def validate_input(self, x):
        return check_features(x, self.num_inputs).astype("float32")


class LinearRegression(nn.Module):
    """``y = x W + b``. x: float32[batch, num_inputs] -> float32[batch, num_outputs]."""

    config: LinearConfig

    @nn.compact
    def __call__(self, x):
        n_in, n_out = self.config.num_inputs, self.config.num_outputs
        kernel = self.param("kernel", torch_kernel_init, (n_in, n_out))
        bias = self.param("bias", torch_bias_init(n_in), (n_out,))
        return matmul(x, kernel) + bias


@register
@dataclasses.dataclass(frozen=True)
class LogisticConfig(ModelConfig):
    family: ClassVar[str] = "logistic"
    num_inputs: int = 2

    num_classes: ClassVar[int] = 2

    def build(self):
        return LogisticRegression(self)

    def example_input(self, batch: int = 1):
        return jnp.zeros((batch, self.num_inputs), jnp.float32)

    def validate_input(self, x):
        return check_features(x, self.num_inputs).astype("float32")


class LogisticRegression(nn.Module):
    """Returns **logits** float32[batch, 1]; ``predict_proba`` applies the book's sigmoid.

    Training works on logits (``optax.sigmoid_binary_cross_entropy`` / ``BCEWithLogitsLoss``)
    because the book's ``Sigmoid`` + ``BCELoss`` saturates on raw features and stalls.
    """

    config: LogisticConfig

    @nn.compact
    def __call__(self, x):
        return torch_dense(1, self.config.num_inputs, name="0")(x)


def predict_proba(logits):
    """float[batch, 1] logits -> float[batch] probability of class 1."""
    return jax.nn.sigmoid(logits[..., 0])
