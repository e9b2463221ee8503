"""PyTorch's default initialisers, so a Flax twin starts from the same distribution.

``nn.Linear`` and ``nn.Conv2d`` draw weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in))
(kaiming_uniform with a=sqrt(5) is exactly that bound). Flax kernels are ``(..., in, out)``:
fan_in is the product of every axis but the last.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def torch_kernel_init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int):
    """Bias initialiser needs the layer's fan_in, which the bias shape does not carry."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_dense(features: int, fan_in: int, *, name: str, use_bias: bool = True):
    """A ``flax.linen.Dense`` initialised like ``torch.nn.Linear(fan_in, features)``."""
    import flax.linen as nn

    from jaxllm.nn.ops import dense_dot_general

    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(fan_in),
        dot_general=dense_dot_general,  # the same product, with a weight gradient XLA need not transpose
        name=name,
    )


def torch_conv(features: int, in_channels: int, kernel: int, *, padding: int, name: str):
    """A ``flax.linen.Conv`` (NHWC) initialised like ``torch.nn.Conv2d(in, features, kernel, padding=padding)``."""
    import flax.linen as nn

    return nn.Conv(
        features,
        (kernel, kernel),
        padding=((padding, padding), (padding, padding)),
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(in_channels * kernel * kernel),
        name=name,
    )
