"""Faults as a user of the scripts meets them: Ctrl-C/SIGTERM, a full disk, an unusable --out, a
run that blows up, --resume with nothing to resume. One `error:`/`interrupted:` line, the right
exit code, no traceback, nothing lost."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
from jaxllm.models.linear import LinearConfig
from jaxllm.training import Checkpointer, OptimizerConfig, TrainingDiverged, TrainState, make_optimizer
from jaxllm.runio import unlock_run_dir

FAST = ["--no-progress"]


def script(name, *args, file_size_limit=None):
    """``python train/<name>.py ARGS`` (the old command form) in a subprocess."""
    return start([sys.executable, str(ROOT / "train" / f"{name}.py"), *args], file_size_limit=file_size_limit)


def jaxllm(*args):
    """``jaxllm ARGS`` (``python -m jaxllm``) in a subprocess."""
    return start([sys.executable, "-m", "jaxllm", *args])


def start(command, file_size_limit=None):
    if file_size_limit is not None:  # writes past the limit fail with EFBIG, as on a full disk
        command = ["bash", "-c", f'trap "" XFSZ; ulimit -f {file_size_limit // 1024}; exec "$@"', "bash", *command]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_once_training(proc, out, signum=signal.SIGINT) -> str:
    """Send ``signum`` once the run's first metrics are written; its stderr."""
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # training has started
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signum)
        return proc.communicate(timeout=120)[1]
    finally:
        proc.kill()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_script_with_a_checkpoint_and_one_line(tmp_path, signum):
    proc = script("logreg", "--out", str(tmp_path), "--steps", "1000000", "--log-every", "50", *FAST)
    err = interrupt_once_training(proc, tmp_path, signum)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["status"] == "interrupted" and summary["signal"] == signal.Signals(signum).name
    step = summary["last_checkpoint"]
    assert step == summary["interrupted_at_step"] > 0
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and f"checkpoint step {step} holds the run" in lines[0]
    assert lines[0].endswith(f"resume with: python {ROOT / 'train' / 'logreg.py'} --out {tmp_path} "
                             "--steps 1000000 --log-every 50 --no-progress --resume")
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [step]


def test_ctrl_c_long_before_an_evaluation_leaves_a_run_that_resumes_from_out_alone(tmp_path):
    """No evaluation or periodic checkpoint is due, yet Ctrl-C after a few steps leaves a checkpoint,
    and ``jaxllm train mlp --out DIR --resume`` (its config.yaml gives every other flag) finishes it."""
    flags = ["--steps", "6000", "--eval-every", "1000000", "--log-every", "50", "--hidden", "16", *FAST]
    err = interrupt_once_training(jaxllm("train", "mlp", "--out", str(tmp_path), *flags), tmp_path)
    interrupted = json.load(open(tmp_path / "summary.json"))
    step = interrupted["last_checkpoint"]
    assert interrupted["status"] == "interrupted" and 0 < step < 6000, err
    line = next(line for line in err.splitlines() if line.startswith("interrupted:"))
    assert line.endswith(f"resume with: jaxllm train mlp --out {tmp_path} {' '.join(flags)} --resume")
    proc = jaxllm("train", "mlp", "--out", str(tmp_path), "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["status"] == "finished" and summary["resumed_from"] == step and summary["steps"] == 6000
    assert summary["test_accuracy"] > 0.9
    train = [row["step"] for row in map(json.loads, open(tmp_path / "metrics.jsonl")) if row["split"] == "train"]
    assert train == list(range(1, 6001))


def test_a_full_disk_is_one_error_line_and_keeps_the_earlier_checkpoints(load_script, tmp_path):
    args = ["--out", str(tmp_path), "--dataset", "digits", "--checkpoint-every", "2", *FAST]
    load_script("cnn").main([*args, "--steps", "2"])
    unlock_run_dir(tmp_path)  # as when that run's process ends
    checkpoint = tmp_path / "checkpoints" / "2"
    sizes = {p: os.path.getsize(p) for p in checkpoint.rglob("*") if p.is_file()}
    # the metrics and summary can be written (the plot may not), the checkpoint cannot: half its
    # largest file was not enough, as orbax splits its data into more, smaller files under load
    limit = 8 * os.path.getsize(tmp_path / "metrics.jsonl")
    assert limit < max(sizes.values()) // 2
    proc = script("cnn", *args, "--steps", "4", "--resume", file_size_limit=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "ERROR" not in err
    assert err.strip().splitlines()[-1] == (f"error: cannot write checkpoint step 4 to {tmp_path / 'checkpoints'}: "
                                            "File too large (errno 27)")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # no orbax tmp dir left
    assert {p: os.path.getsize(p) for p in checkpoint.rglob("*") if p.is_file()} == sizes
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2]


def test_an_unusable_out_is_refused_before_any_work(load_script, tmp_path, capsys):
    linreg = load_script("linreg")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match=f"--out {tmp_path / 'file'} is a file, not a directory"):
        linreg.main(["--out", str(tmp_path / "file"), *FAST])
    with pytest.raises(ValueError, match=f"--out {tmp_path / 'file' / 'run'} is not writable: Not a directory"):
        linreg.main(["--out", str(tmp_path / "file" / "run"), *FAST])
    with pytest.raises(ValueError, match=f"--resume: there is no checkpoint to resume from in {tmp_path / 'new'}"):
        linreg.main(["--out", str(tmp_path / "new"), "--resume", *FAST])
    assert not (tmp_path / "new").exists()  # a refused start leaves no directory it created


def test_a_run_that_blows_up_keeps_only_finite_checkpoints(load_script, tmp_path):
    linreg = load_script("linreg")
    with pytest.raises(TrainingDiverged, match="at step [0-9]+; training stopped") as err:
        linreg.main(["--out", str(tmp_path), "--optimizer", "sgd", "--lr", "1e6", "--steps", "20",
                     "--checkpoint-every", "1", *FAST])
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        steps = ckpt.all_steps()
        assert steps and steps[-1] == err.value.last_checkpoint
        for step in steps:
            meta = ckpt.read_meta(step)
            assert meta["step"] == step
    template = TrainState.create(LinearConfig(num_inputs=1, num_outputs=1).init(jax.random.PRNGKey(0)),
                                 make_optimizer(OptimizerConfig("sgd", lr=1e6)), jax.random.PRNGKey(0))
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        restored, _ = ckpt.restore(template)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored))


def test_a_full_disk_under_the_metrics_log_names_the_file(tmp_path):
    proc = script("logreg", "--out", str(tmp_path), "--steps", "400", "--log-every", "10", *FAST,
                  file_size_limit=4096)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: [Errno 27] cannot write {tmp_path / 'metrics.jsonl'}: "
                                            "File too large")


def test_abandoned_orbax_writes_are_not_logged_after_the_error():
    """asyncio logs "Task (or Future) exception was never retrieved" (a traceback each) for orbax's writes
    of a failed save when Python happens to collect them: the command drops those records, keeps others."""
    import logging

    from jaxllm.orbax_noise import AbandonedOrbaxWrites

    def passes(message: str) -> bool:
        record = logging.getLogger("asyncio").makeRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)
        return AbandonedOrbaxWrites().filter(record)

    orbax_task = ("Task exception was never retrieved\nfuture: <Task finished name='Task-163' coro=<async_serialize_"
                  "from_host.<locals>.write_fragment() done, defined at /x/orbax/checkpoint/_src/serialization.py:188>")
    assert not passes(orbax_task)
    orbax_future = ("Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
                    "'OUT_OF_RANGE: Error writing \"w/0.0\" in OCDBT database at \"/x/4.orbax-checkpoint-tmp/d\"')>")
    assert not passes(orbax_future)
    assert passes("Task exception was never retrieved\nfuture: <Task finished coro=<mine() done, defined at /x/app.py:1>")
    assert passes("Executing <Task pending> took 0.2 seconds")
