"""Token directories (``jaxllm prepare``, ``jaxllm.data.token_file``): the same ids as the in-memory
path, batches read from a memory map in ArrayBatches' order (per process with ``next_rows``),
``jaxllm train lm --tokens`` training exactly as ``--text``, and clear errors for bad input."""

import json
import random

import numpy as np
import pytest

from jaxllm.data import token_file as T
from jaxllm.data.batches import ArrayBatches
from jaxllm.data.corpus import load_documents, train_val_split
from jaxllm.data.lm_data import prepare_lm_data
from jaxllm.data.tokenizer import decode_bytes, encode, gpt2_encoding, train_bpe
from jaxllm.data.windows import lm_windows
from jaxllm import cli
from jaxllm.training.distributed import process_rows

# pieces that stress the cuts between chunks: runs and kinds of whitespace, contractions, digits,
# non-ASCII letters, the special token's text
WORDS = ["the", "King", "’tis", "don't", "we'll", "  ", "\n", "\n\n", "\t", "42", "3.14", "naïve", "日本語", "!!",
         "--", " ", "\u00a0", "\u2003", "<|endoftext|>", "x" * 30, "\r\n", "'s"]


def _text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice([" ", "", "\n", "  "]) for _ in range(words))


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Five documents; the first starts and ends with whitespace, the second holds invalid UTF-8."""
    root, rng, files = tmp_path_factory.mktemp("corpus"), random.Random(0), []
    for k in range(5):
        text = _text(rng, 1500)
        data = ("  \n" + text + "\n\n \n" if k == 0 else text).encode()
        if k == 1:
            data = data[:500] + b"\xff\xfe\xe2\x82" + data[500:]
        path = root / f"doc{k}.txt"
        path.write_bytes(data)
        files.append(str(path))
    return files


@pytest.mark.parametrize("tokenizer, documents", [("bpe", 5), ("gpt2", 5), ("bpe", 1)])
def test_prepare_gives_the_ids_of_prepare_lm_data(text_files, tmp_path, tokenizer, documents):
    files = text_files[:documents]
    ref = prepare_lm_data(files, tokenizer=tokenizer, vocab_size=300, seed=3)
    # tiny reads and pieces: hundreds of cuts inside and between documents
    meta = T.prepare_tokens(files, tmp_path / "tok", tokenizer=tokenizer, vocab_size=300, seed=3, chunk_chars=64,
                            read_bytes=50)
    data = T.load_token_dir(tmp_path / "tok")
    assert isinstance(data.train_ids, np.memmap) and data.train_ids.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(data.train_ids, ref.train_ids)
    np.testing.assert_array_equal(data.val_ids, ref.val_ids)
    assert data.vocab_size == ref.vocab_size and data.encoding.decode(ref.val_ids[:50].tolist()) == \
        ref.encoding.decode(ref.val_ids[:50].tolist())
    for key in ("train_chars", "val_chars", "val_fraction", "val_documents", "tokenizer", "vocab_size",
                "train_tokens", "val_tokens"):
        assert data.report[key] == ref.report[key], key
    assert data.val_prefix(40) == ref.val_text[:40]
    assert meta["splits"]["train"] == {"file": "train.bin", "tokens": ref.train_ids.size, "chars": len(ref.train_text)}
    assert meta["sources"] == files and meta["tokenizer"] == tokenizer
    assert (meta["bpe_training"] or {}).get("whole_train_split", tokenizer == "bpe") == (tokenizer == "bpe")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["meta.json", "tokenizer.json", "train.bin",
                                                                     "val.bin"]  # no temporary file left


def test_the_bpe_learns_from_a_bounded_sample(text_files, tmp_path):
    meta = T.prepare_tokens(text_files, tmp_path / "tok", vocab_size=300, bpe_train_chars=5000)
    assert meta["bpe_training"]["chars"] == 5000 and not meta["bpe_training"]["whole_train_split"]
    data = T.load_token_dir(tmp_path / "tok")
    train_text = train_val_split(load_documents(text_files), 0.1, 0)[0]
    assert data.encoding._mergeable_ranks == train_bpe(train_text[:5000], 300)._mergeable_ranks
    assert decode_bytes(data.encoding, data.train_ids.tolist()).decode("utf-8") == train_text  # all of it, encoded


def test_pieces_are_cut_only_where_the_pretokenizer_cuts():
    """Any text, any re-cut of its stream: the pieces' ids, appended, are the whole text's."""
    enc, rng = gpt2_encoding(), random.Random(1)
    alphabet = [*"ab1 '\n\t\r.", "\u00a0", "\u2003", "\x1c", "\x85", "é", "日", "'s", "'ll", " '", "\u3000", "\u200b"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        stream, i = [], 0
        while i < len(text):
            k = rng.randint(1, 5)
            stream.append(text[i:i + k])
            i += k
        pieces = list(T._pieces(stream, rng.randint(1, 4)))
        assert "".join(pieces) == text
        assert [t for p in pieces for t in encode(enc, p)] == encode(enc, text), repr(text)


def _token_file(tmp_path, n: int, vocab: int = 1000) -> np.memmap:
    ids = np.random.default_rng(0).integers(0, vocab, n).astype("<u2")
    ids.tofile(tmp_path / "ids.bin")
    return np.memmap(tmp_path / "ids.bin", dtype="<u2", mode="r")


@pytest.mark.parametrize("stride", [16, 7])
def test_token_windows_are_array_batches_over_lm_windows(tmp_path, stride):
    ids = _token_file(tmp_path, 3000)
    memory = ArrayBatches(lm_windows(np.asarray(ids), 16, stride, vocab_size=1000), 12, seed=5)
    disk = T.TokenWindows(ids, 16, 12, stride=stride, seed=5, vocab_size=1000)
    assert (disk.num_rows, disk.steps_per_epoch) == (memory.num_rows, memory.steps_per_epoch)
    for _ in range(2 * disk.steps_per_epoch + 3):  # into the third epoch
        a, b = memory.next(), disk.next()
        assert a.keys() == b.keys() and all(b[k].dtype == np.int32 for k in b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert disk.state_dict() == memory.state_dict()


class _Spy(np.ndarray):
    """A token array that records which ids each read asks for."""
    reads: list

    def __getitem__(self, key):
        self.reads.append(np.shape(key))
        return np.asarray(super().__getitem__(key))


def test_two_processes_read_their_rows_of_every_global_batch(tmp_path):
    ids = _token_file(tmp_path, 100_000)  # 6,249 windows of 16: 97 global batches of 64 an epoch
    whole = T.TokenWindows(ids, 16, 64, seed=1)
    procs = []
    for _ in range(2):
        spy = np.asarray(ids).view(_Spy)
        spy.reads = []
        procs.append((T.TokenWindows(spy, 16, 64, seed=1), spy))
    assert whole.num_rows > 5000 and whole.steps_per_epoch == 97
    for step in range(whole.steps_per_epoch + 4):  # over the epoch boundary
        batch = whole.next()
        parts = [source.next_rows(process_rows(64, pid, 2)) for pid, (source, _) in enumerate(procs)]
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
    assert all(source.state_dict() == whole.state_dict() == {"epoch": 1, "index": 4, "seed": 1, "batch_size": 64}
               for source, _ in procs)
    for _, spy in procs:  # each read took that process's 32 windows, never the global batch
        assert set(spy.reads) == {(32, 17)}


def test_a_saved_position_resumes_the_same_batches(tmp_path):
    ids = _token_file(tmp_path, 5000)
    run = T.TokenWindows(ids, 16, 32, seed=2)
    for _ in range(run.steps_per_epoch - 2):
        run.next()
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint stores it
    resumed = T.TokenWindows(ids, 16, 32, seed=2)
    resumed.load_state_dict(state)
    for _ in range(5):  # over the epoch boundary
        a, b = run.next(), resumed.next_rows(slice(None))
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
    with pytest.raises(ValueError, match="saved with seed=2, batch_size=32; this run uses seed=3"):
        T.TokenWindows(ids, 16, 32, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size must be in"):
        T.TokenWindows(ids, 16, 10_000)
    with pytest.raises(ValueError, match="context 5000 needs at least 5001 tokens"):
        T.TokenWindows(ids, 5000, 1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 99\]"):
        T.TokenWindows(ids, 16, 32, vocab_size=100).next()


def test_bad_token_directories_and_inputs_are_refused(text_files, tmp_path, load_script):
    with pytest.raises(ValueError, match="token directory .*missing does not exist"):
        T.load_token_dir(tmp_path / "missing")
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="bare has no meta.json: not a token directory, or its jaxllm prepare did "
                                         "not finish"):
        T.load_token_dir(tmp_path / "bare")
    good = tmp_path / "good"
    T.prepare_tokens(text_files[:2], good, vocab_size=300)
    with pytest.raises(ValueError, match="already holds a prepared token directory .*--overwrite"):
        T.prepare_tokens(text_files[:2], good, vocab_size=300)
    size = (good / "train.bin").stat().st_size
    with open(good / "train.bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(ValueError, match=rf"train.bin holds {size - 2:,} bytes, but meta.json says {size // 2:,} "
                                         r"uint16 tokens .*truncated"):
        T.load_token_dir(good)
    T.prepare_tokens(text_files[:2], good, vocab_size=300, overwrite=True)
    T.load_token_dir(good)  # whole again
    (tmp_path / "blank.txt").write_text(" \n\n\t")
    for files, kwargs, message in [
        ([str(tmp_path / "blank.txt")], {}, "empty corpus: text file .*blank.txt has no text"),
        ([str(tmp_path / "none.txt")], {}, "text file .*none.txt does not exist"),
        (text_files, {"vocab_size": 2 ** 31 + 1}, r"vocab_size must be in \[257, 2,147,483,648\]"),
        (text_files, {"vocab_size": 100}, r"vocab_size must be in \[257"),
        (text_files, {"tokenizer": "chars"}, "tokenizer must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            T.prepare_tokens(files, tmp_path / "never", **kwargs)
    assert not (tmp_path / "never").exists()  # refused before anything was written

    lm = load_script("lm")
    for flags, message in [
        (["--tokens", str(good), "--text", text_files[0]], "--tokens and --text contradict each other"),
        (["--tokens", str(good), "--tokenizer", "gpt2"], "--tokenizer gpt2 contradicts --tokens .*prepared with bpe"),
        (["--tokens", str(good), "--vocab-size", "512"], "--vocab-size 512 contradicts --tokens .*300 ids"),
        (["--tokens", str(tmp_path / "bare")], "has no meta.json"),
    ]:
        with pytest.raises(ValueError, match=message):
            lm.main([*flags, "--out", str(tmp_path / "run"), "--steps", "1"])


def test_the_prepare_command_writes_a_directory_and_errors_in_one_line(text_files, tmp_path, capsys):
    from jaxllm.jobs import prepare

    out = str(tmp_path / "tok")
    meta = prepare.main(["--text", *text_files[:3], "--vocab-size", "300", "--seed", "1", "--out", out,
                         "--no-progress"])
    ref = prepare_lm_data(text_files[:3], vocab_size=300, seed=1)
    np.testing.assert_array_equal(T.load_token_dir(out).val_ids, ref.val_ids)
    assert meta["split"]["seed"] == 1 and f"jaxllm train lm --tokens {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.run(prepare.main, ["--text", *text_files[:3], "--out", out], prog="jaxllm prepare")
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out} already holds a prepared token directory (meta.json): pass --overwrite (overwrite=True) to "
        "replace it, or choose another --out"]


def _losses(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [(r["step"], r["split"], r["loss"]) for r in rows]


def test_lm_trains_from_tokens_exactly_as_from_text(text_files, tmp_path, load_script):
    lm, files = load_script("lm"), text_files[:3]
    T.prepare_tokens(files, tmp_path / "tok", vocab_size=300, seed=1)
    flags = ["--model", "decoder", "--preset", "tiny", "--context", "16", "--batch-size", "8", "--d-model", "16",
             "--heads", "2", "--warmup-steps", "2", "--lr", "3e-3", "--sample-tokens", "10", "--eval-batch-size", "8",
             "--schedule", "constant", "--steps", "6", "--eval-every", "3", "--eval-batches", "2", "--seed", "1",
             "--no-progress"]
    text = lm.main(["--text", *files, "--vocab-size", "300", *flags, "--out", str(tmp_path / "text")])
    tokens = lm.main(["--tokens", str(tmp_path / "tok"), *flags, "--out", str(tmp_path / "tokens")])
    a, b = _losses(tmp_path / "text"), _losses(tmp_path / "tokens")
    assert [r[:2] for r in a] == [r[:2] for r in b] and len(a) >= 8
    np.testing.assert_allclose([r[2] for r in b], [r[2] for r in a], rtol=1e-6, atol=1e-6)
    for key in ("val_loss", "val_bpc"):
        assert tokens[key] == pytest.approx(text[key], rel=1e-6, abs=1e-6), key
    assert (tmp_path / "tokens" / "sample.txt").read_text() == (tmp_path / "text" / "sample.txt").read_text()
    assert (tmp_path / "tokens" / "tokenizer.json").read_text() == (tmp_path / "tok" / "tokenizer.json").read_text()
    assert tokens["data"]["tokens"] == str(tmp_path / "tok")

    # the run's config.yaml names the directory: --resume alone continues it from there (a constant
    # schedule leaves the run's length out of the checked config, so --steps can extend it)
    import yaml

    saved = yaml.safe_load((tmp_path / "tokens" / "config.yaml").read_text())
    assert saved["tokens"] == str(tmp_path / "tok") and saved["text"] is None
    # the directory decides the tokenizer and vocabulary: the file does not pin them to this one
    assert saved["tokenizer"] is None and saved["vocab-size"] is None
    resumed = lm.main(["--out", str(tmp_path / "tokens"), "--resume", "--steps", "7", "--no-progress"])
    assert resumed["resumed_from"] == 6
