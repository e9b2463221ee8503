"""Sampling rules, and cached (carried-state) decoding equal to full recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.generate import sample_logits, sample_recurrent
from jaxllm.models import rnn

CONFIG = rnn.tiny(vocab_size=23)


def test_greedy_and_top_k():
    logits = jnp.array([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.0, 2.9]])
    assert sample_logits(logits, jax.random.PRNGKey(0)).tolist() == [1, 0]
    assert sample_logits(logits, jax.random.PRNGKey(0), temperature=1.0, top_k=1).tolist() == [1, 0]
    keys = jax.random.split(jax.random.PRNGKey(1), 400)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_k=2))(keys))
    assert set(draws[:, 0]) == {1, 3} and set(draws[:, 1]) == {0, 3}  # exactly the 2 largest, both drawn


def test_temperature_sampling_is_seeded():
    logits = jnp.zeros((1, 50))
    a = [int(sample_logits(logits, jax.random.PRNGKey(s), temperature=1.0)[0]) for s in range(20)]
    b = [int(sample_logits(logits, jax.random.PRNGKey(s), temperature=1.0)[0]) for s in range(20)]
    assert a == b and len(set(a)) > 5


def test_rnn_cached_greedy_decoding_equals_full_recomputation():
    params = CONFIG.init(jax.random.PRNGKey(0))
    prompt = [3, 7, 1, 12]
    fast = sample_recurrent(CONFIG, params, prompt, max_new_tokens=12, key=jax.random.PRNGKey(0), temperature=0.0)
    seq = list(prompt)
    for _ in range(12):  # recompute the whole prefix every time, no carried state
        logits = CONFIG.logits(params, jnp.asarray([seq], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert fast == seq[len(prompt):]


def test_bad_generation_arguments():
    params = CONFIG.init(jax.random.PRNGKey(0))
    args = (CONFIG, params)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="at least one token"):
        sample_recurrent(*args, [], max_new_tokens=3, key=key)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        sample_recurrent(*args, [1], max_new_tokens=0, key=key)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_recurrent(*args, [1], max_new_tokens=2, key=key, temperature=-1)
    with pytest.raises(ValueError, match=r"prompt ids must lie in \[0, 22\].*got values from 1 to 23"):
        sample_recurrent(*args, [1, 23], max_new_tokens=2, key=key)
    with pytest.raises(ValueError, match=r"prompt ids must lie in \[0, 22\]"):
        sample_recurrent(*args, [-1], max_new_tokens=2, key=key)
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, 23\]"):
        sample_recurrent(*args, [1], max_new_tokens=2, key=key, temperature=1.0, top_k=24)
