"""Every flag of every job (``jaxllm.jobs``) is checked while the flags are parsed, before any data work.

A bad value is refused by the flag's argparse type (``jaxllm.options.values``) with one
``error: argument --flag: ...`` line and exit 2, nothing written to ``--out``; combinations that
the flags alone decide (``--heads`` vs ``--d-model``, ``--preset`` vs ``--model``) fail right
after parsing, before the tokenizer is trained; an asked-for warmup as long as the run is clamped, with a note.
"""

import argparse
import json
import os
import subprocess
import sys

import pytest

import processes
from corpus import english
from conftest import ROOT
from jaxllm import cli
from jaxllm.options import Optim, parts, values
from jaxllm.training import make_optimizer, make_schedule
from jaxllm.training.optim import SCHEDULES

TEXT = english() * 3


# --- the validators ------------------------------------------------------------------------------

@pytest.mark.parametrize("validator, text, value", [
    (values.positive_int, "1", 1), (values.positive_int, "20", 20),
    (values.non_negative_int, "0", 0),
    (values.int_in(2), "2", 2), (values.int_in(1, 3), "3", 3),
    (values.bpe_vocab_size, "257", 257),
    (values.positive_float, "3e-4", 3e-4),
    (values.non_negative_float, "0", 0.0),
    (values.fraction_below_1, "0", 0.0), (values.fraction_below_1, "0.99", 0.99),
    (values.positive_fraction, "1", 1.0), (values.positive_fraction, "0.9", 0.9),
    (values.int_list(1), "1,2, 4", [1, 2, 4]),
])
def test_validators_accept(validator, text, value):
    assert validator(text) == value


@pytest.mark.parametrize("validator, text, message", [
    (values.positive_int, "0", "must be >= 1, got 0"),
    (values.positive_int, "-3", "must be >= 1, got -3"),
    (values.positive_int, "1.5", "must be an integer >= 1, got '1.5'"),
    (values.positive_int, "many", "must be an integer >= 1, got 'many'"),
    (values.non_negative_int, "-1", "must be >= 0, got -1"),
    (values.int_in(2), "1", "must be >= 2, got 1"),
    (values.int_in(1, 3), "4", "must be in [1, 3], got 4"),
    (values.bpe_vocab_size, "256", "must be >= 257, got 256"),
    (values.positive_float, "0", "must be > 0, got 0"),
    (values.positive_float, "-1e-3", "must be > 0, got -1e-3"),
    (values.positive_float, "nan", "must be a finite number > 0, got nan"),
    (values.positive_float, "inf", "must be a finite number > 0, got inf"),
    (values.positive_float, "fast", "must be a number > 0, got 'fast'"),
    (values.non_negative_float, "-0.5", "must be >= 0, got -0.5"),
    (values.fraction_below_1, "1", "must be in [0, 1), got 1"),
    (values.fraction_below_1, "-0.1", "must be in [0, 1), got -0.1"),
    (values.positive_fraction, "0", "must be in (0, 1], got 0"),
    (values.positive_fraction, "1.01", "must be in (0, 1], got 1.01"),
    (values.int_list(1), "1,0", "needs integers >= 1, got '1,0'"),
    (values.int_list(1), "1,x", "takes comma-separated integers, got '1,x'"),
])
def test_validators_refuse_naming_the_range(validator, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        validator(text)
    assert str(exc.value) == message


# --- refused while parsing, in every script ------------------------------------------------------

REFUSED = [  # (script, flags, the message after "argument ")
    # the cases
    ("lm", ["--sample-tokens", "0"], "--sample-tokens: must be >= 1, got 0"),
    ("lm", ["--preset", "tny"], "--preset: invalid choice: 'tny'"),
    ("lm", ["--stride", "0"], "--stride: must be >= 1, got 0"),
    ("lm", ["--steps", "0"], "--steps: must be >= 1, got 0"),
    # the shared flags (jaxllm.options.parts)
    ("lm", ["--epochs", "0"], "--epochs: must be >= 1, got 0"),
    ("lm", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    ("lm", ["--lr", "0"], "--lr: must be > 0, got 0"),
    ("lm", ["--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    ("lm", ["--weight-decay", "-0.1"], "--weight-decay: must be >= 0, got -0.1"),
    ("lm", ["--momentum", "1"], "--momentum: must be in [0, 1), got 1"),
    ("lm", ["--warmup-steps", "-1"], "--warmup-steps: must be >= 0, got -1"),
    ("lm", ["--clip-norm", "0"], "--clip-norm: must be > 0, got 0"),
    ("lm", ["--eval-every", "0"], "--eval-every: must be >= 1, got 0"),
    ("lm", ["--checkpoint-every", "0"], "--checkpoint-every: must be >= 1, got 0"),
    ("lm", ["--keep", "0"], "--keep: must be >= 1, got 0"),
    ("lm", ["--log-every", "0"], "--log-every: must be >= 1, got 0"),
    ("lm", ["--accum-steps", "0"], "--accum-steps: must be >= 1, got 0"),
    ("lm", ["--seed", "-1"], "--seed: must be >= 0, got -1"),
    ("logreg", ["--steps", "1.5"], "--steps: must be an integer >= 1, got '1.5'"),
    ("cnn", ["--batch-size", "-8"], "--batch-size: must be >= 1, got -8"),
    # each script's own flags
    ("lm", ["--vocab-size", "256"], "--vocab-size: must be >= 257, got 256"),
    ("lm", ["--context", "0"], "--context: must be >= 1, got 0"),
    ("lm", ["--d-model", "0"], "--d-model: must be >= 1, got 0"),
    ("lm", ["--layers", "0"], "--layers: must be >= 1, got 0"),
    ("lm", ["--heads", "0"], "--heads: must be >= 1, got 0"),
    ("lm", ["--dropout", "1"], "--dropout: must be in [0, 1), got 1"),
    ("lm", ["--eval-batch-size", "0"], "--eval-batch-size: must be >= 1, got 0"),
    ("lm", ["--temperature", "-0.5"], "--temperature: must be >= 0, got -0.5"),
    ("lm", ["--top-k", "0"], "--top-k: must be >= 1, got 0"),
    ("rnn_lm", ["--stride", "0"], "--stride: must be >= 1, got 0"),
    ("rnn_lm", ["--emb-dim", "0"], "--emb-dim: must be >= 1, got 0"),
    ("rnn_lm", ["--eval-streams", "0"], "--eval-streams: must be >= 1, got 0"),
    ("rnn_lm", ["--sample-tokens", "0"], "--sample-tokens: must be >= 1, got 0"),
    ("ngram", ["--order", "0"], "--order: must be >= 1, got 0"),
    ("ngram", ["--discount", "0"], "--discount: must be in (0, 1], got 0"),
    ("ngram", ["--book-n", "0"], "--book-n: must be >= 1, got 0"),
    ("ngram", ["--sample-tokens", "0"], "--sample-tokens: must be >= 1, got 0"),
    ("ngram", ["--vocab-size", "100"], "--vocab-size: must be >= 257, got 100"),
    ("classify", ["--rank", "0"], "--rank: must be >= 1, got 0"),
    ("classify", ["--alpha", "0"], "--alpha: must be > 0, got 0"),
    ("classify", ["--max-length", "0"], "--max-length: must be >= 1, got 0"),
    ("classify", ["--eval-batch-size", "0"], "--eval-batch-size: must be >= 1, got 0"),
    ("classify", ["--dropout", "-0.1"], "--dropout: must be in [0, 1), got -0.1"),
    ("instruct", ["--max-length", "1"], "--max-length: must be >= 2, got 1"),
    ("instruct", ["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    ("instruct", ["--eval-batch-size", "0"], "--eval-batch-size: must be >= 1, got 0"),
    ("mlp", ["--hidden", "30", "0"], "--hidden: must be >= 1, got 0"),
    ("linreg", ["--points", "0"], "--points: must be >= 1, got 0"),
    ("generate", ["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    ("generate", ["--top-k", "-1"], "--top-k: must be >= 0, got -1"),
    ("generate", ["--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
    ("generate", ["--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
    ("generate", ["--temperature", "-1"], "--temperature: must be >= 0, got -1"),
    ("generate", ["--step", "-1"], "--step: must be >= 0, got -1"),
]


@pytest.mark.parametrize("script, flags, message", REFUSED, ids=[f"{s} {' '.join(f)}" for s, f, _ in REFUSED])
def test_a_bad_flag_is_refused_while_parsing(load_script, tmp_path, capsys, script, flags, message):
    out = tmp_path / "out"
    where = ["--run", str(out)] if script == "generate" else ["--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        load_script(script).main([*where, *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: argument {message}") and err.endswith("--help)"), err  # in-process: pytest's prog
    assert "\n" not in err, "one line"
    assert not out.exists(), "nothing may be written before the flags are known to be good"



@pytest.mark.parametrize("script, flags", [
    ("linreg", ["--parallel", "single"]), ("linreg", ["--accum-steps", "2"]), ("linreg", ["--cpu-devices", "2"]),
    ("linreg", ["--dtype", "bfloat16"]), ("linreg", ["--remat"]), ("linreg", ["--eval-every", "5"]),
    ("logreg", ["--dtype", "bfloat16"]), ("logreg", ["--remat"]), ("logreg", ["--eval-every", "5"]),
    ("mlp", ["--dtype", "bfloat16"]), ("mlp", ["--remat"]), ("cnn", ["--remat"]), ("rnn_lm", ["--dtype", "bfloat16"]),
])
def test_a_flag_the_job_would_ignore_is_refused(load_script, tmp_path, capsys, script, flags):
    with pytest.raises(SystemExit) as exc:
        load_script(script).main(["--out", str(tmp_path / "out"), *flags])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: unrecognized arguments: {' '.join(flags)}")

# --- cross-flag checks: right after parsing, before the data is prepared -------------------------

@pytest.mark.parametrize("flags, message", [
    (["--d-model", "30", "--heads", "4"], r"d_model 30 is not divisible by num_heads 4 .*check --d-model, --heads"),
    (["--model", "gpt2", "--d-model", "30", "--heads", "4"],
     r"emb_dim 30 is not divisible by n_heads 4 .*check --d-model, --heads"),
    (["--d-model", "20", "--heads", "4"], r"RoPE needs an even head_dim.*check --d-model, --heads"),
    (["--model", "decoder", "--preset", "gpt2_124m"], r"--preset for --model decoder must be one of"),
    (["--model", "decoder", "--dropout", "0.1"], r"dropout applies to GPT-2 only .*check --dropout"),
])
def test_lm_flag_combinations_fail_before_the_data(load_script, tmp_path, flags, message):
    # --text names a missing file: had the data been read first, that would be the error
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        load_script("lm").main(["--text", str(tmp_path / "missing.txt"), "--out", str(out), *flags])
    assert not (out / "tokenizer.json").exists()


# --- warmup longer than the run: clamped, never optax's error ------------------------------------

@pytest.mark.parametrize("warmup, total, clamped", [(100, 20, 19), (3, 3, 2), (5, 1, 0), (20, 20, 19)])
def test_a_warmup_as_long_as_the_run_is_clamped_with_a_note(capsys, warmup, total, clamped):
    assert parts.clamp_warmup(warmup, total) == clamped
    assert capsys.readouterr().out == (f"note: --warmup-steps {warmup} clamped to {clamped} "
                                       f"(the run has {total} step{'s' if total != 1 else ''})\n")


@pytest.mark.parametrize("warmup, total", [(0, 20), (19, 20), (2, 3), (0, 1)])
def test_a_warmup_shorter_than_the_run_is_kept_silently(capsys, warmup, total):
    assert parts.clamp_warmup(warmup, total) == warmup
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("schedule, total, warmup", [("constant", 20, 0), ("warmup_cosine", 20, 2),
                                                    ("wsd", 30, 3), ("warmup_cosine", 5000, 100)])
def test_the_default_warmup_is_a_tenth_of_a_decaying_run_at_most_100_steps(capsys, schedule, total, warmup):
    assert _args(schedule=schedule, warmup_steps=None).build(total).warmup_steps == warmup
    assert capsys.readouterr().out == ""


def _args(**overrides):
    return Optim(**{**dict(optimizer="adamw", lr=1e-3, weight_decay=0.0, momentum=0.0, schedule="constant",
                           warmup_steps=0, clip_norm=None), **overrides})


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_warmup_and_length_the_parser_accepts_builds_an_optimiser(capsys, schedule):
    """Any --warmup-steps >= 0 with any run of >= 1 steps: no error (optax's or ours), a finite
    learning rate at every step, the peak --lr reached by the last step at the latest."""
    for total in range(1, 7):
        for warmup in range(0, 9):
            config = _args(schedule=schedule, warmup_steps=warmup).build(total)
            assert config.warmup_steps == min(warmup, total - 1)
            make_optimizer(config)
            lr = [float(make_schedule(config)(step)) for step in range(total)]
            assert all(0.0 <= x <= 1e-3 * (1 + 1e-6) for x in lr), (total, warmup, lr)
            assert max(lr) == pytest.approx(1e-3, rel=1e-6), (total, warmup, lr)
    capsys.readouterr()


def test_a_decaying_schedule_on_a_run_of_no_steps_names_the_flags():
    with pytest.raises(ValueError, match=r"--schedule warmup_cosine needs the run's length.*--batch-size"):
        _args(schedule="warmup_cosine").build(0)


@pytest.mark.parametrize("flags, note", [
    (["--steps", "3", "--warmup-steps", "3"], "note: --warmup-steps 3 clamped to 2 (the run has 3 steps)"),
    (["--steps", "3", "--warmup-steps", "3", "--schedule", "warmup_cosine"],
     "note: --warmup-steps 3 clamped to 2 (the run has 3 steps)"),
    (["--steps", "1", "--warmup-steps", "100", "--schedule", "warmup_cosine"],
     "note: --warmup-steps 100 clamped to 0 (the run has 1 step)"),
])
def test_short_runs_just_work(load_script, tmp_path, capsys, flags, note):
    summary = load_script("linreg").main(["--out", str(tmp_path), "--no-progress", *flags])
    assert summary["steps"] == int(flags[1])
    assert note in capsys.readouterr().out.splitlines()


# --- the two command lines, as commands ---------------------------------------------------

def run_lm(*args, default_devices: bool = False):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    if default_devices:  # what a user gets: one CPU device per core and XLA's optimising compile
        env = processes.users_compiler(env)  # (the suite sets 1 device and cheap compiles, see conftest.py)
        env.pop("JAXLLM_CPU_DEVICES", None)
    return subprocess.run([sys.executable, "train/lm.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


def test_lm_refuses_sample_tokens_0_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    done = run_lm("--sample-tokens", "0", "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: argument --sample-tokens: must be >= 1, got 0 (see lm.py --help)"
    assert not out.exists(), "no tokenizer.json (nor anything else) may be left behind"


def test_lm_short_run_warms_up_a_tenth_and_splits_the_batch_over_the_cores(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "run"
    done = run_lm("--preset", "tiny", "--steps", "20", "--out", str(out), "--no-progress", "--text", str(corpus),
                  "--context", "16", "--vocab-size", "300", "--batch-size", "8", "--eval-batch-size", "64",
                  "--sample-tokens", "5", default_devices=True)
    assert done.returncode == 0, done.stderr
    assert "clamped" not in done.stdout  # the default warmup fits the run: a tenth of it
    assert (out / "summary.json").exists() and (out / "checkpoints" / "20").exists()
    from jaxllm.training.checkpoint import Checkpointer

    with Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.read_meta(20)["config"]["optimizer"]["warmup_steps"] == 2
    cores = os.cpu_count()
    expected = {"strategy": "sharded", "devices": cores} if cores in (2, 4, 8) else None
    if expected is not None:  # batch 8 splits over 2, 4 or 8 cores
        assert json.loads((out / "summary.json").read_text())["parallel"] == expected


def test_auto_uses_the_most_devices_that_divide_the_batch(capsys):
    devices = ["d0", "d1", "d2", "d3"]  # only counted and sliced
    assert parts.devices_dividing(12, 1, devices) == devices and capsys.readouterr().out == ""
    assert parts.devices_dividing(10, 1, devices) == ["d0", "d1"]
    assert "note: --batch-size 10 does not split over 4 devices x --accum-steps 1: training on 2 device(s)" \
        in capsys.readouterr().out
    assert parts.devices_dividing(455, 1, devices) == ["d0"]  # logreg's odd batch: one device
    assert parts.devices_dividing(12, 4, devices) == ["d0", "d1", "d2"]


def test_the_cpu_device_count_is_checked_and_a_fixed_count_left_alone(monkeypatch):
    from jaxllm import cpu_devices

    monkeypatch.setenv("JAXLLM_CPU_DEVICES", "two")
    with pytest.raises(ValueError, match="JAXLLM_CPU_DEVICES must be a whole number of devices >= 1, got 'two'"):
        cpu_devices.request()
    monkeypatch.setenv("JAXLLM_CPU_DEVICES", "2")
    import jax

    jax.devices()  # this process's backend is running: its device count can no longer change
    assert cpu_devices.request() is None and cpu_devices.request(4) is None


@pytest.mark.parametrize("optimizer,per_core", [("adamw", True), ("muon", True)])
def test_every_optimizer_defaults_to_one_cpu_device_per_core(monkeypatch, tmp_path, optimizer, per_core):
    """The split no longer depends on the optimiser: muon was kept on one device while XLA's
    in-process all-reduce could deadlock (tests/test_cpu_split_stress.py)."""
    from jaxllm import cpu_devices

    asked = []
    monkeypatch.setattr(cpu_devices, "request", lambda count, per_core: asked.append((count, per_core)))
    from jaxllm.jobs.lm import LmConfig
    from jaxllm.runio import unlock_run_dir

    cli.start(cli.parse(LmConfig, ["--optimizer", optimizer, "--weight-decay", "0", "--out", str(tmp_path)]))
    unlock_run_dir(tmp_path)
    assert asked == [(None, per_core)]
