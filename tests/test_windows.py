"""Sliding next-token windows (Raschka's GPTDatasetV1) and resumable batches over them."""

import numpy as np
import pytest

from jaxllm.data.batches import ArrayBatches
from jaxllm.data.windows import lm_windows


def raschka_windows(ids, context, stride):
    """GPTDatasetV1's loop, verbatim in spirit."""
    inputs, targets = [], []
    for i in range(0, len(ids) - context, stride):
        inputs.append(ids[i:i + context])
        targets.append(ids[i + 1:i + context + 1])
    return np.array(inputs), np.array(targets)


@pytest.mark.parametrize("length,context,stride", [(10, 4, 1), (10, 4, 3), (10, 4, 4), (5, 4, 1), (100, 7, 5)])
def test_matches_raschka(length, context, stride):
    ids = np.arange(length) * 3
    w = lm_windows(ids, context, stride)
    inputs, targets = raschka_windows(list(ids), context, stride)
    assert w["inputs"].dtype == np.int32 and w["inputs"].shape == ((length - context - 1) // stride + 1, context)
    np.testing.assert_array_equal(w["inputs"], inputs)
    np.testing.assert_array_equal(w["targets"], targets)
    np.testing.assert_array_equal(w["inputs"][:, 1:], w["targets"][:, :-1])  # shifted by one


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"context 8 needs at least 9 tokens.*has 8 tokens"):
        lm_windows(np.arange(8), 8, 1)
    with pytest.raises(ValueError, match="context and stride must be >= 1"):
        lm_windows(np.arange(8), 0, 1)
    with pytest.raises(ValueError, match="context and stride must be >= 1"):
        lm_windows(np.arange(8), 2, 0)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        lm_windows(np.arange(12), 4, 1, vocab_size=10)
    with pytest.raises(ValueError, match=r"from -1"):
        lm_windows(np.array([1, 2, -1, 3, 4]), 2, 1, vocab_size=10)
    with pytest.raises(ValueError, match="integers"):
        lm_windows(np.linspace(0, 1, 10), 2, 1)


def test_resumed_batches_are_the_same():
    windows = lm_windows(np.arange(200) % 50, 8, 3, vocab_size=50)
    straight = ArrayBatches(windows, 4, seed=7)
    expected = [straight.next() for _ in range(40)]  # crosses epoch boundaries (16 steps/epoch)
    first = ArrayBatches(windows, 4, seed=7)
    got = [first.next() for _ in range(23)]
    state = first.state_dict()
    resumed = ArrayBatches(windows, 4, seed=7)
    resumed.load_state_dict(state)
    got += [resumed.next() for _ in range(17)]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
    assert not np.array_equal(expected[0]["inputs"], windows["inputs"][:4])  # shuffled
