"""Configs as data (``jaxllm.training.run_flags`` + ``jaxllm.options``): every run writes its flags
to ``config.yaml``; ``--resume`` reads them back, ``--config FILE|PRESET`` reads a file as the
defaults, flags on the command line override both; bad files, keys and values are one line."""

import json

import pytest
import yaml

from jaxllm import cli
from jaxllm.options import file_values, spec
from jaxllm.training import run_flags
from jaxllm.training.optim import OPTIMIZERS
from jaxllm.runio import unlock_run_dir

FAST = ["--no-progress"]


def flags_of(out):
    return yaml.safe_load((out / "config.yaml").read_text())


def test_a_run_writes_every_flag_and_resume_needs_only_out(load_script, tmp_path):
    linreg = load_script("linreg")
    linreg.main(["--out", str(tmp_path), "--steps", "20", "--lr", "0.05", "--points", "12", *FAST])
    written = flags_of(tmp_path)
    assert written["lr"] == 0.05 and written["steps"] == 20 and written["points"] == 12
    assert written["clip-norm"] is None and written["no-progress"] is True
    only = [f.key for f in spec.flags(linreg.LinregConfig) if f.command_line_only]
    assert {"out", "config", "resume", "overwrite", "accept-data-change", "num-processes"} <= set(only)
    for key in only:  # where and whether to run, not how: never in the file
        assert key not in written
    unlock_run_dir(tmp_path)
    # lr 0.05 and 12 points come from config.yaml: with the defaults (lr 0.1) the resume would be refused
    summary = linreg.main(["--out", str(tmp_path), "--resume", "--steps", "30"])
    assert summary["resumed_from"] == 20 and summary["steps"] == 30
    assert flags_of(tmp_path) == {**written, "steps": 30}
    unlock_run_dir(tmp_path)
    with pytest.raises(ValueError, match=r"different config \(saved → this run\):\n  optimizer.lr: 0.05 → 0.1$"):
        linreg.main(["--out", str(tmp_path), "--resume", "--steps", "40", "--lr", "0.1"])
    assert flags_of(tmp_path)["steps"] == 30, "a refused resume leaves the run's config.yaml as it was"
    unlock_run_dir(tmp_path)
    linreg.main(["--out", str(tmp_path), "--overwrite", "--steps", "2", *FAST])
    assert flags_of(tmp_path)["lr"] == 0.1, "--overwrite starts from the defaults, not the old run's file"


def test_config_file_gives_the_defaults_and_the_command_line_wins(load_script, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("lr: 0.05\nsteps: 7\noptimizer: adam\nhidden: [8, 4]\n")
    summary = load_script("mlp").main(["--out", str(tmp_path / "a"), "--config", str(config), "--lr", "0.01", *FAST])
    written = flags_of(tmp_path / "a")
    assert (written["lr"], written["steps"], written["optimizer"], written["hidden"]) == (0.01, 7, "adam", [8, 4])
    assert summary["steps"] == 7
    # --epochs on the command line replaces the file's --steps (they exclude each other)
    summary = load_script("mlp").main(["--out", str(tmp_path / "b"), "--config", str(config), "--epochs", "1", *FAST])
    assert flags_of(tmp_path / "b")["steps"] is None and summary["steps"] == 456 // 32  # 456 training rows


@pytest.mark.parametrize("text, message", [
    ("lrr: 1\nbatch_size: 3\n", "--config {file}: unknown keys lrr, batch_size (did you mean lrr -> lr, "
                                "batch_size -> batch-size?)"),
    ("out: runs/x\n", "--config {file}: unknown key out (out: command line only)"),
    ("lr: -1\n", "argument --lr in --config {file}: must be > 0, got -1"),
    ("steps: 2.5\n", "argument --steps in --config {file}: must be an integer >= 1, got '2.5'"),
    ("optimizer: rmsprop\n", "argument --optimizer in --config {file}: invalid choice: 'rmsprop' (choose from "
                             f"{', '.join(OPTIMIZERS)})"),
    ("no-progress: maybe\n", "argument --no-progress in --config {file}: must be true or false, got 'maybe'"),
    ("lr: [1\n", "argument --config: {file} is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2"),
    ("- lr\n", "argument --config: {file} must hold a mapping of flag names to values (e.g. 'lr: 0.001')"),
])
def test_a_bad_config_file_is_one_line_naming_what(load_script, tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exc:
        load_script("linreg").main(["--out", str(tmp_path / "out"), "--config", str(config)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + message.format(file=config)) and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_preset_is_named_bare_and_an_unknown_one_lists_them(load_script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script("lm").main(["--out", str(tmp_path), "--config", "dmeo"])
    assert "error: argument --config: no file 'dmeo' and no such preset (presets: burkov, demo)" \
        in capsys.readouterr().err


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("job, name", [(p.parent.name, p.stem) for p in sorted(run_flags.PRESET_DIR.glob("*/*.yaml"))])
def test_every_shipped_preset_parses_as_its_jobs_flags(load_script, monkeypatch, tmp_path, job, name):
    def stop(config):
        raise _Parsed(config)

    monkeypatch.setattr(cli, "start", stop)
    with pytest.raises(_Parsed) as parsed:
        load_script(job).main(["--out", str(tmp_path), "--config", name])
    flags = file_values(parsed.value.args[0])
    for key, value in run_flags.read_flags(run_flags.preset_path(job, name)).items():
        assert flags[key] == value, key
    assert json.dumps(flags)  # plain data


def test_resume_with_more_steps_extends_constant_and_wsd_runs_only(load_script, tmp_path, capsys):
    """A constant or wsd run trains every step before its decay at the same rate whatever its
    length: ``--resume --steps N`` extends it (a wsd run that had decayed says the rate jumps back);
    a cosine run's rates depend on its length, so its extension is refused."""
    linreg = load_script("linreg")
    for schedule in ("constant", "wsd", "warmup_cosine"):
        out = tmp_path / schedule
        linreg.main(["--out", str(out), "--steps", "10", "--schedule", schedule, *FAST])
        capsys.readouterr()
        if schedule == "warmup_cosine":
            with pytest.raises(ValueError, match=r"different config.*\n.*optimizer.total_steps: 10 → 20"):
                linreg.main(["--out", str(out), "--resume", "--steps", "20"])
            continue
        summary = linreg.main(["--out", str(out), "--resume", "--steps", "20"])
        assert summary["steps"] == 20 and summary["resumed_from"] == 10
        notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: the wsd")]
        assert notes == ([] if schedule == "constant" else [
            "note: the wsd schedule now runs 20 steps (it ran 10): its decay moves from steps 8-10 to 16-20; "
            "step 10 had already decayed: the rate jumps back to the stable one"])
