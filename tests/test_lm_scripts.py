"""``jaxllm train ngram`` and ``jaxllm train rnn`` end to end on a small text file, and their input errors."""

import json

import pytest

from corpus import english

TEXT = english() * 3  # real English


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def test_ngram_script(load_script, corpus, tmp_path):
    out = tmp_path / "ngram"
    summary = load_script("ngram").main(["--text", corpus, "--vocab-size", "300", "--out", str(out)])
    for key in ("val_loss", "val_perplexity", "val_bpc", "book_model_perplexity"):
        assert summary[key] > 0, key
    assert summary["val_perplexity"] == pytest.approx(2.718281828 ** summary["val_loss"], rel=1e-9)
    assert summary["data"]["vocab_size"] <= 300 and summary["data"]["val_tokens"] > 0
    assert (out / "sample.txt").read_text().strip()
    assert (out / "tokenizer.json").exists()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_rnn_lm_script(load_script, corpus, tmp_path):
    out = tmp_path / "rnn"
    args = ["--text", corpus, "--vocab-size", "300", "--out", str(out), "--steps", "30", "--context", "16",
            "--batch-size", "8", "--emb-dim", "16", "--eval-every", "15", "--eval-streams", "4",
            "--sample-tokens", "20", "--warmup-steps", "5", "--no-progress"]
    summary = load_script("rnn_lm").main(args)
    assert summary["val_bpc"] > 0 and summary["val_perplexity"] == pytest.approx(2.718281828 ** summary["val_loss"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30] and evals[-1]["loss"] < evals[0]["loss"]
    assert any("tokens_per_s" in r for r in rows)
    assert len((out / "sample.txt").read_text()) > 20


def test_rnn_lm_refuses_bad_input(load_script, corpus, tmp_path):
    rnn_lm = load_script("rnn_lm")
    with pytest.raises(ValueError, match="no-such-file.txt"):
        rnn_lm.main(["--text", str(tmp_path / "no-such-file.txt"), "--out", str(tmp_path / "a")])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        rnn_lm.main(["--text", str(empty), "--out", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="context"):
        rnn_lm.main(["--text", corpus, "--vocab-size", "300", "--context", "10000000", "--out", str(tmp_path / "c")])


def test_rnn_lm_resume_reuses_the_tokenizer_and_continues(load_script, corpus, tmp_path):
    rnn_lm = load_script("rnn_lm")
    out = tmp_path / "rnn"
    args = ["--text", corpus, "--vocab-size", "300", "--out", str(out), "--context", "16", "--batch-size", "8",
            "--emb-dim", "16", "--eval-streams", "4", "--sample-tokens", "5", "--warmup-steps", "2",
            "--checkpoint-every", "5", "--no-progress"]
    first = rnn_lm.main([*args, "--steps", "10"])
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match="already holds checkpoints"):
        rnn_lm.main([*args, "--steps", "10"])
    again = rnn_lm.main([*args, "--steps", "10", "--resume"])  # finished: nothing to train
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    assert again["val_bpc"] == pytest.approx(first["val_bpc"], rel=1e-6)
    assert again["final_loss"] == first["final_loss"]


def test_rnn_lm_too_small_validation_is_refused_before_training(load_script, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("To be, or not to be, that is the question. " * 40)
    with pytest.raises(ValueError, match="validation split has .* tokens; validation needs more than --eval-streams"):
        load_script("rnn_lm").main(["--text", str(tiny), "--vocab-size", "260", "--context", "8",
                                    "--eval-streams", "500", "--out", str(tmp_path / "o")])
