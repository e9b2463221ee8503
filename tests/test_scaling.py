"""``jaxllm scaling``: a minimal sweep (3 points: 1 and 2 devices in one process, 2 devices over 2
localhost processes) writes scaling.csv and scaling.png on CPU; the worker launcher kills every
worker when one fails or they time out; bad flags are refused."""

import csv
import os
import sys
import time

import pytest

from jaxllm import cli
from parity import TRAJECTORY, assert_close

PEAK = 1e12


def test_minimal_sweep_writes_csv_and_plot(load_script, tmp_path, capsys):
    scaling = load_script("scaling")
    out = tmp_path / "scaling"
    scaling.main(["--processes", "1,2", "--devices", "1,2", "--batch", "4", "--sizes", "d64", "--steps", "2",
                  "--warmup", "0", "--context", "16", "--vocab-size", "64", "--peak-flops", str(PEAK),
                  "--out", str(out)])
    assert "note: skipping 1 devices over 2 processes: 1 does not divide by 2" in capsys.readouterr().out
    with open(out / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    # each group from its own subprocesses with forced devices: 1 process of 1 and of 2 devices,
    # then 2 localhost processes of 1 device each
    assert [(int(r["processes"]), int(r["devices"])) for r in rows] == [(1, 1), (1, 2), (2, 2)]
    assert [r["parallel"] for r in rows] == ["single", "sharded", "sharded"]
    assert tuple(rows[0]) == scaling.COLUMNS
    for r in rows:
        assert r["backend"] == "cpu" and int(r["tokens_per_step"]) == 4 * 16
        tps, params, devices = float(r["tokens_per_s"]), int(r["params"]), int(r["devices"])
        assert tps == pytest.approx(64 / float(r["step_time_s"]))
        assert float(r["mfu"]) == pytest.approx(6 * params * tps / (PEAK * devices))
    # the same batches on 1 device, 2 devices and 2 processes x 1 device: the same training
    pairs = {"2 devices vs 1": (rows[1], rows[0]), "2 processes x 1 device vs 1 x 2": (rows[2], rows[1])}
    for what, (r, reference) in pairs.items():
        for column in ("loss_first", "loss_last"):
            assert_close(float(r[column]), float(reference[column]), TRAJECTORY, err_msg=f"{column}, {what}")
    assert float(rows[0]["loss_last"]) != float(rows[0]["loss_first"])
    assert os.path.getsize(out / "scaling.png") > 1000


def test_one_failing_worker_stops_the_point(load_script, capsys):
    scaling = load_script("scaling")
    # a 2-process point whose process 1 fails (here: it refuses its flags) while process 0 waits
    # for it in jax.distributed: process 0 is killed, not left to its 30 s collective timeout
    argv = ["--batch", "2", "--sizes", "d64", "--steps", "1", "--warmup", "0", "--context", "8", "--vocab-size", "32"]
    coordinator = f"127.0.0.1:{scaling.free_port()}"
    workers = [scaling.worker(argv, 2, 2, 0, coordinator),
               scaling.worker(argv + ["--sizes", "huge"], 2, 2, 1, coordinator)]
    t0 = time.monotonic()
    with pytest.raises(ChildProcessError, match=r"^the point: process 1 of 2 failed \(exit 1\); its error is above$"):
        scaling.launch(workers, "the point", timeout_s=120)
    assert time.monotonic() - t0 < 25
    assert "[process 1] ValueError: --sizes must be among" in capsys.readouterr().err


def test_workers_that_time_out_are_all_killed(load_script, tmp_path):
    scaling = load_script("scaling")
    pids = [tmp_path / "0.pid", tmp_path / "1.pid"]
    sleeper = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
    with pytest.raises(TimeoutError, match="the group did not finish within --timeout 1 s: all its processes were"):
        scaling.launch([([sys.executable, "-c", sleeper, str(p)], dict(os.environ)) for p in pids], "the group",
                       timeout_s=1)
    for p in pids:  # both started, then killed (and reaped): no process of that id is left
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.read_text()), 0)


def test_processes_are_launched_only_by_one_cpu_process(load_script):
    scaling = load_script("scaling")

    def args(*flags):
        config = cli.parse(scaling.ScalingConfig, list(flags))
        config.check()
        return config

    assert scaling.launches_workers(args("--processes", "1,2", "--devices", "2"), "cpu", 1)
    launched_by_hand = args("--devices", "4")
    assert not scaling.launches_workers(launched_by_hand, "cpu", 2)
    assert scaling.process_counts(launched_by_hand, "cpu", 2) == (2,)
    assert not scaling.launches_workers(args("--processes", "2", "--devices", "4"), "cpu", 2)  # the count running
    assert not scaling.launches_workers(args(), "gpu", 1)
    with pytest.raises(ValueError, match="only a CPU run of one process launches processes itself; this run has "
                                         "1 process"):
        scaling.launches_workers(args("--processes", "1,2", "--devices", "2"), "gpu", 1)
    with pytest.raises(ValueError, match="can only be 2"):
        scaling.launches_workers(args("--processes", "4", "--devices", "4"), "cpu", 2)


@pytest.mark.parametrize("flags, message", [  # refused while parsing: argparse names the flag, exit 2
    (["--devices", "0"], "argument --devices: needs integers >= 1, got '0'"),
    (["--batch", "8,x"], "argument --batch: takes comma-separated integers, got '8,x'"),
    (["--peak-flops", "-1"], "argument --peak-flops: must be > 0, got -1"),
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["--processes", "0"], "argument --processes: needs integers >= 1, got '0'"),
    (["--processes", "1,2.5"], "argument --processes: takes comma-separated integers, got '1,2.5'"),
])
def test_bad_flags_are_refused(load_script, tmp_path, capsys, flags, message):
    scaling = load_script("scaling")
    with pytest.raises(SystemExit) as exc:
        scaling.main(flags + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message} (see ") and "\n" not in err, err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--sizes", "huge"], "--sizes must be among"),
    (["--sizes", ","], "--sizes names no size"),
    (["--processes", "1,3", "--devices", "1,2,4"], "--processes 3 divides none of --devices 1,2,4"),
    (["--processes", "2", "--devices", "2", "--parallel", "pmap"], "--parallel pmap runs in one process"),
])
def test_bad_sizes_and_processes_are_refused(load_script, tmp_path, flags, message):
    scaling = load_script("scaling")
    with pytest.raises(ValueError, match=message):
        scaling.main(flags + ["--out", str(tmp_path)])


def test_a_batch_that_no_device_count_divides_runs_nothing(load_script, tmp_path):
    scaling = load_script("scaling")
    with pytest.raises(ValueError, match="no point of the sweep could run"):
        scaling.main(["--devices", "2", "--batch", "3", "--sizes", "d64", "--steps", "1", "--out", str(tmp_path)])
