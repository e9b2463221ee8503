"""The ``jaxllm`` command: one entry point for every job (``python -m jaxllm`` is the same).

``jaxllm --help`` lists the jobs; ``jaxllm train lm --help`` shows one job's flags. Only the chosen
job's module is imported, so listing them starts neither JAX nor any model code.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple, Sequence


class Job(NamedTuple):
    target: str  # "module:function", called as function(argv)
    summary: str


SECTIONS = (  # (heading, {command words: job}), listed in this order
    ("prepare data", {
        ("prepare",): Job("jaxllm.jobs.prepare:main",
                          "tokenize a corpus once into memory-mapped files for jaxllm train lm --tokens"),
    }),
    ("train a model from scratch", {
        ("train", "lm"): Job("jaxllm.jobs.lm:main",
                             "transformer LM on Shakespeare or --text: Burkov's decoder, llama-style, GPT-2"),
        ("train", "rnn"): Job("jaxllm.jobs.rnn_lm:main", "Burkov's Elman RNN language model on the same data"),
        ("train", "ngram"): Job("jaxllm.jobs.ngram:main",
                                "Kneser-Ney n-gram baseline and the book's count model (counts, no training loop)"),
        ("train", "mlp"): Job("jaxllm.jobs.mlp:main", "MLP vs logistic regression on scikit-learn's breast cancer"),
        ("train", "cnn"): Job("jaxllm.jobs.cnn:main", "small CNN on a 5,000-image MNIST subset (or 8x8 digits)"),
        ("train", "logreg"): Job("jaxllm.jobs.logreg:main", "Burkov ch. 1 logistic regression, 12 'will buy' rows"),
        ("train", "linreg"): Job("jaxllm.jobs.linreg:main", "linear regression by hand and with optax, 10 points"),
    }),
    ("fine-tune a trained language model", {
        ("finetune", "classify"): Job("jaxllm.jobs.classify:main",
                                      "LM -> text classifier (LoRA, last block, head or full); --predict"),
        ("finetune", "instruct"): Job("jaxllm.jobs.instruct:main",
                                      "instruction fine-tuning on Alpaca-format JSON (full or LoRA)"),
        ("finetune", "lm"): Job("jaxllm.jobs.lm:finetune", "a trained LM on a new corpus (full or LoRA)"),
    }),
    ("use a trained run", {
        ("generate",): Job("jaxllm.jobs.generate:main", "sample text from a run (KV-cached)"),
        ("chat",): Job("jaxllm.chat:main", "chat with a run in the terminal"),
        ("export",): Job("jaxllm.export:main", "write a run as a Hugging Face directory or raw safetensors"),
    }),
    ("compare the functional and the imperative style (needs torch)", {
        ("compare", "lm"): Job("jaxllm.compare.jobs:lm", "the transformer LM and its PyTorch twin, trained side by side"),
        ("compare", "rnn"): Job("jaxllm.compare.jobs:rnn", "the Elman RNN LM and its twin"),
        ("compare", "mlp"): Job("jaxllm.compare.jobs:mlp", "the MLP and its twin"),
        ("compare", "cnn"): Job("jaxllm.compare.jobs:cnn", "the CNN and its twin"),
        ("compare", "logreg"): Job("jaxllm.compare.jobs:logreg", "logistic regression and its twin"),
        ("compare", "classify"): Job("jaxllm.compare.jobs:classify", "LoRA classification fine-tuning of a GPT-2 "
                                                                     "run and its twin (--mode lora)"),
    }),
    ("measure", {
        ("bench",): Job("jaxllm.bench.__main__:main", "JAX vs the PyTorch twins: timing tables and JSON"),
        ("scaling",): Job("jaxllm.jobs.scaling:main", "devices x batch x model-size sweep: scaling.csv, scaling.png"),
    }),
)
JOBS = {words: job for _, jobs in SECTIONS for words, job in jobs.items()}
GROUPS = {words[0] for words in JOBS if len(words) > 1}  # "train", "finetune": they need a job name
COMMANDS = sorted({words[0] for words in JOBS})


def overview(group: str | None = None) -> str:
    """The job list (``group``: only that group's jobs)."""
    lines = ["usage: jaxllm COMMAND [flags]    (jaxllm COMMAND --help: its flags, each with its default)", ""]
    for heading, jobs in SECTIONS:
        shown = {w: j for w, j in jobs.items() if group is None or w[0] == group}
        if shown:
            lines.append(f"{heading}:")
            lines += [f"  {' '.join(words):<19} {job.summary}" for words, job in shown.items()]
            lines.append("")
    return "\n".join(lines)


def resolve(argv: Sequence[str]) -> tuple[tuple[str, ...], Job, list[str]]:
    """``(command words, job, the job's argv)``; prints the overview and exits when no job is named."""
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in JOBS:
            return words, JOBS[words], list(argv[n:])
    first = argv[0] if argv else None
    if first == "--version":
        from jaxllm import __version__

        print(f"jaxllm {__version__}")
        sys.exit(0)
    group = first if first in GROUPS else None
    if first is not None and (first in ("-h", "--help") or (group and argv[1:2] in (["-h"], ["--help"]))):
        print(overview(group))
        sys.exit(0)
    if group:
        names = [w[1] for w in JOBS if w[0] == group]
        problem = f"unknown job {argv[1]!r}{_closest(argv[1], names)} for" if len(argv) > 1 else "name a job for"
        _fail(f"{problem} jaxllm {group}: one of {', '.join(names)}")
    _fail("name a command" if first is None else f"unknown command {first!r}{_closest(first, COMMANDS)}")


def _closest(word: str, names) -> str:
    import difflib

    match = difflib.get_close_matches(word, list(names), 1, 0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _fail(message: str):
    print(f"error: {message} (see jaxllm --help)", file=sys.stderr)
    sys.exit(2)  # a usage error, as argparse's


def load(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> None:
    words, job, rest = resolve(list(sys.argv[1:] if argv is None else argv))
    from jaxllm import cli

    cli.run(load(job.target), rest, prog=f"jaxllm {' '.join(words)}")
