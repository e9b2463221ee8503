"""fit(): outputs on disk, resume = the same run, NaN stops with the last good checkpoint kept."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm.data.batches import ArrayBatches
from jaxllm.models.mlp import MLPConfig
from jaxllm.training import (Checkpointer, FitConfig, OptimizerConfig, TrainingDiverged, TrainState, fit,
                             make_optimizer, make_train_step)
from jaxllm.training.loop import TrainingInterrupted
from jaxllm.training.losses import softmax_cross_entropy
from jaxllm.runio import RunDirectoryBusy

CONFIG = MLPConfig(num_inputs=4, num_outputs=3, hidden=(8,))
OPT = OptimizerConfig("adamw", lr=1e-2, weight_decay=0.1, schedule="warmup_cosine", warmup_steps=3, total_steps=20)


def make_data(seed=0, n=40):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)}


def fresh():
    optimizer = make_optimizer(OPT)
    state = TrainState.create(CONFIG.init(jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))
    step = make_train_step(softmax_cross_entropy(CONFIG.apply), optimizer)
    return state, step, ArrayBatches(make_data(), batch_size=8, seed=5)  # 5 steps an epoch, shuffled


class Killed(Exception):
    pass


class DiesAfter:
    """Wraps a batch source and 'kills the process' when step ``n + 1`` asks for its batch."""

    def __init__(self, source, n):
        self.source, self.left = source, n
        self.batch_size, self.steps_per_epoch = source.batch_size, source.steps_per_epoch

    def next(self):
        if self.left == 0:
            raise Killed
        self.left -= 1
        return self.source.next()

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_fit_writes_metrics_summary_plot_and_checkpoints(tmp_path):
    state, step, data = fresh()
    evals = []

    def eval_fn(params):
        evals.append(1)
        return {"loss": 1.0}

    fit(state, step, data, FitConfig(out_dir=tmp_path, steps=20, eval_every=10, checkpoint_every=5, keep=2,
        log_every=3, progress=False), eval_fn=eval_fn)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 21))
    assert [r["step"] for r in rows if r["split"] == "eval"] == [10, 20]
    assert all(np.isfinite(r["loss"]) and "grad_norm" in r and "accuracy" in r for r in rows if r["split"] == "train")
    assert [r["step"] for r in rows if "examples_per_s" in r] == [3, 5, 6, 9, 10, 12, 15, 18, 20]  # every flush
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["status"] == "finished" and summary["steps"] == 20 and summary["examples_per_s"] > 0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [15, 20]  # keep=2
    assert len(evals) == 2


def test_every_evaluation_checkpoints_and_only_the_last_is_the_final_one(tmp_path):
    state, step, data = fresh()
    calls = []

    def evaluation(name, loss):
        return lambda params: calls.append(name) or {"loss": loss}

    fit(state, step, data, FitConfig(out_dir=tmp_path, steps=12, eval_every=4, keep=10, log_every=100,
        progress=False), eval_fn=evaluation("periodic", 1.0), final_eval_fn=evaluation("final", 2.0))
    assert calls == ["periodic", "periodic", "final"]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows if r["split"] == "eval"] == [(4, 1.0), (8, 1.0), (12, 2.0)]
    assert json.load(open(tmp_path / "summary.json"))["eval"] == {"loss": 2.0}
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [4, 8, 12]


@pytest.mark.parametrize("minutes, saved", [(None, [12]), (1e-9, [3, 6, 9, 12])])
def test_checkpoint_minutes_saves_by_the_clock_where_metrics_are_fetched(tmp_path, minutes, saved):
    state, step, data = fresh()
    fit(state, step, data, FitConfig(out_dir=tmp_path, steps=12, checkpoint_minutes=minutes, keep=10, log_every=3,
        progress=False))
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == saved


def test_epochs_count_steps_from_the_data():
    state, step, data = fresh()
    with pytest.raises(ValueError, match="exactly one of"):
        fit(state, step, data, FitConfig(out_dir="unused", steps=3, epochs=2))


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    state, step, data = fresh()
    full = fit(state, step, data, FitConfig(out_dir=tmp_path / "a", steps=20, checkpoint_every=5, progress=False))

    state, step, data = fresh()
    with pytest.raises(Killed):
        fit(state, step, DiesAfter(data, 12), FitConfig(out_dir=tmp_path / "b", steps=20, checkpoint_every=5,
            progress=False))
    assert Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 10

    state, step, data = fresh()  # a new process: fresh objects, everything comes from the checkpoint
    with pytest.raises(ValueError, match="already holds checkpoints up to step 10.*--resume"):
        fit(state, step, data, FitConfig(out_dir=tmp_path / "b", steps=20, checkpoint_every=5, progress=False))
    resumed = fit(state, step, data, FitConfig(out_dir=tmp_path / "b", steps=20, checkpoint_every=5, progress=False,
                  resume=True))

    assert int(resumed.step) == 20
    for a, b in zip(leaves(full), leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    rows_a = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    rows_b = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in rows_b] == list(range(1, 21)), "no duplicated or missing steps after resume"
    np.testing.assert_allclose([r["loss"] for r in rows_a], [r["loss"] for r in rows_b], rtol=0, atol=0)
    assert json.load(open(tmp_path / "b" / "summary.json"))["resumed_from"] == 10


class NaNAt:
    """Batches whose inputs turn NaN at step ``n`` (bypassing the boundary checks on purpose)."""

    def __init__(self, source, n):
        self.source, self.n, self.i = source, n, 0
        self.batch_size, self.steps_per_epoch = source.batch_size, source.steps_per_epoch

    def next(self):
        self.i += 1
        batch = self.source.next()
        if self.i >= self.n:
            batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
        return batch

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def test_nan_loss_stops_with_step_number_and_keeps_last_good_checkpoint(tmp_path):
    state, step, data = fresh()
    reference = fit(state, step, data, FitConfig(out_dir=tmp_path / "ref", steps=5, progress=False))

    state, step, data = fresh()
    with pytest.raises(TrainingDiverged, match="loss became nan at step 8.*last good checkpoint: step 5") as err:
        fit(state, step, NaNAt(data, 8), FitConfig(out_dir=tmp_path / "run", steps=20, checkpoint_every=5,
            log_every=4, progress=False))
    assert err.value.step == 8 and err.value.last_checkpoint == 5
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 8

    with Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [5]
        template, _, _ = fresh()
        restored, meta = ckpt.restore(template)
    assert int(restored.step) == 5 and meta["data"]["index"] == 5
    for a, b in zip(leaves(reference.params), leaves(restored.params)):
        np.testing.assert_array_equal(a, b)


def test_recompilation_in_the_loop_is_warned_about(tmp_path):
    state, step, _ = fresh()
    data = make_data()

    class ChangingShapes(ArrayBatches):
        def next(self):
            batch = super().next()
            return batch if self.index % 2 else {k: v[:4] for k, v in batch.items()}

    with pytest.warns(UserWarning, match="recompiled"):
        fit(state, step, ChangingShapes(data, 8), FitConfig(out_dir=tmp_path, steps=4, log_every=1, progress=False))


def test_batches_are_deterministic_and_resumable():
    data = make_data()
    a = ArrayBatches(data, 8, seed=3)
    seq = [a.next()["y"].tolist() for _ in range(12)]
    b = ArrayBatches(data, 8, seed=3)
    for _ in range(7):
        b.next()
    c = ArrayBatches(data, 8, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next()["y"].tolist() for _ in range(5)] == seq[7:]
    assert seq[:5] != seq[5:10], "each epoch is reshuffled"
    with pytest.raises(ValueError, match="batch_size must be in"):
        ArrayBatches(data, 41)
    with pytest.raises(ValueError, match="saved with seed=3"):
        ArrayBatches(data, 8, seed=4).load_state_dict(b.state_dict())


def test_resuming_a_finished_run_keeps_its_summary(tmp_path):
    state, step, data = fresh()
    fit(state, step, data, FitConfig(out_dir=tmp_path, steps=10, progress=False), eval_fn=lambda p: {"loss": 0.5})
    before = json.load(open(tmp_path / "summary.json"))
    state, step, data = fresh()
    done = fit(state, step, data, FitConfig(out_dir=tmp_path, steps=10, resume=True, progress=False),
               eval_fn=lambda p: {"loss": 0.5})
    after = json.load(open(tmp_path / "summary.json"))
    assert int(done.step) == 10
    assert after["final_loss"] == before["final_loss"] and after["examples_per_s"] == before["examples_per_s"]
    assert after["eval"] == {"loss": 0.5}
    state, step, data = fresh()
    with pytest.raises(ValueError, match="checkpoint is at step 10, beyond the 5 steps"):
        fit(state, step, data, FitConfig(out_dir=tmp_path, steps=5, resume=True, progress=False))


def test_resume_without_a_checkpoint_is_an_error_and_a_fresh_run_starts_a_clean_log(tmp_path):
    state, step, data = fresh()
    with pytest.raises(Killed):  # killed before its first checkpoint
        fit(state, step, DiesAfter(data, 6), FitConfig(out_dir=tmp_path, steps=10, checkpoint_every=8, log_every=1,
            progress=False))
    state, step, data = fresh()
    with pytest.raises(ValueError, match=f"nothing to resume: {tmp_path / 'checkpoints'} holds no checkpoint"):
        fit(state, step, data, FitConfig(out_dir=tmp_path, steps=10, resume=True, progress=False))
    fit(state, step, data, FitConfig(out_dir=tmp_path, steps=10, progress=False))
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == list(range(1, 11))


class PoisonAt:
    """A train step that turns one parameter NaN in step ``n``'s update, after its loss was computed:
    the loss of step n is finite, the state saved after it would not be."""

    def __init__(self, train_step, n):
        self.train_step, self.n = train_step, n

    def __call__(self, state, batch):
        state, metrics = self.train_step(state, batch)
        if int(state.step) == self.n:
            poisoned = jax.tree_util.tree_map(lambda p: p.at[(0,) * p.ndim].set(np.nan), state.params)
            state = state.replace(params=poisoned)
        return state, metrics


def test_a_non_finite_state_is_never_saved(tmp_path):
    state, step, data = fresh()
    with pytest.raises(TrainingDiverged, match="4 parameter/optimiser values became NaN or Inf at step 10.*"
                                               "last good checkpoint: step 5") as err:
        fit(state, PoisonAt(step, 10), data, FitConfig(out_dir=tmp_path, steps=20, checkpoint_every=5, log_every=10,
            progress=False))
    assert err.value.last_checkpoint == 5
    assert json.load(open(tmp_path / "summary.json"))["status"] == "diverged"
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [5]
        restored, _ = ckpt.restore(fresh()[0])
    assert all(np.isfinite(x).all() for x in leaves(restored))


class SignalAt(DiesAfter):
    """Sends this process ``signum`` while fetching the batch of step ``n + 1``, as Ctrl-C would."""

    def __init__(self, source, n, signum):
        super().__init__(source, n)
        self.signum = signum

    def next(self):
        if self.left == 0:
            os.kill(os.getpid(), self.signum)
        self.left -= 1
        return self.source.next()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_current_step_and_the_run_resumes(tmp_path, signum):
    state, step, data = fresh()
    full = fit(state, step, data, FitConfig(out_dir=tmp_path / "a", steps=20, checkpoint_every=5, progress=False))
    state, step, data = fresh()
    with pytest.raises(TrainingInterrupted) as err:
        fit(state, step, SignalAt(data, 7, signum), FitConfig(out_dir=tmp_path / "b", steps=20, checkpoint_every=5,
            progress=False))
    assert err.value.step == 8 and err.value.last_checkpoint == 8 and err.value.exit_code == 128 + signum
    summary = json.load(open(tmp_path / "b" / "summary.json"))
    assert summary["status"] == "interrupted" and summary["last_checkpoint"] == 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    state, step, data = fresh()
    resumed = fit(state, step, data, FitConfig(out_dir=tmp_path / "b", steps=20, checkpoint_every=5, progress=False,
                  resume=True))
    for a, b in zip(leaves(full), leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_resume_skips_a_damaged_step_and_sets_it_aside(tmp_path, capsys):
    state, step, data = fresh()
    full = fit(state, step, data, FitConfig(out_dir=tmp_path / "a", steps=20, checkpoint_every=5, progress=False))
    state, step, data = fresh()
    with pytest.raises(Killed):
        fit(state, step, DiesAfter(data, 12), FitConfig(out_dir=tmp_path / "b", steps=20, checkpoint_every=5,
            progress=False))
    metadata = tmp_path / "b" / "checkpoints" / "10" / "state" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:-7])
    state, step, data = fresh()
    resumed = fit(state, step, data, FitConfig(out_dir=tmp_path / "b", steps=20, checkpoint_every=5, progress=False,
                  resume=True))
    err = capsys.readouterr().err
    assert "checkpoint step 10" in err and "is damaged" in err and "resuming from step 5" in err
    assert (tmp_path / "b" / "checkpoints" / "damaged-10" / "state" / "_METADATA").exists()
    for a, b in zip(leaves(full), leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert json.load(open(tmp_path / "b" / "summary.json"))["resumed_from"] == 5


HOLD_LOCK = """
import sys, time
from jaxllm.runio import lock_run_dir
lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_same_directory_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        state, step, data = fresh()
        with pytest.raises(RunDirectoryBusy, match=f"{tmp_path} is in use by another run \\(pid {holder.pid} on "):
            fit(state, step, data, FitConfig(out_dir=tmp_path, steps=3, progress=False))
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    fit(state, step, data, FitConfig(out_dir=tmp_path, steps=3, progress=False))  # released when the holder died
