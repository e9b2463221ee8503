"""One command-line convention for every job: flags spelled out (no abbreviations), the closest
name suggested for a misspelled flag, choice or command, ``jaxllm --version``, plain-text help,
and paths stored absolute so a run resumes from any working directory."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from jaxllm import command


def refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip()


def test_an_abbreviated_flag_is_refused_and_the_full_one_suggested(load_script, capsys, tmp_path):
    err = refused(load_script("linreg").main, ["--out", str(tmp_path), "--step", "5"], capsys)
    assert err.startswith("error: unrecognized arguments: --step 5 (did you mean --steps?)"), err
    assert not tmp_path.joinpath("checkpoints").exists()


def test_a_misspelled_flag_and_choice_get_the_closest(load_script, capsys, tmp_path):
    err = refused(load_script("lm").main, ["--out", str(tmp_path / "a"), "--vocab-sise", "300"], capsys)
    assert "unrecognized arguments: --vocab-sise 300 (did you mean --vocab-size?)" in err
    err = refused(load_script("lm").main, ["--out", str(tmp_path / "b"), "--preset", "tinyy"], capsys)
    assert "invalid choice: 'tinyy'" in err and "(did you mean tiny?)" in err
    err = refused(load_script("lm").main, ["--out", str(tmp_path / "c"), "--config", "dem"], capsys)
    assert "no such preset (presets: burkov, demo) (did you mean demo?)" in err


def test_a_misspelled_command_gets_the_closest_and_version_answers(capsys):
    err = refused(command.main, ["trian", "lm"], capsys)
    assert err == "error: unknown command 'trian' (did you mean train?) (see jaxllm --help)"
    err = refused(command.main, ["train", "lmm"], capsys)
    assert err.startswith("error: unknown job 'lmm' (did you mean lm?) for jaxllm train")
    done = subprocess.run([sys.executable, "-m", "jaxllm", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "jaxllm 0.1.0"


@pytest.mark.parametrize("job", ["lm", "generate", "classify"])
def test_help_is_plain_text(load_script, capsys, job):
    with pytest.raises(SystemExit):
        load_script(job).main(["--help"])
    text = capsys.readouterr().out
    assert "`" not in text and "eval_shape" not in text and "{'" not in text  # no Python dict either


def test_a_run_resumes_from_another_working_directory(load_script, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / "corpus.txt").write_text((ROOT / "tests" / "data" / "alls_well.txt").read_text()[:6000])
    tiny = ["--preset", "tiny", "--vocab-size", "300", "--context", "16", "--batch-size", "8", "--d-model", "16",
            "--heads", "2", "--sample-tokens", "4", "--eval-batch-size", "8", "--no-progress"]
    lm = load_script("lm")
    monkeypatch.chdir(first)
    lm.main(["--text", "corpus.txt", "--out", "run", "--steps", "2", "--schedule", "constant", "--warmup-steps", "0", *tiny])
    from jaxllm.runio import unlock_run_dir

    unlock_run_dir(first / "run")
    monkeypatch.chdir(second)
    summary = lm.main(["--out", str(first / "run"), "--resume", "--steps", "4"])
    assert summary["status"] == "finished" and summary["steps"] == 4 and summary["resumed_from"] == 2


def test_a_run_written_by_the_previous_code_resumes(load_script, tmp_path, monkeypatch):
    """tests/data/run_of_the_previous_code: 2 steps of `jaxllm train lm --text corpus.txt --out run`
    (tiny preset) written before runs recorded their job and data and stored paths absolute; its
    config.yaml holds the relative --text path, so the resume runs from a directory holding it."""
    import shutil

    shutil.copytree(ROOT / "tests" / "data" / "run_of_the_previous_code", tmp_path / "run")
    (tmp_path / "corpus.txt").write_bytes((ROOT / "tests" / "data" / "alls_well.txt").read_bytes()[:6000])
    monkeypatch.chdir(tmp_path)
    summary = load_script("lm").main(["--out", "run", "--resume", "--steps", "4"])
    assert summary["status"] == "finished" and summary["steps"] == 4 and summary["resumed_from"] == 2


def test_size_flags_say_each_presets_value(load_script, capsys):
    with pytest.raises(SystemExit):
        load_script("lm").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the model width (default: the preset's -- decoder: burkov 128, tiny 16, llama 128; gpt2: tiny 64, " \
           "gpt2_124m 768, gpt2_medium 1024)" in text
    assert "gpt2_124m 12, gpt2_medium 24" in text and "gpt2_124m 12, gpt2_medium 16" in text
