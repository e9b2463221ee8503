"""Checkpoints round-trip exactly; corrupt or mismatched ones are refused with a clear message."""

import gc
import json
import os
import warnings

import jax
import numpy as np
import pytest

from jaxllm.models.mlp import MLPConfig
from jaxllm.training import CheckpointError, Checkpointer, OptimizerConfig, TrainState, make_optimizer
from jaxllm.training.checkpoint import CheckpointWriteError

CONFIG = MLPConfig(num_inputs=3, num_outputs=2, hidden=(5,))


def make_state(config=CONFIG, step=7):
    opt = make_optimizer(OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01))
    state = TrainState.create(config.init(jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(42))
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


# orbax abandons its async readers when a restore fails; their coroutines are collected in this test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_refused_config_names_only_what_differs(tmp_path):
    saved = {"model": CONFIG.to_dict(), "optimizer": {"name": "adamw", "lr": 0.1}, "data": {"seed": 0}}
    with Checkpointer(tmp_path, config=saved) as ckpt:
        ckpt.save(make_state())
    changed = {**saved, "optimizer": {"name": "adamw", "lr": 0.05}, "data": {"seed": 0, "dtype": "bfloat16"}}
    with Checkpointer(tmp_path, config=changed) as ckpt:
        with pytest.raises(CheckpointError) as err:
            ckpt.restore(make_state())
    first, *lines = str(err.value).splitlines()
    assert first.endswith("was written for a different config (saved → this run):")
    assert lines == ["  data.dtype: None → 'bfloat16'", "  optimizer.lr: 0.1 → 0.05"]


def _files(step_dir):
    return [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names
            if name != "checksums.json"]


def _flip_bytes(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(0, len(data), max(1, len(data) // 8)):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def _largest_array_file(step_dir):
    data = [p for p in _files(step_dir) if f"{os.sep}d{os.sep}" in p]
    return max(data, key=os.path.getsize)


def test_empty_dir_is_explained(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ckpt.restore(make_state())


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate])
def test_altered_files_are_detected_and_the_newest_intact_step_restored(tmp_path, capsys, damage):
    with Checkpointer(tmp_path, keep=3) as ckpt:
        for step in (3, 5, 7):
            ckpt.save(make_state(step=step))
    assert json.load(open(tmp_path / "7" / "checksums.json"))["algorithm"] == "sha256"
    damage(_largest_array_file(tmp_path / "7"))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"step 7 .* is damaged: 1 file\(s\) changed"):
            ckpt.restore(make_state(step=0), step=7)  # an explicit step is never swapped for another
        restored, meta = ckpt.restore(make_state(step=0))  # the newest intact one
    assert int(restored.step) == 5 and meta["step"] == 5
    assert "warning: checkpoint step 7" in capsys.readouterr().err
    for a, b in zip(jax.tree_util.tree_leaves(make_state(step=5)), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_intact_step_is_refused_naming_each(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(make_state(step=3))
        ckpt.save(make_state(step=5))
    os.remove(_largest_array_file(tmp_path / "3"))
    with open(tmp_path / "5" / "checksums.json", "w") as f:
        f.write("{not json")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
            ckpt.restore(make_state())
    assert "step 5" in str(err.value) and "checksums.json is unreadable" in str(err.value)
    assert "step 3" in str(err.value) and "missing" in str(err.value)


def test_damaged_steps_are_set_aside_not_deleted(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(make_state(step=3))
        ckpt.save(make_state(step=5))
        moved = ckpt.set_aside(newer_than=3)
        assert ckpt.all_steps() == [3] and moved == [str(tmp_path / "damaged-5")]
        ckpt.save(make_state(step=5))  # the step number can be written again
        assert ckpt.all_steps() == [3, 5]
    assert (tmp_path / "damaged-5" / "checksums.json").exists()


def test_failed_save_leaves_the_good_checkpoint_and_no_partial_files(tmp_path, monkeypatch):
    good = make_state(step=3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(good)

    def explode(step, *args, **kwargs):
        os.makedirs(tmp_path / f"{step}.orbax-checkpoint-tmp-123")  # what orbax leaves mid-save
        raise OSError(28, "No space left on device")

    with Checkpointer(tmp_path) as ckpt:
        monkeypatch.setattr(ckpt.manager, "save", explode)
        with pytest.raises(CheckpointWriteError, match=f"cannot write checkpoint step 4 to {tmp_path}: "
                                                       r"No space left on device \(errno 28\)"):
            ckpt.save(make_state(step=4))
    assert sorted(os.listdir(tmp_path)) == ["3"]
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [3]
        restored, _ = ckpt.restore(make_state(step=0))
    for a, b in zip(jax.tree_util.tree_leaves(good), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_failed_save_changes_no_process_wide_setting(tmp_path, monkeypatch):
    """The library reports a failed save as one exception and leaves the process alone: no
    warning filter, unraisable hook, logging level or logging filter is added or changed."""
    import logging
    import sys

    def settings():
        loggers = [logging.getLogger(name) for name in ("absl", "asyncio", "")]
        return (list(warnings.filters), sys.unraisablehook, [(g.level, list(g.filters)) for g in loggers])

    with warnings.catch_warnings():
        before = settings()
        with Checkpointer(tmp_path) as ckpt:
            monkeypatch.setattr(ckpt.manager, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
            with pytest.raises(CheckpointWriteError):
                ckpt.save(make_state(step=4))
        assert settings() == before


def test_the_command_hides_the_commits_a_failed_save_abandoned(monkeypatch):
    """orbax cancels a failed step's other commit threads; one cancelled before it started leaves its
    coroutine never awaited, and Python warned about it at exit, after the error line: the command
    boundary (``jaxllm.orbax_noise.install``, called by ``cli.run``) hides that warning."""
    import logging
    import sys

    from jaxllm import orbax_noise

    async def commit():  # stands for orbax's commit coroutine
        pass

    def collect_warnings_of(coroutine) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            del coroutine[:]
            gc.collect()
        return [str(w.message) for w in caught if "never awaited" in str(w.message)]

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    filters = {name: list(logging.getLogger(name).filters) for name in ("absl", "asyncio")}
    with warnings.catch_warnings():  # the filter install() adds ends with this test
        warnings.simplefilter("always")
        assert collect_warnings_of([commit()]) == [f"coroutine '{commit.__qualname__}' was never awaited"]
        orbax_noise.install()
        assert collect_warnings_of([commit()]) == []
    for name, kept in filters.items():
        logging.getLogger(name).filters[:] = kept


def test_checkpoint_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointWriteError, match="it is a file, not a directory"):
        Checkpointer(tmp_path / "file")
