"""``jaxllm scaling``: a minimal sweep (2 points) writes scaling.csv and scaling.png on CPU."""

import csv
import os

import pytest

from parity import TRAJECTORY, assert_close

PEAK = 1e12


def test_minimal_sweep_writes_csv_and_plot(load_script, tmp_path):
    scaling = load_script("scaling")
    out = tmp_path / "scaling"
    scaling.main(["--devices", "1,2", "--batch", "4", "--sizes", "tiny", "--steps", "2", "--warmup", "0",
                  "--context", "16", "--vocab-size", "64", "--peak-flops", str(PEAK), "--out", str(out)])
    with open(out / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["devices"]) for r in rows] == [1, 2]  # each from its own subprocess with forced devices
    assert [r["parallel"] for r in rows] == ["single", "sharded"]
    assert tuple(rows[0]) == scaling.COLUMNS
    for r in rows:
        assert r["backend"] == "cpu" and int(r["tokens_per_step"]) == 4 * 16
        tps, params, devices = float(r["tokens_per_s"]), int(r["params"]), int(r["devices"])
        assert tps == pytest.approx(64 / float(r["step_time_s"]))
        assert float(r["mfu"]) == pytest.approx(6 * params * tps / (PEAK * devices))
    # the same batches on 1 and 2 devices: the same training, to float tolerance
    assert_close(float(rows[1]["loss_last"]), float(rows[0]["loss_last"]), TRAJECTORY, err_msg="loss_last, 2 vs 1 device")
    assert float(rows[0]["loss_last"]) != float(rows[0]["loss_first"])
    assert os.path.getsize(out / "scaling.png") > 1000


@pytest.mark.parametrize("flags, message", [  # refused while parsing: argparse names the flag, exit 2
    (["--devices", "0"], "argument --devices: needs integers >= 1, got '0'"),
    (["--batch", "8,x"], "argument --batch: takes comma-separated integers, got '8,x'"),
    (["--peak-flops", "-1"], "argument --peak-flops: must be > 0, got -1"),
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
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
])
def test_bad_sizes_are_refused(load_script, tmp_path, flags, message):
    scaling = load_script("scaling")
    with pytest.raises(ValueError, match=message):
        scaling.main(flags + ["--out", str(tmp_path)])


def test_a_batch_that_no_device_count_divides_runs_nothing(load_script, tmp_path):
    scaling = load_script("scaling")
    with pytest.raises(ValueError, match="no point of the sweep could run"):
        scaling.main(["--devices", "2", "--batch", "3", "--sizes", "tiny", "--steps", "1", "--out", str(tmp_path)])
