"""Checkpoints round-trip exactly; corrupt or mismatched ones are refused with a clear message."""

import gc
import os

import jax
import numpy as np
import pytest

from jaxllm.models.mlp import MLPConfig
from jaxllm.training import CheckpointError, Checkpointer, OptimizerConfig, TrainState, make_optimizer
from jaxllm.training.supervised import init_params

CONFIG = MLPConfig(num_inputs=3, num_outputs=2, hidden=(5,))


def make_state(config=CONFIG, step=7):
    opt = make_optimizer(OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01))
    state = TrainState.create(init_params(config, 0), opt, jax.random.PRNGKey(42))
    grads = jax.tree_util.tree_map(lambda p: p * 0.5, state.params)
    _, opt_state = opt.update(grads, state.opt_state, state.params)  # non-trivial Adam moments
    return state.replace(opt_state=opt_state, step=np.int32(step))


def test_save_restore_round_trip(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, config=CONFIG.to_dict()) as ckpt:
        ckpt.save(state, data_state={"epoch": 2, "index": 3})
    with Checkpointer(tmp_path, config=CONFIG.to_dict()) as ckpt:
        restored, meta = ckpt.restore(make_state(step=0))
    assert meta["data"] == {"epoch": 2, "index": 3} and meta["config"] == CONFIG.to_dict()
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored.step) == 7


def test_checkpoint_for_another_config_is_refused(tmp_path):
    with Checkpointer(tmp_path, config=CONFIG.to_dict()) as ckpt:
        ckpt.save(make_state())
    other = CONFIG.replace(hidden=(6,))
    with Checkpointer(tmp_path, config=other.to_dict()) as ckpt:
        with pytest.raises(CheckpointError, match="written for a different config"):
            ckpt.restore(make_state(other))
    with Checkpointer(tmp_path) as ckpt:  # no config given: the tree itself does not fit
        with pytest.raises(CheckpointError, match="cannot be restored into this model"):
            ckpt.restore(make_state(other))


# orbax abandons its async readers when a file is unreadable; collect them here, not in a later test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_corrupt_checkpoint_is_refused_and_empty_dir_explained(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ckpt.restore(make_state())
    with Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(make_state())
    state_dir = tmp_path / "c" / "7" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 3))
    with Checkpointer(tmp_path / "c") as ckpt:
        with pytest.raises(CheckpointError, match="checkpoint step 7 .* (unreadable|cannot be restored)"):
            ckpt.restore(make_state())
    gc.collect()


def test_failed_save_leaves_the_good_checkpoint(tmp_path, monkeypatch):
    good = make_state(step=3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(good)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    with Checkpointer(tmp_path) as ckpt:
        monkeypatch.setattr(ckpt.manager, "save", explode)
        with pytest.raises(OSError):
            ckpt.save(make_state(step=4))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [3]
        restored, _ = ckpt.restore(make_state(step=0))
    for a, b in zip(jax.tree_util.tree_leaves(good), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
