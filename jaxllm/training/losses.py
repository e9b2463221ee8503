"""Pure loss functions ``loss_fn(params, batch, key) -> (loss, aux)`` for supervised models.

``batch`` is ``{"x": inputs, "y": targets}``. Each builder takes the model's ``apply`` so the
loss never knows which model it trains.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax


def softmax_cross_entropy(apply_fn: Callable) -> Callable:
    """Mean cross-entropy of logits[batch, classes] against int labels[batch] (torch's CrossEntropyLoss)."""

    def loss_fn(params, batch, key):
        logits = apply_fn(params, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}

    return loss_fn


def binary_cross_entropy(apply_fn: Callable) -> Callable:
    """Mean BCE of logits[batch, 1] against 0/1 labels[batch] (torch's BCEWithLogitsLoss)."""

    def loss_fn(params, batch, key):
        logits = apply_fn(params, batch["x"])[:, 0]
        labels = batch["y"].astype(logits.dtype)
        loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
        return loss, {"accuracy": jnp.mean((logits > 0) == (labels > 0.5))}

    return loss_fn


def mean_squared_error(apply_fn: Callable) -> Callable:
    """Mean over all elements of (pred - y)^2 (torch's MSELoss)."""

    def loss_fn(params, batch, key):
        pred = apply_fn(params, batch["x"])
        return jnp.mean((pred - batch["y"]) ** 2), {}

    return loss_fn


LOSSES = {"softmax": softmax_cross_entropy, "binary": binary_cross_entropy, "mse": mean_squared_error}
