"""One owner of a run directory (jaxllm.runio.claim_run_dir): which job made a run, another job's
run refused, --overwrite that removes nothing until the new run has a checkpoint, and a start that
fails leaving no directory it created."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from jaxllm import runio

FAST = ["--no-progress", "--no-compile-cache"]


def fake_run(out, job: str) -> dict:
    """A finished run's files as a job leaves them: ``{relative path: content}``."""
    files = {"checkpoints/4/state": "weights", "metrics.jsonl": '{"step": 4}\n', "config.yaml": "steps: 4\n",
             "summary.json": '{"status": "finished"}', runio.RUN_FILE: json.dumps({"job": job})}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return files


def contents(out) -> dict:
    return {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}


def jaxllm(*args):
    return subprocess.run([sys.executable, "-m", "jaxllm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_a_run_records_its_job_and_another_job_is_refused_naming_both(tmp_path, load_script):
    load_script("linreg").main(["--out", str(tmp_path), "--steps", "2", *FAST])
    runio.unlock_run_dir(tmp_path)
    assert runio.read_run_job(tmp_path) == "linreg"
    with pytest.raises(ValueError, match=f"{tmp_path} holds a run of another job \\(linreg\\); this is logreg"):
        load_script("logreg").main(["--out", str(tmp_path), "--steps", "2", *FAST])
    assert runio.read_run_job(tmp_path) == "linreg"


def test_overwrite_with_a_bad_command_keeps_the_old_run_whole(tmp_path):
    old = fake_run(tmp_path, "lm")
    done = jaxllm("train", "lm", "--out", str(tmp_path), "--overwrite", "--text", str(tmp_path / "missing.txt"), *FAST)
    assert done.returncode == 2 and "missing.txt" in done.stderr.strip().splitlines()[-1], done.stderr
    assert contents(tmp_path) == old
    assert not (tmp_path / runio.PREVIOUS_RUN).exists()


def test_a_start_that_fails_leaves_no_directory_it_created(tmp_path):
    out = tmp_path / "new"
    done = jaxllm("train", "lm", "--out", str(out), "--text", str(tmp_path / "missing.txt"), *FAST)
    assert done.returncode == 2, done.stderr
    assert not out.exists()


def test_overwrite_deletes_the_old_run_once_the_new_one_has_a_checkpoint(tmp_path, load_script):
    fake_run(tmp_path, "lm")
    load_script("linreg").main(["--out", str(tmp_path), "--overwrite", "--steps", "2", *FAST])
    runio.unlock_run_dir(tmp_path)
    assert not (tmp_path / runio.PREVIOUS_RUN).exists()
    assert runio.read_run_job(tmp_path) == "linreg"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # the old step 4 is gone with its run


def test_a_replaced_run_whose_successor_died_before_a_checkpoint_comes_back(tmp_path, load_script):
    old = fake_run(tmp_path, "linreg")
    runio.claim_run_dir(tmp_path, "linreg", resume=False, overwrite=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # the new run's, then it is killed
    runio.unlock_run_dir(tmp_path)
    assert contents(tmp_path) == {"metrics.jsonl": '{"step": 1}\n', runio.RUN_FILE: '{\n  "job": "linreg"\n}\n',
                                  **{f"{runio.PREVIOUS_RUN}/{k}": v for k, v in old.items()}}
    runio.claim_run_dir(tmp_path, "linreg", resume=True, overwrite=False)  # the next start finds it
    runio.unlock_run_dir(tmp_path)
    assert contents(tmp_path) == old
