"""Validation of language models on a held-out text: every token scored once, and bits per
character to compare models whatever their tokenizer.

* Transformers (``eval_windows`` + ``window_nll``): the held-out ids are cut into
  non-overlapping windows of ``context`` tokens (the last one padded and masked) and every token
  after the first is predicted from the tokens before it inside its window.
* Recurrent models (``streaming_nll``): the text is cut into ``streams`` contiguous pieces scored
  side by side (a batch), each in chunks that carry the model's state forward, so every token is
  predicted from all of its piece's history, not from a short window. Only the first tokens of each
  piece see a shortened history, and the last ``< streams`` tokens of the text are left out.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.validate import check_token_ids


@partial(jax.jit, static_argnames="model")
def _chunk_nll(model, params, inputs, targets, carry):
    logits, carry = model.forward(params, inputs, carry)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum(), carry


def streaming_nll(model, params, ids, *, streams: int = 16, chunk: int = 256,
                  max_chunks: int | None = None) -> tuple[float, int, slice]:
    """Total NLL (nats) of ``ids`` under a model with a carried state (``model.forward(params,
    tokens[b, t], carry) -> (logits, carry)``, ``model.init_cache(batch)``: the Elman RNN).

    Returns ``(total_nll, scored_tokens, scored)`` where ``ids[scored]`` are the tokens that were
    predicted. The ids are checked to lie in the model's vocabulary. ``max_chunks``: score only the
    text's first ``streams * chunk * max_chunks`` tokens (at most that many batches), a cheaper estimate.
    """
    ids = check_token_ids(ids, model.vocab_size, name="validation ids")
    if max_chunks is not None:
        ids = ids[: streams * chunk * max_chunks + 1]
    per_stream = (len(ids) - 1) // streams
    if per_stream < 1:
        raise ValueError(f"{len(ids)} validation tokens are too few for {streams} streams")
    inputs = ids[: streams * per_stream].reshape(streams, per_stream)
    targets = ids[1: streams * per_stream + 1].reshape(streams, per_stream)
    carry, total = model.init_cache(streams), 0.0
    for start in range(0, per_stream, chunk):
        nll, carry = _chunk_nll(model, params, inputs[:, start:start + chunk], targets[:, start:start + chunk], carry)
        total += float(nll)
    return total, streams * per_stream, slice(1, streams * per_stream + 1)


def eval_windows(ids: np.ndarray, context: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Non-overlapping windows over ``ids`` scoring every token after the first exactly once, in
    fixed-shape batches ``{"inputs", "targets", "mask"}`` of ``[batch_size, context]`` (padding masked)."""
    ids = np.asarray(ids, np.int32)
    n = ids.size - 1  # number of targets
    if n < 1:
        raise ValueError(f"the validation split has {ids.size} tokens; scoring it needs at least 2")
    windows = -(-n // context)
    rows = -(-windows // batch_size) * batch_size
    inputs = np.zeros(rows * context, np.int32)
    targets = np.zeros(rows * context, np.int32)
    mask = np.zeros(rows * context, np.float32)
    inputs[:n], targets[:n], mask[:n] = ids[:-1], ids[1:], 1.0
    shape = (-1, batch_size, context)
    return [{"inputs": i, "targets": t, "mask": m}
            for i, t, m in zip(inputs.reshape(shape), targets.reshape(shape), mask.reshape(shape))]


@partial(jax.jit, static_argnames="model")
def _window_nll(model, params, batch):
    logits = model.logits(params, batch["inputs"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["mask"])


def window_nll(model, params, batches) -> float:
    """Total NLL (nats) of ``eval_windows`` batches under a language model config (deterministic)."""
    return float(sum(jax.device_get(_window_nll(model, params, b)) for b in batches))


def lm_scores(total_nll_nats: float, tokens: int, chars: int) -> dict[str, float]:
    """``{"loss"`` (nats per token), ``"perplexity"``, ``"bpc"}`` of a text's total NLL."""
    return {"loss": total_nll_nats / tokens, "perplexity": math.exp(total_nll_nats / tokens),
            "bpc": bits_per_char(total_nll_nats, chars)}


def bits_per_char(total_nll_nats: float, num_chars: int) -> float:
    """Total NLL in nats -> bits per character: ``total_nll / ln 2 / num_chars``.

    Per-token perplexity depends on the tokenizer (a model with bigger tokens sees fewer, harder
    tokens), but the total NLL of a text is the code length of the whole text, so dividing it by
    the number of characters of that same text gives a number comparable across models with
    different tokenizers, provided each tokenizer encodes the text losslessly.
    """
    if isinstance(num_chars, bool) or not isinstance(num_chars, (int, np.integer)) or num_chars <= 0:
        raise ValueError(f"num_chars must be an integer > 0, got {num_chars!r}")
    if not math.isfinite(total_nll_nats) or total_nll_nats < 0:
        raise ValueError(f"total_nll_nats must be finite and >= 0, got {total_nll_nats!r}")
    return float(total_nll_nats) / math.log(2) / int(num_chars)
