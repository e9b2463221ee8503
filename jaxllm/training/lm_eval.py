"""Validation of recurrent language models on a long text, with the state carried along.

The text is cut into ``streams`` contiguous pieces scored side by side (a batch), each in
chunks that carry the model's state forward, so every token is predicted from all of its
piece's history, not from a short window. Only the first tokens of each piece see a shortened
history, and the last ``< streams`` tokens of the text are left out.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.validate import check_token_ids


@partial(jax.jit, static_argnames="forward")
def _chunk_nll(forward, params, inputs, targets, carry):
    logits, carry = forward(params, inputs, carry)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum(), carry


def streaming_nll(forward: Callable, params, ids, *, init_carry: Callable[[int], object], streams: int = 16,
                  chunk: int = 256, vocab_size: int | None = None) -> tuple[float, int, slice]:
    """Total NLL (nats) of ``ids`` under ``forward(params, tokens[b, t], carry) -> (logits, carry)``.

    Returns ``(total_nll, scored_tokens, scored)`` where ``ids[scored]`` are the tokens that were
    predicted (``forward`` must be hashable, e.g. a cached jitted function). With ``vocab_size``
    the ids are checked to lie in the vocabulary.
    """
    ids = check_token_ids(ids, vocab_size, name="validation ids") if vocab_size else np.asarray(ids, np.int32)
    per_stream = (len(ids) - 1) // streams
    if per_stream < 1:
        raise ValueError(f"{len(ids)} validation tokens are too few for {streams} streams")
    inputs = ids[: streams * per_stream].reshape(streams, per_stream)
    targets = ids[1: streams * per_stream + 1].reshape(streams, per_stream)
    carry, total = init_carry(streams), 0.0
    for start in range(0, per_stream, chunk):
        nll, carry = _chunk_nll(forward, params, inputs[:, start:start + chunk], targets[:, start:start + chunk], carry)
        total += float(nll)
    return total, streams * per_stream, slice(1, streams * per_stream + 1)
