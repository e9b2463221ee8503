"""Pure loss functions ``loss_fn(params, batch, key) -> (loss, aux)`` for supervised models.

``batch`` is ``{"x": inputs, "y": targets}``. Each builder takes the model's ``apply`` so the
loss never knows which model it trains.

A loss that is a mean over something other than the batch rows (tokens that are not padding)
reports that count as ``aux["targets"]``: gradient accumulation and the data-parallel steps
weight each piece of a batch by it (``jaxllm.training.step``), so k micro-batches or n devices
give exactly the mean over the whole batch.
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


def lm_cross_entropy(logits_fn: Callable, pad_id: int | None = None) -> Callable:
    """Next-token cross-entropy, mean over the targets that are not ``pad_id``.

    ``batch = {"inputs": int32[b, t], "targets": int32[b, t]}``; ``logits_fn(params, inputs)``
    returns float32[b, t, vocab]. Matches torch's ``cross_entropy(..., ignore_index=pad_id)``;
    ``pad_id`` may be negative (the book's ``-100``). ``aux["accuracy"]`` is next-token accuracy
    over the same targets and ``aux["targets"]`` their count (what a mean over several batches
    or devices must be weighted by). A batch with no target that counts gives loss 0 (torch
    gives NaN).
    """

    def loss_fn(params, batch, key):
        logits = logits_fn(params, batch["inputs"])
        targets = batch["targets"]
        keep = jnp.ones(targets.shape, bool) if pad_id is None else targets != pad_id
        safe = jnp.where(keep, targets, 0)  # an ignored id (e.g. -100) never indexes the logits
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
        mask = keep.astype(ce.dtype)
        count = mask.sum()
        correct = (jnp.argmax(logits, -1) == targets) * mask
        aux = {"accuracy": correct.sum() / jnp.maximum(count, 1.0), "targets": count}
        return (ce * mask).sum() / jnp.maximum(count, 1.0), aux

    return loss_fn
