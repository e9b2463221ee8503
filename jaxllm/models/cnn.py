"""A small CNN for grayscale digits (28x28 MNIST or scikit-learn's 8x8 digits).

conv1 (3x3, pad 1) -> ReLU -> 2x2 max-pool -> conv2 -> ReLU -> 2x2 max-pool -> flatten ->
fc1 -> ReLU -> fc2. Flax convolutions are NHWC; the PyTorch twin is NCHW, so before
flattening we move channels first: then ``fc1`` sees features in the twin's (C, H, W) order and
its weights convert by the plain transpose rule.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig, register
from jaxllm.nn.init import torch_conv, torch_dense
from jaxllm.validate import check_images


@register
@dataclasses.dataclass(frozen=True)
class CNNConfig(ModelConfig):
    family: ClassVar[str] = "cnn"
    image_size: int = 28
    channels: tuple[int, int] = (16, 32)
    hidden: int = 64
    num_classes: int = 10

    def __post_init__(self):
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x2 poolings), got {self.image_size}")
        if len(self.channels) != 2:
            raise ValueError(f"channels must name the two conv widths, got {self.channels}")

    def build(self):
        return CNN(self)

    def example_input(self, batch: int = 1):
        return jnp.zeros((batch, self.image_size, self.image_size), jnp.float32)

    def validate_input(self, x):
        return check_images(x, self.image_size, self.image_size).astype("float32")

    @property
    def flat_features(self) -> int:
        return self.channels[1] * (self.image_size // 4) ** 2


def mnist() -> CNNConfig:
    return CNNConfig(image_size=28)


def digits8x8() -> CNNConfig:
    return CNNConfig(image_size=8, channels=(16, 32), hidden=64)


class CNN(nn.Module):
    """images: float32[batch, H, W] or [batch, H, W, 1] -> logits float32[batch, num_classes]."""

    config: CNNConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        x = images[..., None] if images.ndim == 3 else images
        c1, c2 = cfg.channels
        x = jax.nn.relu(torch_conv(c1, 1, 3, padding=1, name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jax.nn.relu(torch_conv(c2, c1, 3, padding=1, name="conv2")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # (C, H, W) order, as torch
        x = jax.nn.relu(torch_dense(cfg.hidden, cfg.flat_features, name="fc1")(x))
        return torch_dense(cfg.num_classes, cfg.hidden, name="fc2")(x)
