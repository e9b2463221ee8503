"""``lm_cross_entropy``: loss and accuracy against PyTorch on padded targets, ties included."""

import jax.numpy as jnp
import numpy as np
import torch

from jaxllm.training.losses import is_argmax, lm_cross_entropy
from parity import OUTPUT, assert_close


def test_is_argmax_matches_argmax_and_lets_the_first_maximum_win_a_tie():
    logits = np.array([[[1.0, 3.0, 3.0, 0.0],    # tie at 1 and 2: argmax is 1
                        [2.0, 2.0, 2.0, 2.0],    # all equal (a zero-initialised head): argmax is 0
                        [0.0, -1.0, 5.0, 5.0]]], np.float32)
    for target in range(4):
        targets = np.full((1, 3), target, np.int32)
        expected = logits.argmax(-1) == targets
        np.testing.assert_array_equal(np.asarray(is_argmax(jnp.asarray(logits), jnp.asarray(targets))), expected)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 50)).astype(np.float32)
    targets = np.where(rng.random((3, 7)) < 0.5, logits.argmax(-1), rng.integers(0, 50, (3, 7))).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(is_argmax(jnp.asarray(logits), jnp.asarray(targets))),
                                  logits.argmax(-1) == targets)


def test_lm_cross_entropy_matches_torch_with_ignored_targets():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 6, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 6)).astype(np.int32)
    targets[0, 4:] = -100
    targets[1, 0] = logits[1, 0].argmax()  # at least one correct prediction
    loss, aux = lm_cross_entropy(lambda p, t: jnp.asarray(logits), pad_id=-100)(None, {"inputs": targets, "targets": targets}, None)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits).reshape(-1, 11),
                                                 torch.from_numpy(targets).reshape(-1).long(), ignore_index=-100)
    assert_close(loss, expected.numpy(), OUTPUT, err_msg="lm loss vs torch cross_entropy")
    assert float(aux["targets"]) == keep.sum()
    assert float(aux["accuracy"]) == np.float32(((logits.argmax(-1) == targets) & keep).sum() / keep.sum())
