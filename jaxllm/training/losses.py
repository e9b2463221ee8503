"""Pure loss functions ``loss_fn(params, batch, key) -> (loss, aux)``.

Supervised models: ``batch`` is ``{"x": inputs, "y": targets}`` and each builder takes the
model's ``apply``. Language models: ``lm_loss(model)`` (next-token) and
``classification_loss(model)`` (a class read at each text's last real token) take a config with
the language-model interface (``jaxllm.models.lm``). No loss knows which model it trains.

A loss that is a mean over something other than the batch rows (tokens that are not padding)
reports that count as ``aux["targets"]``: gradient accumulation and the data-parallel steps
weight each piece of a batch by it (``jaxllm.training.step``), so k micro-batches or n devices
give exactly the mean over the whole batch.
"""

from __future__ import annotations

from typing import Callable

import jax
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


def is_argmax(logits, targets):
    """bool[...]: ``argmax(logits, -1) == targets`` (the first maximum wins a tie, as in
    ``jnp.argmax``), from two plain reductions -- XLA's CPU argmax (a value-and-index reduction)
    was 4 % of a GPT-2 training step on 2 cores."""
    top = jnp.max(logits, -1, keepdims=True)
    label = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    earlier_max = jnp.any((logits == top) & (index < targets[..., None]), -1)
    return (label[..., 0] == top[..., 0]) & ~earlier_max


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
        correct = is_argmax(logits, safe) * mask
        aux = {"accuracy": correct.sum() / jnp.maximum(count, 1.0), "targets": count}
        return (ce * mask).sum() / jnp.maximum(count, 1.0), aux

    return loss_fn


def lm_loss(model, *, pad_id: int | None = None) -> Callable:
    """Next-token cross-entropy (``lm_cross_entropy``) of a language model config: ``loss_fn(params,
    batch, key)`` with ``batch = {"inputs", "targets": int32[b, t]}``; dropout (where the model has
    any) runs with the step's ``key``, and a ``key`` of None (evaluation) is deterministic."""

    def loss_fn(params, batch, key):
        return lm_cross_entropy(lambda p, tokens: model.logits(p, tokens, key=key), pad_id)(params, batch, key)

    return loss_fn


def last_token_logits(logits, lengths):
    """logits: float[B, T, C], lengths: int[B] (1..T real tokens per row) -> float[B, C], the
    logits at each row's last real token ``lengths - 1``."""
    index = jnp.clip(lengths - 1, 0, logits.shape[1] - 1).astype(jnp.int32)
    return jnp.take_along_axis(logits, index[:, None, None], axis=1)[:, 0]


def classification_loss(logits_fn: Callable) -> Callable:
    """``loss_fn(params, batch, key) -> (mean cross-entropy, {"accuracy", "targets"})`` on the
    last real token's logits.

    batch: ``tokens`` int32[B, T], ``lengths`` int32[B], ``labels`` int32[B] and optionally
    ``weights`` float32[B] (0 for padding rows of a fixed-shape evaluation batch).
    ``logits_fn(params, tokens, key) -> float[B, T, C]`` (``key`` None at evaluation), e.g.
    ``lambda p, t, key: config.logits(p, t, key=key)`` for a classifier config.
    ``aux["targets"]`` is the (weighted) row count, what means over several batches are weighted by."""

    def loss_fn(params, batch, key):
        logits = last_token_logits(logits_fn(params, batch["tokens"], key), batch["lengths"])
        weights = batch.get("weights")
        weights = jnp.ones(logits.shape[0], logits.dtype) if weights is None else weights.astype(logits.dtype)
        count = jnp.maximum(weights.sum(), 1.0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(logits.dtype)
        return (ce * weights).sum() / count, {"accuracy": (correct * weights).sum() / count,
                                              "targets": weights.sum()}

    return loss_fn
