"""Streaming validation NLL equals the NLL of full-sequence forwards over the same pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.models import rnn
from jaxllm.training.lm_eval import streaming_nll
from parity import OUTPUT, assert_close

CONFIG = rnn.tiny(vocab_size=19)


@pytest.mark.parametrize("streams,chunk", [(1, 7), (3, 5), (3, 1000)])
def test_streaming_equals_full_forward(streams, chunk):
    params = CONFIG.init(jax.random.PRNGKey(0))
    ids = np.random.default_rng(0).integers(0, 19, 62).astype(np.int32)
    total, n, scored = streaming_nll(CONFIG, params, ids, streams=streams, chunk=chunk)
    per = (len(ids) - 1) // streams
    expected = 0.0
    for j in range(streams):  # each piece in one full forward from h_0 = 0
        piece = ids[j * per:(j + 1) * per + 1]
        logits = CONFIG.logits(params, jnp.asarray(piece[None, :-1]))
        expected += float(optax.softmax_cross_entropy_with_integer_labels(logits[0], piece[1:]).sum())
    assert n == streams * per and scored == slice(1, streams * per + 1)
    assert_close(total, expected, OUTPUT, err_msg="streaming vs full-forward NLL")


def test_too_few_tokens():
    params = CONFIG.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="too few for 16 streams"):
        streaming_nll(CONFIG, params, np.arange(10) % 19)


def test_max_chunks_scores_the_first_streams_x_chunk_x_max_chunks_tokens():
    params = CONFIG.init(jax.random.PRNGKey(0))
    ids = np.random.default_rng(0).integers(0, 19, 62).astype(np.int32)
    capped = streaming_nll(CONFIG, params, ids, streams=3, chunk=4, max_chunks=2)
    assert capped == streaming_nll(CONFIG, params, ids[:3 * 4 * 2 + 1], streams=3, chunk=4)
    assert capped[1] == 24 and capped[2] == slice(1, 25)
    assert streaming_nll(CONFIG, params, ids, streams=3, chunk=4, max_chunks=100) == \
        streaming_nll(CONFIG, params, ids, streams=3, chunk=4)
