"""``jaxllm compare JOB [the job's flags]``: one config class per job (the job's own, with its
``--out`` under ``runs/compare_<job>`` and ``--torch-compile``), and the command's ``main``."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
from typing import ClassVar

from jaxllm import cli, runio
from jaxllm.options import Run, option
from jaxllm.options.spec import flags, value_of

# the flags a comparison uses: the job's model, data, length and optimiser, the dtype, the run's place
USED = {"out", "config", "seed", "epochs", "steps", "overwrite", "no_progress", "no_compile_cache", "batch_size",
        "optimizer", "lr", "weight_decay", "momentum", "muon_lr", "schedule", "warmup_steps", "decay_fraction",
        "clip_norm", "dtype", "torch_compile", "model", "preset", "d_model", "layers", "heads", "dropout", "text",
        "tokenizer", "vocab_size", "context", "stride", "sample_tokens", "emb_dim", "hidden", "dataset",
        "base", "data", "format", "labels", "max_length", "rank", "alpha", "mode"}
# flags that would train something other than the twin can: refused
REFUSED = {"resume": "a comparison does not resume: run it again",
           "init_from": "the twins start from one JAX initialisation, not from another run",
           "predict": "a comparison trains; --predict uses a finished classifier",
           "tokens": "a comparison reads --text (the twin's batches come from the same ids)"}
OUTPUTS = ("compare.json", "compare.png")


def config_class(job_cls: type) -> type:
    """The job's config class with compare's ``--out`` default and ``--torch-compile``."""

    @dataclasses.dataclass(frozen=True)
    class CompareConfig(job_cls):
        DESCRIPTION: ClassVar[str] = (
            f"The functional (JAX) and the imperative (PyTorch) {job_cls.JOB} side by side: the same initial "
            "weights, batches, optimiser and schedule, trained in both; per-step losses, their difference, where "
            "they part, the parameter drift, gradients at step 0, speed and (language models) greedy continuations "
            "-> compare.json, compare.png, TensorBoard events. Takes the job's own flags; those that change how "
            "a run is evaluated, checkpointed or spread over devices do not apply (a note names them).")
        JOB: ClassVar[str] = f"compare_{job_cls.JOB}"
        PRESET_JOB: ClassVar[str] = job_cls.JOB
        run: Run = dataclasses.replace(job_cls.run, out=f"runs/compare_{job_cls.JOB}")
        torch_compile: bool = option(False, "also train a torch.compile-d copy of the twin (a third loss curve and "
                                            "speed; compiling takes a while)", section="run")

    CompareConfig.__name__ = CompareConfig.__qualname__ = f"Compare{job_cls.__name__}"
    return CompareConfig


def unused(cfg, job_cls: type) -> list[str]:
    """The flags given (on the command line or by ``--config``) that a comparison does not use;
    a ``ValueError`` for those it refuses."""
    defaults = job_cls()
    names = []
    for flag in flags(type(cfg)):
        if flag.dest in USED or value_of(cfg, flag) == value_of(defaults, flag):
            continue
        if flag.dest in REFUSED:
            raise ValueError(f"jaxllm compare does not take {flag.name}: {REFUSED[flag.dest]}")
        names.append(flag.name)
    return names


def compare(job: str, argv=None) -> dict:
    """Parse ``jaxllm compare JOB``'s flags, train both styles, write and print the comparison."""
    from jaxllm.compare import engine, report, setups
    from jaxllm.training.tensorboard import open_event_log

    job_cls = job_class(job)
    cfg = cli.parse(config_class(job_cls), argv)
    if importlib.util.find_spec("torch") is None:
        raise ValueError("jaxllm compare trains the PyTorch twin too: install the torch extra (pip install -e '.[torch]')")
    ignored = unused(cfg, job_cls)
    out = cfg.run.out
    if not cfg.run.overwrite and any(os.path.exists(os.path.join(out, name)) for name in OUTPUTS):
        raise ValueError(f"{out} already holds a comparison: pass --overwrite to replace it, or choose another --out")
    cli.start(cfg)
    if ignored:
        print(f"note: jaxllm compare does not use {', '.join(ignored)} (one device, no evaluations or checkpoints)")
    pair = setups.SETUPS[job_cls.JOB](cfg)
    for note in pair.notes:
        print(f"note: {note}")
    dtype = getattr(getattr(cfg, "precision", None), "dtype", "float32")
    events = open_event_log(out, resumed_at=None)
    try:
        result = engine.run(pair, dtype=dtype, seed=cfg.run.seed, torch_compile=cfg.torch_compile,
                            progress=not cfg.run.no_progress,
                            on_step=(lambda row: events.append(report.event_rows(row))) if events else None)
    finally:
        if events is not None:
            events.close()
    from jaxllm.bench.common import machine_info

    result["machine"] = machine_info()
    result["ignored_flags"] = ignored
    report.write(result, out)
    runio.discard_previous_run(out)
    runio.unlock_run_dir(out)
    print(report.text(result))
    print(f"-> {os.path.join(out, 'compare.json')}, {os.path.join(out, 'compare.png')}")
    return result


# each job's config class, imported only for the job that is compared
JOB_CLASSES = {"lm": "jaxllm.jobs.lm:LmConfig", "rnn": "jaxllm.jobs.rnn_lm:RnnConfig", "mlp": "jaxllm.jobs.mlp:MlpConfig",
               "logreg": "jaxllm.jobs.logreg:LogregConfig", "cnn": "jaxllm.jobs.cnn:CnnConfig",
               "classify": "jaxllm.jobs.classify:ClassifyConfig"}


def job_class(job: str) -> type:
    module, name = JOB_CLASSES[job].split(":")
    return getattr(importlib.import_module(module), name)


# the command's entry points (jaxllm.command): main(argv) of each job
lm, rnn, mlp, logreg, cnn, classify = (functools.partial(compare, job) for job in JOB_CLASSES)
