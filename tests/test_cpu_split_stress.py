"""The default CPU split (one device per core) under stress: short steps dispatched far ahead of
the host, beside a CPU-bound process. XLA's CPU client deadlocked here when more than 32 steps were
in flight (``jaxllm.training.parallel.MAX_STEPS_IN_FLIGHT`` says why): the rendezvous aborted the
process. The collective timeouts are shortened so that a deadlock fails in seconds, not minutes."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CORPUS = ROOT / "tests" / "data" / "alls_well.txt"
DEADLOCK_FAILS_FAST = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=5 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=15")


@pytest.fixture
def competing_cpu_load():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    busy.kill()
    busy.wait()


def test_two_cpu_devices_train_to_the_end_with_many_steps_dispatched_ahead(tmp_path, competing_cpu_load):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLLM_CPU_DEVICES": "2", "XLA_FLAGS": DEADLOCK_FAILS_FAST}
    # --log-every above --steps: nothing fetches the metrics, so the loop dispatches every step at once
    done = subprocess.run(
        [sys.executable, "-m", "jaxllm", "train", "lm", "--preset", "tiny", "--text", str(CORPUS), "--vocab-size", "300",
         "--context", "32", "--batch-size", "4", "--steps", "400", "--log-every", "1000", "--sample-tokens", "8",
         "--no-progress", "--no-compile-cache", "--out", str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 400
    assert summary["parallel"] == {"strategy": "sharded", "devices": 2}
