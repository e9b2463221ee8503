"""Classifier heads on both LM families, last-real-token logits, freezing modes, and
``jaxllm finetune classify`` end to end on a tiny base made by ``jaxllm train lm``."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.data import classification as cdata
from jaxllm.models import classifier, gpt2, transformer
from jaxllm.training import TrainState, make_train_step
from jaxllm.training.freeze import count_params, freeze_optimizer, trainable_mask, trainable_predicate
from jaxllm.training.losses import classification_loss, last_token_logits
from parity import OUTPUT, assert_close

GPT2_TINY = gpt2.tiny(vocab_size=97, context_length=16, drop_rate=0.0)
DECODER_TINY = transformer.tiny(97)


def init(config, seed=0):
    return config.init(jax.random.PRNGKey(seed))


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------- from_lm


@pytest.mark.parametrize("lm_config, head", [(GPT2_TINY, ("out_head",)), (DECODER_TINY, ("output", "output_bias"))])
def test_from_lm_copies_the_base_and_adds_a_fresh_head(lm_config, head):
    lm_params = init(lm_config)
    config, params = classifier.from_lm(lm_config, lm_params, 3, jax.random.PRNGKey(1))
    assert config.num_classes == 3
    base = {k: v for k, v in flat(lm_params).items() if not k.startswith(tuple(f"['{h}']" for h in head))}
    new = flat(params)
    for name, value in base.items():
        np.testing.assert_array_equal(new[name], value)
    heads = {k: v for k, v in new.items() if k not in base}
    d = 64 if lm_config is GPT2_TINY else 16
    assert sorted(v.shape for v in heads.values()) == [(3,), (d, 3)]
    for value in heads.values():  # torch's Linear init: U(-1/sqrt(d), 1/sqrt(d))
        assert np.abs(value).max() <= 1 / math.sqrt(d) and np.abs(value).max() > 0.5 / math.sqrt(d)
    logits = jax.jit(config.logits)(params, jnp.zeros((2, 5), jnp.int32))
    assert logits.shape == (2, 5, 3)


def test_from_lm_refuses_params_of_another_model():
    with pytest.raises(ValueError, match="do not fit the classifier config"):
        classifier.from_lm(DECODER_TINY, init(GPT2_TINY), 2, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        classifier.classifier_config(DECODER_TINY, 1)


# --------------------------------------------------------------------------- last real token


@pytest.mark.parametrize("lm_config", [GPT2_TINY, DECODER_TINY])
def test_last_real_token_of_a_right_padded_row_equals_the_unpadded_row(lm_config):
    config, params = classifier.from_lm(lm_config, init(lm_config), 2, jax.random.PRNGKey(1))
    apply = jax.jit(config.logits)
    rows = [[5, 9, 13], [7, 2, 40, 41, 42, 3], [11]]
    pad = 96
    tokens = np.full((3, 8), pad, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    got = last_token_logits(apply(params, tokens), lengths)
    for i, r in enumerate(rows):
        alone = apply(params, np.array([r], np.int32))[0, -1]  # no padding at all
        assert_close(got[i], alone, OUTPUT, err_msg=f"row {i}: padded vs unpadded")
    # the book's position -1 would read a pad token for the shorter rows: different logits
    assert not np.allclose(apply(params, tokens)[0, -1], got[0], atol=1e-4)


def test_last_token_logits_picks_positions():
    logits = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    out = last_token_logits(logits, jnp.array([2, 4]))
    np.testing.assert_array_equal(out, np.stack([logits[0, 1], logits[1, 3]]))


def test_classification_loss_matches_a_hand_computation():
    logits = np.array([[[0.0, 0.0], [2.0, -1.0]], [[0.5, 1.5], [9.0, 9.0]]], np.float32)  # [B=2, T=2, C=2]
    batch = {"tokens": np.zeros((2, 2), np.int32), "lengths": np.array([2, 1]), "labels": np.array([1, 1])}
    loss_fn = classification_loss(lambda params, tokens, key: jnp.asarray(logits))
    loss, aux = loss_fn(None, batch, None)
    # row 0 reads position 1 ([2, -1], label 1: wrong); row 1 position 0 ([0.5, 1.5], label 1: right)
    ce0 = -math.log(math.exp(-1) / (math.exp(2) + math.exp(-1)))
    ce1 = -math.log(math.exp(1.5) / (math.exp(0.5) + math.exp(1.5)))
    np.testing.assert_allclose(loss, (ce0 + ce1) / 2, rtol=1e-6)
    np.testing.assert_allclose(aux["accuracy"], 0.5)
    loss_w, aux_w = loss_fn(None, {**batch, "weights": np.array([0.0, 1.0])}, None)  # row 0 is padding
    np.testing.assert_allclose(loss_w, ce1, rtol=1e-6)
    assert float(aux_w["accuracy"]) == 1.0 and float(aux_w["targets"]) == 1.0


# --------------------------------------------------------------------------- what trains


def gpt2_block_params(d):  # tiny preset: no Q/K/V bias
    return 3 * d * d + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d


def decoder_block_params(d):  # per-head W_Q/K/V = D x D in all, W_O, MLP with biases, two RMSNorm scales
    return 3 * d * d + d * d + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * d


@pytest.mark.parametrize("lm_config, mode, expected", [
    (GPT2_TINY, "head", 64 * 2 + 2),
    (GPT2_TINY, "last_block", gpt2_block_params(64) + 2 * 64 + 64 * 2 + 2),  # + final_norm + head
    (DECODER_TINY, "head", 16 * 2 + 2),
    (DECODER_TINY, "last-block", decoder_block_params(16) + 16 * 2 + 2),  # no final norm in Burkov's
])
def test_only_the_chosen_parameters_change(lm_config, mode, expected):
    config, params = classifier.from_lm(lm_config, init(lm_config), 2, jax.random.PRNGKey(1))
    mask = trainable_mask(params, trainable_predicate(config, mode))
    assert count_params(params, mask) == expected
    optimizer = freeze_optimizer(optax.adamw(1e-2, weight_decay=0.1), mask)
    loss_fn = classification_loss(lambda p, t, key: config.logits(p, t, key=key))
    step = make_train_step(loss_fn, optimizer)
    before = flat(params)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(2))
    batch = {"tokens": np.array([[1, 2, 3, 4], [5, 6, 7, 96]], np.int32), "lengths": np.array([4, 3]),
             "labels": np.array([0, 1])}
    state, _ = step(state, batch)
    after, trained = flat(state.params), flat(mask)
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        assert changed == bool(trained[name]), name
    assert sum(before[n].size for n in before if trained[n]) == expected


def test_full_and_unknown_modes():
    config, params = classifier.from_lm(DECODER_TINY, init(DECODER_TINY), 2, jax.random.PRNGKey(0))
    assert count_params(params, trainable_mask(params, trainable_predicate(config, "full"))) == \
        count_params(params)
    with pytest.raises(ValueError, match="mode must be one of"):
        trainable_predicate(config, "bias_only")


def test_lora_mode_trains_only_the_adapters_the_heads_included():
    from jaxllm.nn import lora

    config, params = classifier.from_lm(DECODER_TINY, init(DECODER_TINY), 2, jax.random.PRNGKey(0))
    params = lora.add_lora(params, lora.raschka(rank=2, alpha=4.0), jax.random.PRNGKey(1))
    mask = flat(trainable_mask(params, trainable_predicate(config, "lora")))
    trained = sorted(k for k, v in mask.items() if v)
    assert "['output_lora_A']" in trained and "['output_lora_B']" in trained
    assert "['layers_1']['attn']['heads_0']['W_Q_lora_A']" in trained
    assert all("lora_" in k for k in trained)
    # per layer: 3 x per-head [16, 8] x 2 heads, W_O [16, 16], W_1 [16, 64], W_2 [64, 16]; the head [16, 2]
    r = 2
    per_layer = 3 * 2 * (16 * r + r * 8) + (16 * r + r * 16) + (16 * r + r * 64) + (64 * r + r * 16)
    assert sum(np.asarray(params_leaf).size for k, params_leaf in flat(params).items() if mask[k]) == \
        2 * per_layer + (16 * r + r * 2)


# --------------------------------------------------------------------------- jaxllm finetune classify


WORDS = "the film was movie plot actor story music and very".split()


def load_train_script(name):
    import importlib

    return importlib.import_module(f"jaxllm.jobs.{name}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Burkov-decoder base made by ``jaxllm train lm`` (2 steps) and a keyword data set in SMS
    format: a text is ham when it holds "good", spam when it holds "bad", anywhere in it."""
    root = tmp_path_factory.mktemp("classify")
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(400):
        label = ["ham", "spam"][rng.integers(2)]
        words = list(rng.choice(WORDS, rng.integers(2, 9))) + [{"ham": "good", "spam": "bad"}[label]]
        rng.shuffle(words)
        lines.append(f"{label}\t{' '.join(words)}")
    (root / "data.txt").write_text("\n".join(lines) + "\n")
    (root / "corpus.txt").write_text(" ".join(rng.choice(WORDS + ["good", "bad"], 3000)))
    load_train_script("lm").main(["--model", "decoder", "--preset", "tiny", "--steps", "2", "--warmup-steps", "1",
                                  "--vocab-size", "300", "--context", "16", "--text", str(root / "corpus.txt"),
                                  "--out", str(root / "base"), "--sample-tokens", "1", "--no-progress"])
    return root


def classify(work, *args):
    return load_train_script("classify").main(["--base", str(work / "base"), "--data", str(work / "data.txt"),
                                               "--format", "sms", "--no-progress", *args])


def test_script_lora_learns_the_keyword_task_and_predict_reproduces_it(work):
    out = work / "lora"
    summary = classify(work, "--mode", "lora", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--epochs", "4",
                       "--out", str(out))
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "majority_baseline", "trainable_params",
                "total_params", "mode", "base", "truncated"):
        assert on_disk[key] == summary[key]
    counts = summary["data"]["test_counts"]
    assert summary["majority_baseline"] == max(counts.values()) / sum(counts.values())
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["truncated"] == {"train": 0, "val": 0, "test": 0}
    assert summary["train_accuracy"] >= 0.9, summary
    assert summary["test_accuracy"] >= summary["majority_baseline"] + 0.1, summary
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["split"] == "eval" and "accuracy" in r for r in evals) == 4  # once an epoch

    # --predict on the held-out texts: the saved (merged) classifier gives the run's test accuracy
    data = cdata.balance(cdata.load_sms(work / "data.txt"), 0)
    test = cdata.split(data, 0)[2]
    predictions = classify(work, "--out", str(out), "--predict", *test.texts)["predictions"]
    accuracy = np.mean([p["label"] == data.label_names[y] for p, y in zip(predictions, test.labels)])
    np.testing.assert_allclose(accuracy, summary["test_accuracy"], atol=1e-6)
    for p in predictions:
        assert math.isclose(sum(p["probabilities"].values()), 1.0, rel_tol=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)


def test_script_last_block_counts_truncation_and_trainable_params(work, capsys):
    out = work / "last"
    summary = classify(work, "--mode", "last-block", "--steps", "2", "--max-length", "4", "--out", str(out))
    from jaxllm.data.tokenizer import load_encoding

    enc = load_encoding(work / "base" / "tokenizer.json")
    parts = cdata.split(cdata.balance(cdata.load_sms(work / "data.txt"), 0), 0)
    expected = {name: sum(len(enc.encode(t)) > 4 for t in part.texts)
                for name, part in zip(("train", "val", "test"), parts)}
    assert summary["truncated"] == expected and expected["train"] > 0
    assert summary["max_length"] == 4
    assert summary["trainable_params"] == decoder_block_params(16) + 16 * 2 + 2
    printed = capsys.readouterr().out
    assert f"truncated: train {expected['train']:,}, val {expected['val']:,}, test {expected['test']:,}" in printed
    assert "{" not in printed  # counts as words, not Python dicts
    text = "good film and very very good music and a very good story"
    (result,) = classify(work, "--out", str(out), "--predict", text)["predictions"]
    assert result["truncated"] and "[truncated]" in capsys.readouterr().out


def test_script_bad_input(work, tmp_path):
    with pytest.raises(ValueError, match="run `make demo`"):
        classify(work, "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"--max-length must lie in \[1, 64\]"):
        classify(work, "--max-length", "65", "--steps", "1", "--out", str(tmp_path / "b"))
    with pytest.raises(ValueError, match="holds no finished classifier"):
        classify(work, "--out", str(tmp_path / "c"), "--predict", "good")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="the dataset is empty"):
        classify(work, "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "d"))
