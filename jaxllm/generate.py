"""Sampling rules and jitted decode loops.

``sample_logits`` is the one sampling rule: greedy at temperature 0, otherwise softmax of
logits / temperature, optionally restricted to the ``top_k`` largest logits (exactly k kept).
``sample_recurrent`` decodes from any model that exposes a one-token step with a carried
state (the Elman RNN's hidden state): the prompt is read once, then every new token costs
one step, all inside one ``lax.scan``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from jaxllm.validate import check_token_ids


def sample_logits(logits, key, *, temperature: float = 0.0, top_k: int | None = None):
    """logits: float[batch, vocab] -> int32[batch]."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("step_fn", "max_new_tokens", "temperature", "top_k"))
def _decode(step_fn, params, last_logits, carry, key, *, max_new_tokens, temperature, top_k):
    def body(state, key_t):
        logits, carry = state
        token = sample_logits(logits, key_t, temperature=temperature, top_k=top_k)
        logits, carry = step_fn(params, token, carry)
        return (logits, carry), token

    keys = jax.random.split(key, max_new_tokens)
    _, tokens = jax.lax.scan(body, (last_logits, carry), keys)
    return tokens.T  # [batch, max_new_tokens]


def sample_recurrent(prefill_fn: Callable, step_fn: Callable, params, prompt: list[int], *, vocab_size: int,
                     max_new_tokens: int, key, temperature: float = 1.0, top_k: int | None = None) -> list[int]:
    """Continue ``prompt`` by ``max_new_tokens`` tokens.

    ``prefill_fn(params, tokens int32[1, t]) -> (logits float[1, t, vocab], carry)`` reads the
    prompt; ``step_fn(params, token int32[1], carry) -> (logits float[1, vocab], carry)``
    advances one token. ``step_fn`` must be hashable (a module-level function) for the jit cache.
    """
    if not len(prompt):
        raise ValueError("the prompt must hold at least one token")
    prompt = check_token_ids(prompt, vocab_size, name="prompt ids")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must lie in [1, {vocab_size}] (the vocabulary size), got {top_k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits, carry = prefill_fn(params, jnp.asarray(prompt[None, :], jnp.int32))
    tokens = _decode(step_fn, params, logits[:, -1], carry, key, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_k=top_k)
    return [int(t) for t in jax.device_get(tokens)[0]]
