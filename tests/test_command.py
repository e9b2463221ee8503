"""The ``jaxllm`` command (``python -m jaxllm``): every job listed, a job run through it, one-line
usage errors, and no JAX started just to list the jobs."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from jaxllm import command


def jaxllm(*args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxllm", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_help_lists_every_job_with_its_summary():
    done = jaxllm("--help")
    assert done.returncode == 0, done.stderr
    listed = {" ".join(line.split()[:len(words)]): line for words in command.JOBS for line in done.stdout.splitlines()
              if line.split()[:len(words)] == list(words)}
    for words, job in command.JOBS.items():
        assert job.summary in listed[" ".join(words)], words
    for expected in ("train lm", "train rnn", "train ngram", "train mlp", "train cnn", "train logreg", "train linreg",
                     "finetune classify", "finetune instruct", "generate", "chat", "export", "bench", "scaling"):
        assert expected in listed, expected


def test_listing_the_jobs_imports_no_job_and_no_jax():
    code = ("import sys\nfrom jaxllm import command\ntry:\n    command.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules\n"
            "             if m.split('.')[0] in ('jax', 'numpy') or m.startswith('jaxllm.jobs.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("args, message", [
    ([], "error: name a command (see jaxllm --help)"),
    (["fly"], "error: unknown command 'fly' (see jaxllm --help)"),
    (["train"], "error: name a job for jaxllm train: one of lm, rnn, ngram, mlp, cnn, logreg, linreg "
                "(see jaxllm --help)"),
    (["finetune", "summarise"], "error: unknown job 'summarise' for jaxllm finetune: one of classify, instruct "
                                "(see jaxllm --help)"),
])
def test_usage_errors_are_one_line(args, message):
    done = jaxllm(*args)
    assert done.returncode == 2 and done.stderr.strip() == message


def test_a_job_runs_through_the_command_and_names_itself(tmp_path):
    done = jaxllm("train", "linreg", "--out", str(tmp_path), "--epochs", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    done = jaxllm("train", "linreg", "--out", str(tmp_path / "x"), "--points", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: argument --points: must be >= 1, got 0 (see jaxllm train linreg --help)"


def test_a_group_lists_its_jobs_and_a_job_shows_its_flags():
    done = jaxllm("finetune", "--help")
    assert done.returncode == 0 and "finetune classify" in done.stdout and "train lm" not in done.stdout
    done = jaxllm("train", "lm", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: jaxllm train lm ") and "--preset" in done.stdout


class _Parser(Exception):
    pass


def job_parser(monkeypatch, target):
    """The ArgumentParser a job builds, caught when ``--help`` prints it (nothing runs)."""
    from jaxllm import cli

    def caught(self, *args, **kwargs):
        raise _Parser(self)

    monkeypatch.setattr(cli.ArgumentParser, "print_help", caught)
    with pytest.raises(_Parser) as parser:
        command.load(target)(["--help"])
    return parser.value.args[0]


# every job built on jaxllm.cli (chat is another author's; bench keeps its own argparse)
OURS = {" ".join(words): job.target for words, job in command.JOBS.items()
        if job.target.startswith(("jaxllm.jobs.", "jaxllm.export"))}


@pytest.mark.parametrize("job", OURS)
def test_help_shows_every_flags_default_in_its_section(monkeypatch, job):
    from jaxllm import cli

    parser = job_parser(monkeypatch, OURS[job])
    formatter = cli.HelpFormatter(prog=job)
    for action in parser._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS and action.nargs != 0:
            text = " ".join(formatter._format_action(action).split())
            assert "(default" in text, (job, action.option_strings)
    if hasattr(parser, "job"):  # a training job (cli.make_parser): every flag in a titled section
        titled = {a for group in parser._action_groups if group.title in cli.GROUPS for a in group._group_actions}
        loose = [a.option_strings for a in parser._actions if a.option_strings and a not in titled and a.dest != "help"]
        assert not loose, (job, loose)
        multihost = next(group for group in parser._action_groups if group.title == "multi-host")
        assert [a.option_strings[0] for a in multihost._group_actions] == ["--coordinator", "--num-processes",
                                                                           "--process-id"], job
