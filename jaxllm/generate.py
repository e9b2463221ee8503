"""Sampling rules and jitted decode loops.

``sample_logits`` is the one sampling rule: greedy at temperature 0, otherwise softmax of
logits / temperature, optionally restricted to the ``top_k`` largest logits (exactly k kept),
then optionally to the nucleus (``top_p``: the smallest probability-sorted prefix whose mass
reaches p, the crossing token included, never fewer than one token).
``generate`` decodes a batch of ragged prompts from any KV-cached decoder: one padded prefill,
then every new token costs one cached step, the whole loop inside one jitted ``lax.while_loop``.
``stream`` yields the same tokens for one prompt one at a time (``jaxllm.chat``): the same
``prefill`` and ``decode_step``, each jitted on its own, so a token can be shown before the next
is computed. ``fit_context`` cuts a prompt and its new-token budget to the context, saying so;
``generate_past_context`` goes on past it with a sliding window.
``sample_recurrent`` decodes from a model whose cache is a carried state (the Elman RNN's
hidden state): the prompt is read once, then every new token costs one step, all inside one
``lax.scan``. Both take the model's config and use only the language-model interface
(``jaxllm.models.lm``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.validate import check_token_ids


def sample_logits(logits, key, *, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None):
    """logits: float[batch, vocab] -> int32[batch].

    ``temperature == 0``: greedy argmax (``top_k``/``top_p`` are then irrelevant). Otherwise the
    logits are divided by ``temperature``; ``top_k`` keeps the k largest (ties with the k-th are
    kept too); ``top_p`` (applied after temperature and top-k, on the renormalised distribution)
    keeps the smallest prefix of the tokens sorted by decreasing probability whose cumulative mass
    reaches ``p`` -- the token whose mass crosses ``p`` is included, and the most likely token is
    always kept, so ``p`` below the top probability keeps exactly one token and ``p = 1`` keeps
    all. (This is the usual convention, not the Burkov book's, which drops the crossing token.)
    A token is kept iff the mass of the tokens strictly ahead of it in the sorted order is < p.
    ``top_p`` must lie in (0, 1]; ``None`` disables it. ``temperature`` must be >= 0 and ``top_k``
    an integer in ``[1, vocab]``: these are Python values (static arguments of a jitted caller),
    checked when the call is traced.
    """
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if not temperature >= 0:  # NaN too
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None:
        vocab = logits.shape[-1]
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be an integer in [1, {vocab}] (the vocabulary size), got {top_k}")
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]  # decreasing
        probs = jax.nn.softmax(ordered, axis=-1)
        ahead = jnp.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each sorted token
        kept = jnp.maximum(jnp.sum(ahead < top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)  # smallest kept logit
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def _decode_recurrent(model, params, prompt, key, *, max_new_tokens, temperature, top_k):
    """prompt int32[1, t] -> int32[1, max_new_tokens]: the prompt read once, then one step a token."""
    logits, carry = model.forward(params, prompt, model.init_cache(prompt.shape[0]))

    def body(state, key_t):
        logits, carry = state
        token = sample_logits(logits, key_t, temperature=temperature, top_k=top_k)
        logits, carry = model.forward(params, token[:, None], carry)
        return (logits[:, -1], carry), token

    keys = jax.random.split(key, max_new_tokens)
    _, tokens = jax.lax.scan(body, (logits[:, -1], carry), keys)
    return tokens.T  # [batch, max_new_tokens]


def sample_recurrent(model, params, prompt: list[int], *, max_new_tokens: int, key, temperature: float = 1.0,
                     top_k: int | None = None) -> list[int]:
    """Continue ``prompt`` by ``max_new_tokens`` tokens with a model whose cache is a carried state
    (the Elman RNN: ``model.forward(params, tokens, carry) -> (logits, carry)``,
    ``model.init_cache(batch)``): the prompt is read once, then every new token costs one step,
    all inside one ``lax.scan``."""
    vocab_size = model.vocab_size
    if not len(prompt):
        raise ValueError("the prompt must hold at least one token")
    prompt = check_token_ids(prompt, vocab_size, name="prompt ids")
    check_request(vocab_size, max_new_tokens, temperature, top_k)
    tokens = _decode_recurrent(model, params, jnp.asarray(prompt[None, :], jnp.int32), key,
                               max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k)
    return [int(t) for t in jax.device_get(tokens)[0]]


def prefill(model, params, tokens, lengths, cache, key, *, temperature, top_k, top_p):
    """Right-padded prompts int32[B, P] of ``lengths`` int32[B] -> (decode step 0's token int32[B],
    the cache). One call writes slots 0..P-1 of every row; then each row's length is set to its real
    one, so the pad slots are never attended to (causal) and the next writes overwrite them."""
    logits, cache = model.forward(params, tokens, cache)
    cache = cache.replace(lengths=lengths)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, vocab]
    return _sample_step(last, key, 0, temperature, top_k, top_p), cache


def decode_step(model, params, token, cache, key, step, *, temperature, top_k, top_p):
    """Each row's newest token int32[B] -> (decode step ``step``'s token int32[B], the cache one slot
    longer). The one cached step both ``generate``'s loop and ``stream`` run."""
    logits, cache = model.forward(params, token[:, None], cache)
    return _sample_step(logits[:, -1], key, step, temperature, top_k, top_p), cache


def _sample_step(logits, key, step, temperature, top_k, top_p):
    """Decode step ``step`` samples with ``fold_in(key, step)``: the same tokens whichever loop runs it."""
    return sample_logits(logits, jax.random.fold_in(key, step), temperature=temperature, top_k=top_k, top_p=top_p)


_SAMPLING = ("temperature", "top_k", "top_p")
# ``stream``'s two jitted calls, the cache donated so every step writes it in place; compiled once per
# model, sampling and shapes (the prompt bucket for the prefill, the cache length for both)
_prefill = jax.jit(prefill, static_argnames=("model", *_SAMPLING), donate_argnames=("cache",))
_decode_step = jax.jit(decode_step, static_argnames=("model", *_SAMPLING), donate_argnames=("cache",))


@flax.struct.dataclass
class DecodeState:
    """What the decode loop carries from one token to the next."""

    step: jax.Array  # int32[]: tokens emitted so far
    token: jax.Array  # int32[B]: the last token of each row
    cache: Any  # the model's KV cache, updated in place
    done: jax.Array  # bool[B]: rows that emitted EOS
    out: jax.Array  # int32[B, max_new_tokens]: the new tokens


@partial(jax.jit, static_argnames=("model", "max_new_tokens", *_SAMPLING, "eos_id"), donate_argnames=("cache",))
def _generate(model, params, tokens, lengths, cache, key, *, max_new_tokens, temperature, top_k, top_p, eos_id):
    """tokens int32[B, P] (right-padded), lengths int32[B] -> (new int32[B, N], steps run, the
    cache after them). The cache is donated and returned, so the whole loop runs in its buffers:
    each decode step writes its keys/values in place."""
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    def finish(token, done):
        token = jnp.where(done, 0, token)  # finished rows emit filler, cut on the host
        if eos_id is not None:
            done = done | (token == eos_id)
        return token, done

    def cond(last_step):
        return lambda state: (state.step <= last_step) & ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        token, cache = decode_step(model, params, state.token, state.cache, key, state.step, **sampling)
        token, done = finish(token, state.done)
        return DecodeState(state.step + 1, token, cache, done, state.out.at[:, state.step].set(token))

    full = cache
    first = first_phase_slots(tokens.shape[1], max_new_tokens, full.max_len)
    if first is not None:  # the first half of the tokens attends over a cache of about half the length
        # sliced from the cache passed in: one made inside the jitted loop would be a constant, and
        # XLA's compile spent a large part of its time folding attention over it
        cache = full.first_slots(first)
    token, cache = prefill(model, params, tokens, lengths, cache, key, **sampling)
    token, done = finish(token, jnp.zeros((tokens.shape[0],), bool))
    out = jnp.zeros((tokens.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(token)
    state = DecodeState(jnp.int32(1), token, cache, done, out)
    if first is not None:
        # step s writes slot lengths[b] + s - 1 < first for every row while s <= first - prompt width
        state = jax.lax.while_loop(cond(first - tokens.shape[1]), body, state)
        state = state.replace(cache=_into(full, state.cache))
    final = jax.lax.while_loop(cond(max_new_tokens - 1), body, state)
    return final.out, final.step, final.cache


PHASE_SLOTS = 16  # the first phase's cache length is a multiple of this


def first_phase_slots(prompt_width: int, max_new_tokens: int, max_len: int) -> int | None:
    """The cache length of the decode loop's first phase, or None for one phase. Attention reads
    the whole cache every step (static shapes), so the first half of the new tokens runs on a cache
    just long enough for it, and the second half on the full one: about a quarter less cache read
    per token over a long generation, for a second compile of the decode step. Short generations,
    where the two lengths would be close, keep one phase."""
    first = -(-(prompt_width + (max_new_tokens + 1) // 2) // PHASE_SLOTS) * PHASE_SLOTS
    return first if max_len - first >= 4 * PHASE_SLOTS else None


def _into(full, part):
    """The cache ``part`` (fewer slots) written into the start of ``full`` (same structure, its
    buffers donated: written in place); leaves of equal shape (the lengths) are ``part``'s."""
    return jax.tree_util.tree_map(
        lambda big, small: small if big.shape == small.shape else jax.lax.dynamic_update_slice(
            big, small.astype(big.dtype), (0,) * big.ndim), full, part)


SMALLEST_BUCKET = 16


def prompt_bucket(longest: int, max_len: int) -> int:
    """The padded prompt width for a longest prompt of ``longest`` tokens: the next power of two
    from ``SMALLEST_BUCKET`` on, at most ``max_len`` (the cache). A new prompt length then reuses
    the compiled decode loop of its bucket instead of compiling another (a few seconds on CPU);
    the pad slots past each row's length are masked and overwritten as decoding proceeds."""
    width = SMALLEST_BUCKET
    while width < longest:
        width *= 2
    return min(width, max_len)


def generate(model, params, prompts: list[list[int]], *, max_new_tokens: int, key, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             max_len: int | None = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new tokens per row.

    ``model`` is a language-model config (``jaxllm.models.lm``: ``forward``, ``init_cache``,
    ``context_limit``), e.g. a ``TransformerConfig`` or a ``GPT2Config``.

    ``max_len`` (default ``model.context_limit``: GPT-2's ``context_length``, the transformer's
    ``max_len``) is the cache length; a GPT-2 cache may not be longer than ``context_length`` (its
    learned positions). Every prompt must satisfy ``len(prompt) + max_new_tokens <= max_len``,
    else ``ValueError``: nothing is cut here (``fit_context`` cuts and announces). Ragged prompts
    are right-padded (with id 0) to a length bucket (``prompt_bucket``: a new prompt length does not
    recompile) and prefilled in one call (``prefill``). Decoding runs ``decode_step`` in one jitted
    ``lax.while_loop`` carrying a ``DecodeState``, the cache updated in place; step ``i`` samples
    with ``fold_in(key, i)`` (one key for the batch; rows draw independently). Sampling follows
    ``sample_logits`` (greedy at ``temperature == 0``). With ``eos_id``, a row stops at its first
    EOS: its list ends with that EOS (included), and the loop stops once every row is done.
    """
    tokens, lengths, cache, sampling = _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id,
                                                max_len)
    out, _, _ = _generate(model, params, tokens, lengths, cache, key, max_new_tokens=int(max_new_tokens),
                          eos_id=eos_id, **sampling)
    result = []
    for row in np.asarray(jax.device_get(out)).tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        result.append(row)
    return result


def stream(model, params, prompt: list[int], *, max_new_tokens: int, key, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
           max_len: int | None = None) -> Iterator[int]:
    """``generate``'s tokens for one prompt, one at a time: the same checks, bucket, cache and
    sampling, so the tokens are ``generate(..., [prompt], ...)[0]`` (the same operations compiled
    apart: only a near-tie of two logits could round the other way). Each token is yielded
    before the next is computed: the prompt is prefilled once (``prefill``, jitted), then every
    token the caller asks for is one jitted ``decode_step`` call with the cache donated. Ends after
    ``eos_id`` (yielded) or ``max_new_tokens`` tokens. The arguments are checked now, not at the
    first ``next``."""
    tokens, lengths, cache, sampling = _prepare(model, [prompt], max_new_tokens, temperature, top_k, top_p, eos_id,
                                                max_len)

    def tokens_one_by_one(cache):
        token, cache = _prefill(model, params, tokens, lengths, cache, key, **sampling)
        for step in range(1, max_new_tokens + 1):
            new = int(token[0])  # waits for this token only
            yield new
            if new == eos_id or step == max_new_tokens:
                return
            token, cache = _decode_step(model, params, token, cache, key, np.int32(step), **sampling)

    return tokens_one_by_one(cache)


def check_request(vocab_size: int, max_new_tokens, temperature: float, top_k: int | None,
                  top_p: float | None = None) -> None:
    """A decoding request's arguments, checked on the host before anything is traced."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (an integer), got {max_new_tokens}")
    if not temperature >= 0:  # NaN too
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must lie in [1, {vocab_size}] (the vocabulary size), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, max_len):
    """Check a request; -> (prompts padded to their bucket int32[B, P], lengths int32[B], an empty
    cache of ``max_len``, the static sampling arguments)."""
    vocab_size = model.vocab_size
    check_request(vocab_size, max_new_tokens, temperature, top_k, top_p)
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id must lie in [0, {vocab_size - 1}], got {eos_id}")
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = []
    for i, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        rows.append(check_token_ids(prompt, vocab_size, name=f"prompt {i} ids").reshape(-1))
    limit = model.context_limit
    if max_len is None:
        if limit is None:
            raise ValueError(f"{type(model).__name__} has no context limit: pass max_len=")
        max_len = limit
    elif not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be an integer >= 1, got {max_len}")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > max_len:
        what = " (the model's context limit)" if max_len == limit else ""
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} = "
                         f"{longest + max_new_tokens} exceeds the cache length max_len {max_len}{what}: "
                         "shorten the prompt or generate fewer tokens")
    cache = model.init_cache(len(rows), int(max_len))  # refuses a cache past GPT-2's learned positions

    tokens = np.zeros((len(rows), prompt_bucket(longest, int(max_len))), np.int32)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=None if top_p is None else float(top_p))
    return jnp.asarray(tokens), jnp.asarray(lengths), cache, sampling


def window_keep(limit: int) -> int:
    """How many tokens a full context of ``limit`` keeps when it must make room: its last half."""
    if limit < 2:
        raise ValueError(f"a context of {limit} token leaves no room to generate past it (it needs at least 2)")
    return limit // 2


def fit_context(ids: list[int], max_new_tokens: int | None, limit: int | None, *,
                slide: bool = False) -> tuple[list[int], int | None, list[str]]:
    """Fit a prompt and its new-token budget to a context of ``limit`` tokens; -> (ids, new tokens,
    one ``note:`` line per change, for the caller to print). A prompt that fills the whole context
    keeps its last half-context tokens. New tokens past the room that is left are then reduced to
    it, or with ``slide`` kept, and the note says the window will slide (``generate_past_context``).
    ``max_new_tokens=None`` asks for all the room (no note: nothing asked for was cut);
    ``limit=None`` (no context limit) changes nothing."""
    notes = []
    if limit is None:
        return ids, max_new_tokens, notes
    if len(ids) >= limit:  # no room for a single new token
        keep = window_keep(limit)
        notes.append(f"note: the prompt was cut from {len(ids)} to its last {keep} tokens because the context "
                     f"is {limit}")
        ids = ids[-keep:]
    room = limit - len(ids)
    if max_new_tokens is None:
        max_new_tokens = room
    elif max_new_tokens > room and slide:
        notes.append(f"note: {max_new_tokens} new tokens go past the {limit}-token context: each time it is full, "
                     f"decoding goes on from its last {window_keep(limit)} tokens (their cache recomputed)")
    elif max_new_tokens > room:
        notes.append(f"note: the new tokens were reduced from {max_new_tokens} to {room} because the context is "
                     f"{limit} and the prompt holds {len(ids)}")
        max_new_tokens = room
    return ids, max_new_tokens, notes


def generate_past_context(model, params, prompt: list[int], *, max_new_tokens: int, key, temperature: float = 0.0,
                          top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                          limit: int | None = None) -> list[int]:
    """Continue one prompt by ``max_new_tokens`` tokens, past a context of ``limit`` tokens (default
    ``model.context_limit``) if asked: the window slides, as nanoGPT's ``sample.py`` crops to its
    last ``block_size`` tokens. While the prompt and the new tokens fit, this is ``generate`` with a
    cache of exactly their length. When the context is full, decoding goes on from its last half
    (``window_keep``): one prefill recomputes their cache (positions from 0 again: GPT-2's learned
    positions and RoPE alike), then cached steps fill the other half, and so on. A token past the
    first window thus sees between half and all of the context, and costs one cached step plus a
    share of one half-context prefill. Window ``w >= 1`` samples with ``fold_in(key, limit + w)``:
    no decode step inside a window reaches ``limit``, so no key is reused."""
    limit = model.context_limit if limit is None else limit
    if limit is None or len(prompt) + max_new_tokens <= limit:
        return generate(model, params, [prompt], max_new_tokens=max_new_tokens, key=key, temperature=temperature,
                        top_k=top_k, top_p=top_p, eos_id=eos_id, max_len=len(prompt) + max_new_tokens)[0]
    keep = window_keep(limit)
    if len(prompt) >= limit:
        raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room in the {limit}-token context "
                         "(fit_context cuts it to the last half)")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)
    window, new, w = list(prompt), [], 0
    while len(new) < max_new_tokens:
        # every window fills the context, the last one too (its extra tokens are dropped): one compiled
        # loop for the first window and one for all the others
        window_key = key if w == 0 else jax.random.fold_in(key, limit + w)
        out = generate(model, params, [window], max_new_tokens=limit - len(window), key=window_key, max_len=limit,
                       **sampling)[0]
        out = out[:max_new_tokens - len(new)]
        new += out
        if eos_id is not None and eos_id in out:  # generate ends a row at its EOS
            break
        window, w = (list(prompt) + new)[-keep:], w + 1
    return new
