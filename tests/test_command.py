"""The ``jaxllm`` command (``python -m jaxllm``): every job listed, a job run through it, one-line
usage errors, and no JAX started just to list the jobs."""

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
    (["finetune", "summarise"], "error: unknown job 'summarise' for jaxllm finetune: one of classify, instruct, lm "
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


def help_sections(text: str) -> dict[str, list[str]]:
    """``--help`` as ``{section title: [one flag's entry, joined to one line]}``."""
    sections, title = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = []
        elif title is not None and line.startswith("  ") and not line.startswith("   "):
            sections[title].append(line.strip())
        elif title is not None and line.strip() and sections[title]:
            sections[title][-1] += " " + line.strip()
    return sections


# every job built on jaxllm.options (bench keeps its own argparse)
OURS = {" ".join(words): job.target for words, job in command.JOBS.items()
        if job.target.startswith(("jaxllm.jobs.", "jaxllm.export", "jaxllm.chat"))}


@pytest.mark.parametrize("job", OURS)
def test_help_shows_every_flags_default_in_its_section(capsys, job):
    with pytest.raises(SystemExit):
        command.load(OURS[job])(["--help"])
    sections = help_sections(capsys.readouterr().out)
    for title, entries in sections.items():
        for entry in entries:
            flag, _, rest = entry.partition(" ")
            first = rest.lstrip().split(" ")[0]
            switch = not (first.isupper() or first.startswith("{"))  # no METAVAR or {choices}: off unless given
            if flag.startswith("--") and not switch:
                assert "(default" in entry, (job, entry)
            if flag != "-h," and flag.startswith("-"):
                assert title != "options", (job, entry)  # every flag in a titled section
    if "multi-host" in sections:
        assert [e.split()[0] for e in sections["multi-host"]] == ["--coordinator", "--num-processes", "--process-id"]
