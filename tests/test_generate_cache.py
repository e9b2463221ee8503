"""Top-p convention, and batched KV-cached ``generate`` equal to full recomputation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.generate import generate, sample_logits
from jaxllm.models import gpt2, transformer

pytestmark = pytest.mark.optimized  # parity: compiled as users run it (see conftest.py)

VOCAB = 29
BURKOV = transformer.tiny(VOCAB)
LLAMA = transformer.llama(VOCAB, d_model=32, num_heads=4, num_kv_heads=2, mlp_hidden=48, max_len=40)
PROMPTS = [[5], [3, 9, 1, 12], [7, 7, 2, 28, 0, 4, 11]]  # ragged: lengths 1, 4, 7


def params_of(config, seed=0):
    return config.init(jax.random.PRNGKey(seed))


def kept_tokens(probs, top_p, top_k=None, draws=2000):
    logits = jnp.log(jnp.asarray([probs], jnp.float32))
    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    out = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_k=top_k, top_p=top_p))(keys)
    return set(np.asarray(out)[:, 0].tolist())


def test_top_p_keeps_the_crossing_token_and_at_least_one():
    probs = [0.2, 0.5, 0.3]  # sorted order: 1 (0.5), 2 (0.3), 0 (0.2)
    assert kept_tokens(probs, 0.6) == {1, 2}  # 0.5 < 0.6, the crossing token 2 included
    assert kept_tokens(probs, 0.45) == {1}  # the first token alone exceeds p: exactly one
    assert kept_tokens(probs, 0.1) == {1}
    assert kept_tokens(probs, 0.79) == {1, 2}
    assert kept_tokens(probs, 0.85) == {0, 1, 2}
    assert kept_tokens(probs, 1.0) == {0, 1, 2}
    assert kept_tokens([0.9, 0.05, 0.05], 0.5) == {0}


def test_top_p_applies_after_top_k_and_temperature():
    probs = [0.4, 0.35, 0.25]
    # top-k 2 renormalises to 0.533 / 0.467: p 0.5 then keeps only token 0
    assert kept_tokens(probs, 0.5, top_k=2) == {0}
    assert kept_tokens(probs, 0.6, top_k=2) == {0, 1}
    # a high temperature flattens [0.7, 0.2, 0.1] so that p 0.6 needs two tokens; at T=1, one
    logits = jnp.log(jnp.asarray([[0.7, 0.2, 0.1]]))
    keys = jax.random.split(jax.random.PRNGKey(3), 1000)
    hot = jax.vmap(lambda k: sample_logits(logits, k, temperature=5.0, top_p=0.6))(keys)
    assert set(np.asarray(hot)[:, 0].tolist()) == {0, 1}
    assert kept_tokens([0.7, 0.2, 0.1], 0.6) == {0}


def reference_greedy(config, params, prompts, n, eos_id=None):
    """Plain loop of full forwards: every step recomputes each whole prefix (no cache) and takes
    the argmax. Prefixes are right-padded to one fixed width so the jitted forward compiles once;
    attention is causal, so the pads after a prefix cannot change its last logits."""
    forward = jax.jit(config.logits)
    width = max(map(len, prompts)) + n
    seqs = [list(p) for p in prompts]
    done = [False] * len(prompts)
    for _ in range(n):
        tokens = np.zeros((len(seqs), width), np.int32)
        for b, s in enumerate(seqs):
            tokens[b, :len(s)] = s
        logits = forward(params, jnp.asarray(tokens))
        for b, s in enumerate(seqs):
            if not done[b]:
                s.append(int(jnp.argmax(logits[b, len(s) - 1])))
                done[b] = s[-1] == eos_id
    return [s[len(p):] for s, p in zip(seqs, prompts)]


@pytest.mark.parametrize("config", [BURKOV, LLAMA], ids=["burkov", "llama_gqa"])
def test_cached_greedy_generate_equals_full_recomputation(config):
    params = params_of(config)
    fast = generate(config, params, PROMPTS, max_new_tokens=10, key=jax.random.PRNGKey(0))
    assert fast == reference_greedy(config, params, PROMPTS, 10)
    # a row alone gives the same continuation as within the ragged batch
    assert generate(config, params, [PROMPTS[1]], max_new_tokens=10, key=jax.random.PRNGKey(0)) == [fast[1]]


def test_a_long_generation_in_two_phases_equals_one_phase_and_full_recomputation():
    """With room to spare, the decode loop runs its first half on a shorter cache, then copies it
    into the full one: the same greedy tokens as one loop over the full cache and as recomputing
    the whole prefix for every token, for ragged rows that cross the switch at different fills."""
    from jaxllm.generate import _generate, _prepare, first_phase_slots

    params, n = params_of(BURKOV), 120
    prompts = [*PROMPTS, list(range(3, 19))]  # one row fills its 16-token bucket: the first phase's last slot
    assert first_phase_slots(16, n, 160) == 80 and first_phase_slots(16, n, 136) is None
    two = generate(BURKOV, params, prompts, max_new_tokens=n, key=jax.random.PRNGKey(0), max_len=160)
    one = generate(BURKOV, params, prompts, max_new_tokens=n, key=jax.random.PRNGKey(0), max_len=136)
    assert two == one == reference_greedy(BURKOV, params, prompts, n)
    # greedy tokens of a tiny model hardly notice a missing key: the caches themselves must agree
    caches = []
    for max_len in (160, 136):
        tokens, lengths, cache, sampling = _prepare(BURKOV, prompts, n, 0.0, None, None, None, max_len)
        caches.append(_generate(BURKOV, params, tokens, lengths, cache, jax.random.PRNGKey(0), max_new_tokens=n,
                                eos_id=None, **sampling)[2])
    np.testing.assert_array_equal(caches[0].lengths, caches[1].lengths)
    for a, b in zip(caches[0].keys, caches[1].keys):
        np.testing.assert_allclose(np.asarray(a)[:, :, :136], np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(caches[0].values, caches[1].values):  # slots last
        np.testing.assert_allclose(np.asarray(a)[..., :136], np.asarray(b), rtol=1e-5, atol=1e-6)


def test_eos_stops_a_row_and_is_included():
    params = params_of(LLAMA)
    full = generate(LLAMA, params, PROMPTS, max_new_tokens=10, key=jax.random.PRNGKey(0))
    eos = full[1][3]  # a token row 1 produces at step 3
    cut = generate(LLAMA, params, PROMPTS, max_new_tokens=10, key=jax.random.PRNGKey(0), eos_id=eos)
    for row, c in zip(full, cut):
        expected = row[:row.index(eos) + 1] if eos in row else row
        assert c == expected
    assert cut[1][-1] == eos and len(cut[1]) <= 4
    assert cut == reference_greedy(LLAMA, params, PROMPTS, 10, eos_id=eos)


def test_seeded_sampling_is_repeatable_and_keys_differ():
    params = params_of(BURKOV)
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=20, top_p=0.95)
    a = generate(BURKOV, params, PROMPTS, key=jax.random.PRNGKey(1), **kw)
    b = generate(BURKOV, params, PROMPTS, key=jax.random.PRNGKey(1), **kw)
    c = generate(BURKOV, params, PROMPTS, key=jax.random.PRNGKey(2), **kw)
    assert a == b and a != c
    assert all(len(r) == 12 and all(0 <= t < VOCAB for t in r) for r in a)


class Wrapped:
    """Any model that offers the interface generate uses (forward, init_cache, context_limit,
    vocab_size) plugs in; here one that delegates to the Burkov decoder."""

    def __init__(self, config):
        self.config, self.vocab_size, self.context_limit = config, config.vocab_size, 20

    def forward(self, params, tokens, cache):
        return self.config.forward(params, tokens, cache)

    def init_cache(self, batch, max_len=None):
        return self.config.init_cache(batch, max_len)


def test_any_model_with_the_interface_plugs_in():
    params = params_of(BURKOV)
    a = generate(Wrapped(BURKOV), params, PROMPTS, max_new_tokens=5, key=jax.random.PRNGKey(0))
    assert a == reference_greedy(BURKOV, params, PROMPTS, 5)


def _decode_step(hlo: str) -> list[str]:
    """The instructions of the compiled while loop's body and of every computation it calls."""
    computations, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if head and line.rstrip().endswith("{"):
            name = head.group(1)
            computations[name] = []
        elif name is not None:
            computations[name].append(line)
    body = re.search(r" while\(.*body=%([\w.-]+)", hlo).group(1)
    todo, seen, lines = [body], set(), []
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in computations:
            continue
        seen.add(comp)
        lines += computations[comp]
        for line in computations[comp]:
            todo += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.-]+)", line)
    return lines


def _whole_buffer_writes(lines: list[str], elements: int) -> dict[str, int]:
    """Count, by opcode, the instructions that copy, transpose, slice or concatenate an array of
    at least ``elements`` elements (an in-place scatter into a buffer is none of these)."""
    counts: dict[str, int] = {}
    for line in lines:
        m = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w-]+)\(", line)
        if not m or not m.group(1):
            continue
        size = int(np.prod([int(d) for d in m.group(1).split(",")]))
        if size >= elements and m.group(2) in ("copy", "concatenate", "transpose", "dynamic-slice", "slice"):
            counts[m.group(2)] = counts.get(m.group(2), 0) + 1
    return counts


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("config", [BURKOV, LLAMA, gpt2.tiny(vocab_size=VOCAB, context_length=40, emb_dim=16,
                                                            n_heads=2)], ids=["burkov", "llama_gqa", "gpt2"])
def test_a_decode_step_updates_the_cache_in_place(config, batch):
    """The compiled generate loop (cache donated, one array per layer) neither copies, transposes,
    slices nor concatenates a whole cache buffer: each step writes its keys/values in place. With
    the old stacked [layers, ...] cache every step concatenated the whole cache twice; attending
    over the just-written cache copied it two to four times per layer at batch 1."""
    from jaxllm.generate import _generate

    params = params_of(config)
    cache = config.init_cache(batch, 32)
    hlo = _generate.lower(config, params, jnp.zeros((batch, 5), jnp.int32), jnp.array([5, 3, 2][:batch], jnp.int32),
                          cache, jax.random.PRNGKey(0), max_new_tokens=8, temperature=0.0, top_k=None, top_p=None,
                          eos_id=None).compile().as_text()
    step = _decode_step(hlo)
    assert any(re.search(r" (scatter|dynamic-update-slice)\(", line) for line in step)  # the step writes the cache
    assert _whole_buffer_writes(step, cache.keys[0].size) == {}


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([[1, 2]], dict(max_new_tokens=63), r"2 tokens \+ max_new_tokens 63 = 65 exceeds .* max_len 64"),
    ([[1] * 8], dict(max_new_tokens=3, max_len=10), r"8 tokens \+ max_new_tokens 3 = 11 .* max_len 10"),
    ([[1, VOCAB]], dict(max_new_tokens=2), r"\[0, 28\]"),
    ([[1, -1]], dict(max_new_tokens=2), r"\[0, 28\]"),
    ([[1], []], dict(max_new_tokens=2), "prompt 1 is empty"),
    ([], dict(max_new_tokens=2), "non-empty"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens"),
    ([[1]], dict(max_new_tokens=2, temperature=1.0, top_p=0.0), "top_p"),
    ([[1]], dict(max_new_tokens=2, temperature=1.0, top_p=1.5), "top_p"),
    ([[1]], dict(max_new_tokens=2, temperature=1.0, top_k=0), "top_k"),
    ([[1]], dict(max_new_tokens=2, temperature=1.0, top_k=VOCAB + 1), "top_k"),
    ([[1]], dict(max_new_tokens=2, eos_id=VOCAB), "eos_id"),
])
def test_generate_refuses_bad_input(prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(BURKOV, None, prompts, key=jax.random.PRNGKey(0), **kwargs)  # refused before running


def test_sample_logits_refuses_bad_top_p():
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(jnp.zeros((1, 3)), jax.random.PRNGKey(0), temperature=1.0, top_p=0.0)


def test_gpt2_plugs_into_the_same_generator():
    config = gpt2.GPT2Config(vocab_size=VOCAB, context_length=24, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                             qkv_bias=True)
    params = params_of(config)
    fast = generate(config, params, PROMPTS, max_new_tokens=8, key=jax.random.PRNGKey(0), max_len=16)
    assert fast == reference_greedy(config, params, PROMPTS, 8)
    with pytest.raises(ValueError, match="context_length"):
        generate(config, params, PROMPTS, max_new_tokens=8, key=jax.random.PRNGKey(0), max_len=30)


def test_prompt_lengths_in_one_bucket_share_one_compiled_loop():
    """Prompts are padded to a length bucket, so a new prompt length reuses the compiled decode
    loop (and still decodes exactly as full recomputation does)."""
    from jaxllm.generate import SMALLEST_BUCKET, _generate, prompt_bucket

    assert [prompt_bucket(n, 40) for n in (1, SMALLEST_BUCKET, SMALLEST_BUCKET + 1, 39)] == \
        [SMALLEST_BUCKET, SMALLEST_BUCKET, 2 * SMALLEST_BUCKET, 40]
    params = params_of(BURKOV)
    generate(BURKOV, params, [[3, 1]], max_new_tokens=4, key=jax.random.PRNGKey(0))
    compiled = _generate._cache_size()
    for prompt in ([5, 2, 8], [1] * 9, PROMPTS[2]):
        got = generate(BURKOV, params, [prompt], max_new_tokens=4, key=jax.random.PRNGKey(0))
        assert got == reference_greedy(BURKOV, params, [prompt], 4)
    assert _generate._cache_size() == compiled
