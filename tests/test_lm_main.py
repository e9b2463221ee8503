"""``jaxllm train lm`` (decoder and GPT-2) and ``jaxllm generate`` end to end on a small text file."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxllm.pretrained import load_run

from corpus import english
from test_tensorboard import summaries
from jaxllm.training import lm_eval

TEXT = english() * 3


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def small(corpus, out, model, *extra):
    return ["--text", corpus, "--model", model, "--preset", "tiny", "--vocab-size", "300", "--context", "16",
            "--batch-size", "8", "--d-model", "16", "--heads", "2", "--warmup-steps", "2", "--lr", "3e-3",
            "--sample-tokens", "6", "--eval-batch-size", "8", "--no-progress", "--out", str(out), *extra]


@pytest.mark.parametrize("model", ["decoder", "gpt2"])
def test_lm_trains_evaluates_and_samples(load_script, corpus, tmp_path, monkeypatch, capsys, model):
    out = tmp_path / model
    lm, scored = load_script("lm"), []  # batches per evaluation: --eval-batches caps all but the last
    monkeypatch.setattr(lm, "window_nll", lambda config, params, batches: scored.append(len(batches)) or
                        lm_eval.window_nll(config, params, batches))
    summary = lm.main(small(corpus, out, model, "--steps", "30", "--eval-every", "15", "--eval-batches", "2"))
    assert scored[0] == 2 and scored[1] > 2 and len(scored) == 2
    notes = [line for line in capsys.readouterr().out.splitlines() if "Hugging Face architecture" in line]
    assert notes == ([] if model == "gpt2" else [  # said before training: GPT-2 exports, the book's decoder does not
        "note: --preset tiny has no Hugging Face architecture: jaxllm export can write its raw params "
        "(--format safetensors), not a transformers model"])
    for key in ("val_loss", "val_perplexity", "val_bpc", "wall_seconds", "params"):
        assert summary[key] > 0, key
    assert summary["val_perplexity"] == pytest.approx(np.exp(summary["val_loss"]), rel=1e-9)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30] and evals[-1]["loss"] < evals[0]["loss"]
    sample = (out / "sample.txt").read_text()
    assert sample.strip()
    ((step, text),) = summaries(out, "sample/text_summary")  # and in TensorBoard's TEXT tab
    assert step == 30 and text.tensor.string_val[0].decode() + "\n" == sample
    assert (out / "tokenizer.json").exists() and (out / "checkpoints" / "30").exists()

    text = load_script("generate").main(["--run", str(out), "--prompt", "The model", "--max-new-tokens", "8"])
    assert text.startswith("The model") and len(text) > len("The model")
    # the run directory is a position, as for chat and export (--run is the older spelling)
    assert load_script("generate").main([str(out), "--prompt", "The model", "--max-new-tokens", "8"]) == text


def _params(load_script, out):
    config, params, _, step = load_run(str(out))
    return step, jax.tree_util.tree_leaves(params)


def test_lm_resume_matches_an_uninterrupted_run(load_script, corpus, tmp_path):
    lm = load_script("lm")
    # gpt2 with dropout: the resumed run must also draw the same dropout masks
    # a constant schedule (with warmup) leaves total_steps out of the checked config, so a run cut
    # at --steps 10 can be extended with --resume --steps 20
    base = ["--schedule", "constant", "--eval-every", "10", "--checkpoint-every", "5"]
    whole = lm.main(small(corpus, tmp_path / "whole", "gpt2", *base, "--steps", "20"))
    lm.main(small(corpus, tmp_path / "cut", "gpt2", *base, "--steps", "10"))
    resumed = lm.main(small(corpus, tmp_path / "cut", "gpt2", *base, "--steps", "20", "--resume"))
    assert resumed["resumed_from"] == 10
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)
    step_a, a = _params(load_script, tmp_path / "whole")
    step_b, b = _params(load_script, tmp_path / "cut")
    assert step_a == step_b == 20
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_init_from_starts_a_new_run_from_another_runs_weights_and_tokenizer(load_script, corpus, tmp_path):
    lm = load_script("lm")
    first = tmp_path / "first"
    lm.main(small(corpus, first, "decoder", "--steps", "4"))
    other = tmp_path / "other.txt"
    other.write_text(english(20_000)[::-1])  # another text: the first run's tokenizer still reads it
    # the first run's config.yaml gives the defaults: only what changes is on the command line
    second = tmp_path / "second"
    lm.main(["--init-from", str(first), "--text", str(other), "--out", str(second), "--steps", "1",
             "--optimizer", "sgd", "--lr", "1e-9", "--sample-tokens", "4", "--no-progress"])
    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert yaml.safe_load((second / "config.yaml").read_text())["init-from"] == str(first)
    _, before = _params(load_script, first)
    step, after = _params(load_script, second)
    assert step == 1  # a new run: its own steps, schedule and optimiser
    for x, y in zip(before, after):  # one step at lr 1e-9 moves nothing a fresh init would explain
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"--init-from .*first: this run's model differs .*d_model 16 → 32"):
        lm.main(["--init-from", str(first), "--text", str(other), "--out", str(tmp_path / "third"), "--d-model", "32",
                 "--steps", "1"])

    # finetune lm --mode lora: the adapters train, the weights they adapt stay the first run's
    from jaxllm.nn import lora

    adapted = tmp_path / "adapted"
    lm.finetune(["--base", str(first), "--text", str(other), "--out", str(adapted), "--mode", "lora", "--rank", "2",
                 "--steps", "3", "--lr", "1e-2", "--batch-size", "8", "--sample-tokens", "4", "--no-progress"])
    assert yaml.safe_load((adapted / "config.yaml").read_text())["base"] == str(first)
    with_adapters, cfg = lora.load_lora(adapted / "adapters.safetensors", load_run(str(first))[1])
    step, merged = _params(load_script, adapted)  # load_run merges the adapters
    assert step == 3 and cfg.rank == 2
    for x, y in zip(merged, jax.tree_util.tree_leaves(lora.merge(with_adapters, cfg))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(merged, before))
    from flax.traverse_util import unflatten_dict
    from safetensors.numpy import load_file

    from jaxllm.export import export_run

    exported = load_file(Path(export_run(adapted, tmp_path / "adapted-raw", fmt="safetensors")) / "params.safetensors")
    assert not [name for name in exported if "lora" in name]  # the merged model
    for x, y in zip(jax.tree_util.tree_leaves(unflatten_dict(exported, sep="/")), merged):
        np.testing.assert_array_equal(x, np.asarray(y))
    with pytest.raises(ValueError, match="--mode lora adapts a trained model: name it with --init-from"):
        lm.main(small(corpus, tmp_path / "fresh", "decoder", "--mode", "lora"))


def test_lm_refuses_bad_input(load_script, corpus, tmp_path):
    lm = load_script("lm")
    with pytest.raises(ValueError, match="context"):
        lm.main(small(corpus, tmp_path / "a", "decoder", "--steps", "2", "--context", "10000000"))
    with pytest.raises(ValueError, match="preset"):
        lm.main(["--text", corpus, "--model", "decoder", "--preset", "gpt2_124m", "--out", str(tmp_path / "b")])
    gen = load_script("generate")
    with pytest.raises(ValueError, match="no base model directory"):
        gen.main(["--run", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="empty is neither a `jaxllm train lm` run"):
        gen.main(["--run", str(tmp_path / "empty")])
