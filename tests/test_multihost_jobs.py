"""The language-model job across processes, launched as the localhost recipe of docs/parallelism.md does: two
``jaxllm train lm`` processes with 2 CPU devices each (``--coordinator/--num-processes/--process-id``,
gloo collectives) train as one process with 4 devices does -- the same losses and final
parameters -- with the data-parallel split reading a memory-mapped token directory, with FSDP,
and with shard_map stopped by a SIGTERM to one of its two processes and resumed as 1 x 4 (sharded).
One 1 x 4 reference run (``--text``) serves all three.

The runs use SGD with momentum, not the job's default AdamW: Adam's first updates are the sign of
each gradient element, so an element whose gradient sits at rounding level moves by a whole
learning rate one way or the other depending on the order of a sum (seen here: a few embedding
rows of one corpus differed by 5e-4 while every loss matched). With SGD a difference in the
gradients shows as a difference of the same size in the parameters.
"""

import json
import signal
import subprocess
import time

import numpy as np
import pytest

import processes as children
from corpus import english


STEPS, TIMEOUT_S = 24, 240
TEXT = english(60_000)


def lm_flags(corpus, out, *extra) -> list[str]:
    """The job's flags on ``corpus``: a text file, or a token directory (``jaxllm prepare``) of one."""
    data = ["--tokens", str(corpus)] if corpus.is_dir() else ["--text", str(corpus), "--vocab-size", "300"]
    return ["train", "lm", *data, "--preset", "tiny", "--context", "16",
            "--batch-size", "8", "--d-model", "16", "--heads", "2", "--steps", str(STEPS), "--log-every", "4",
            "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.5",
            "--sample-tokens", "8", "--eval-batch-size", "8", "--no-progress", "--out", str(out), *extra]


def launch(flags: list[str], *, processes: int, devices: int) -> list:
    """``jaxllm FLAGS`` as ``processes`` localhost processes of ``devices`` CPU devices each
    (``--cpu-devices`` sets the count; the session's compilation cache is shared)."""
    port = children.free_port()
    multihost = lambda i: (["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                            "--process-id", str(i)] if processes > 1 else [])
    return [children.start(["-m", "jaxllm", *flags, "--cpu-devices", str(devices), *multihost(i)])
            for i in range(processes)]


def wait(procs: list, *, returncode: int = 0) -> None:
    children.finish(procs, TIMEOUT_S, returncode=returncode)


def train_losses(out) -> list[float]:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == list(range(1, STEPS + 1)), f"{out}: one train row per step, logged once"
    return [r["loss"] for r in rows if r["split"] == "train"]


def final_params(out):
    from jaxllm.pretrained import load_run

    _, params, _, step = load_run(str(out))
    assert step == STEPS
    import jax

    return jax.tree_util.tree_leaves(params)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output directories: the 1 x 4 reference, 2 x 2 sharded, 2 x 2 fsdp, and 2 x 2 stopped by
    SIGTERM then resumed 1 x 4 (with the interrupted run's summary)."""
    root = tmp_path_factory.mktemp("multihost_lm")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    out = {name: root / name for name in ("reference", "sharded", "fsdp", "resumed")}
    from jaxllm.data.token_file import prepare_tokens

    prepare_tokens([str(corpus)], root / "tokens", vocab_size=300)  # the same ids as --text (test_token_file)
    first = [*launch(lm_flags(corpus, out["reference"]), processes=1, devices=4),
             *launch(lm_flags(root / "tokens", out["sharded"]), processes=2, devices=2)]  # memory-mapped rows
    # a checkpoint at every step makes each step slow enough for the signal to land mid-run
    cut = launch(lm_flags(corpus, out["resumed"], "--checkpoint-every", "1", "--parallel", "shard_map"),
                 processes=2, devices=2)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out["resumed"] / "checkpoints" / "2").exists():
            assert all(p.poll() is None for p in cut) and time.monotonic() < deadline, cut[0].communicate()[1][-3000:]
            time.sleep(0.05)
        cut[1].send_signal(signal.SIGTERM)  # one process only (one pod evicted): every process stops
        wait(cut, returncode=128 + signal.SIGTERM)
        interrupted = json.load(open(out["resumed"] / "summary.json"))
        fsdp = launch(lm_flags(corpus, out["fsdp"], "--parallel", "fsdp"), processes=2, devices=2)
        resumed = launch(["train", "lm", "--resume", "--out", str(out["resumed"]), "--checkpoint-every", "100",
                          "--parallel", "sharded"], processes=1, devices=4)
        wait(first)
        wait(fsdp)
        wait(resumed)
    finally:
        for p in first + cut:
            if p.poll() is None:
                p.kill()
    return out, interrupted


def assert_same_run(out, reference) -> None:
    from parity import TRAJECTORY, assert_close  # here: it imports torch

    assert_close(train_losses(out), train_losses(reference), TRAJECTORY, err_msg=f"{out.name}: losses")
    for a, b in zip(final_params(out), final_params(reference), strict=True):
        assert_close(np.asarray(a), np.asarray(b), TRAJECTORY, err_msg=f"{out.name}: final parameters")


def test_two_processes_train_as_one_process_with_four_devices(runs):
    out, _ = runs
    for run in ("reference", "sharded"):
        summary = json.load(open(out[run] / "summary.json"))
        assert summary["parallel"] == {"strategy": "sharded", "devices": 4} and summary["status"] == "finished"
    assert summary["data"]["tokens"].endswith("tokens")  # the 2 x 2 run read the token directory
    assert_same_run(out["sharded"], out["reference"])
    losses = train_losses(out["reference"])
    assert losses[-1] < losses[0]  # it trained


def test_fsdp_across_two_processes_matches(runs):
    out, _ = runs
    assert json.load(open(out["fsdp"] / "summary.json"))["parallel"] == {"strategy": "fsdp", "devices": 4}
    assert_same_run(out["fsdp"], out["reference"])


def test_a_run_stopped_as_2x2_resumes_as_1x4_and_ends_equal(runs):
    out, interrupted = runs
    assert interrupted["status"] == "interrupted" and interrupted["signal"] == "SIGTERM"
    # every process stopped at the same step, decided together at a --log-every step
    stopped = interrupted["interrupted_at_step"]
    assert stopped % 4 == 0 and interrupted["last_checkpoint"] == stopped < STEPS
    summary = json.load(open(out["resumed"] / "summary.json"))
    assert summary["resumed_from"] == stopped and summary["parallel"] == {"strategy": "sharded", "devices": 4}
    assert_same_run(out["resumed"], out["reference"])


def test_an_error_on_one_process_ends_every_process_at_once(tmp_path):
    """Process 0 alone refuses a --out that another run holds; the other process must not wait in
    JAX's shutdown barrier (minutes) for it: both end within seconds."""
    from jaxllm.runio import lock_run_dir, unlock_run_dir

    (tmp_path / "corpus.txt").write_text(TEXT[:5000])
    out = tmp_path / "busy"
    assert lock_run_dir(out, process_index=0)  # this test process holds it, as a live run would
    try:
        procs = launch(lm_flags(tmp_path / "corpus.txt", out), processes=2, devices=2)
        results = []
        for p in procs:
            try:
                results.append((p.wait(timeout=90), p.stderr.read()))
            except subprocess.TimeoutExpired:
                pytest.fail("a process of a failed multi-host run was still waiting after 90 s")
    finally:
        unlock_run_dir(out)
        for p in procs:
            if p.poll() is None:
                p.kill()
    (code0, err0), (code1, _) = results
    assert code0 == 2 and "in use by another run" in err0, err0[-2000:]
    assert code1 != 0
