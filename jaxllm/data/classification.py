"""Labelled texts for classification fine-tuning (Raschka ch. 6): load, balance, split, encode.

Formats (UTF-8, one example per line, blank lines skipped):

* ``sms``: the SMS Spam Collection, ``label<TAB>text``; labels ``ham``/``spam`` (class 0/1) or any
  list given as ``labels=`` (class = position in the list). An unknown label is refused with its
  line number.
* ``vader``: the VADER movie-review snippets, ``id<TAB>mean rating<TAB>text`` (fetched by
  ``python -m jaxllm.data.fetch_vader``): rating > 0 is ``positive`` (1), < 0 ``negative`` (0), 0
  dropped (37 of 10,605 lines).

``balance`` undersamples every class to the smallest one (the book's ``create_balanced_dataset``)
and ``split`` shuffles with a fixed seed and cuts 70/10/20 (the book's ``random_split``).

``encode_texts`` tokenises, **right-pads** with the tokenizer's end-of-text id and returns each
row's real length. Right padding leaves the real tokens' states untouched under causal attention,
and the classifier reads the logits at each row's *last real token* (``lengths - 1``), the one
position that has seen the whole text. (The book reads position -1, which for a padded row is a
pad token.) Texts longer than ``max_length`` tokens are **truncated, keeping their start** (as
the book's ``SpamDataset`` does) and counted.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tiktoken

from jaxllm.data.tabular import DataUnavailable

SMS_LABELS = ("ham", "spam")
VADER_LABELS = ("negative", "positive")
VADER_DEFAULT = os.path.join("data", "vader", "movieReviewSnippets_GroundTruth.txt")
FORMATS = ("vader", "sms")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclasses.dataclass(frozen=True)
class LabelledTexts:
    """``texts[i]`` has class ``labels[i]`` (int32), named ``label_names[labels[i]]``."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows) -> "LabelledTexts":
        rows = np.asarray(rows, np.int64)
        return LabelledTexts(tuple(self.texts[i] for i in rows), self.labels[rows], self.label_names)

    def counts(self) -> dict[str, int]:
        return {name: int(np.sum(self.labels == i)) for i, name in enumerate(self.label_names)}


def _read_lines(path: str | os.PathLike, hint: str) -> list[str]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataUnavailable(f"no data file {path}: {hint}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from None
    return text.splitlines()  # handles the snippets' CRLF lines


def _finish(path, texts: list[str], labels: list[int], names: tuple[str, ...]) -> LabelledTexts:
    if not texts:
        raise ValueError(f"{os.fspath(path)} holds no examples: the dataset is empty")
    return LabelledTexts(tuple(texts), np.asarray(labels, np.int32), names)


def load_sms(path: str | os.PathLike, labels: tuple[str, ...] | list[str] = SMS_LABELS) -> LabelledTexts:
    """``label<TAB>text`` lines -> ``LabelledTexts`` with class ``labels.index(label)``.

    Raises ``ValueError`` naming the line for a line without a tab, an empty text or a label not
    in ``labels``, and for a file without examples.
    """
    names = tuple(labels)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"labels must be at least two distinct names, got {list(names)}")
    index = {name: i for i, name in enumerate(names)}
    texts, ids = [], []
    for number, line in enumerate(_read_lines(path, "pass a label<TAB>text file"), start=1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        where = f"{os.fspath(path)} line {number}"
        if not tab:
            raise ValueError(f"{where} has no tab: expected label<TAB>text, got {line[:60]!r}")
        label, text = label.strip(), text.strip()
        if label not in index:
            raise ValueError(f"{where} has the unknown label {label!r}; expected one of {list(names)} "
                             "(pass --labels to name others)")
        if not text:
            raise ValueError(f"{where} has an empty text")
        texts.append(text)
        ids.append(index[label])
    return _finish(path, texts, ids, names)


def load_vader(path: str | os.PathLike = VADER_DEFAULT) -> LabelledTexts:
    """``id<TAB>rating<TAB>text`` lines -> negative (0) / positive (1); zero ratings dropped.

    A missing file raises ``DataUnavailable`` saying how to fetch it; a malformed line a
    ``ValueError`` naming it.
    """
    hint = ("fetch the VADER movie-review snippets with `python -m jaxllm.data.fetch_vader` "
            f"(writes {VADER_DEFAULT}), or pass --data FILE")
    texts, ids = [], []
    for number, line in enumerate(_read_lines(path, hint), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        where = f"{os.fspath(path)} line {number}"
        if len(parts) != 3:
            raise ValueError(f"{where}: expected id<TAB>rating<TAB>text, got {len(parts)} field(s)")
        try:
            rating = float(parts[1])
        except ValueError:
            raise ValueError(f"{where}: the rating {parts[1]!r} is not a number") from None
        if not np.isfinite(rating):
            raise ValueError(f"{where}: the rating {parts[1]!r} is not finite")
        text = parts[2].strip()
        if rating == 0:
            continue  # neither positive nor negative
        if not text:
            raise ValueError(f"{where} has an empty text")
        texts.append(text)
        ids.append(1 if rating > 0 else 0)
    return _finish(path, texts, ids, VADER_LABELS)


def load(path: str | os.PathLike, fmt: str, labels: list[str] | None = None) -> LabelledTexts:
    """Dispatch on ``fmt`` (``vader`` | ``sms``)."""
    if fmt == "vader":
        if labels is not None:
            raise ValueError("--labels applies to the sms format only (vader's are negative/positive)")
        return load_vader(path)
    if fmt == "sms":
        return load_sms(path, SMS_LABELS if labels is None else labels)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def balance(data: LabelledTexts, seed: int) -> LabelledTexts:
    """Undersample every class to the size of the smallest (random rows, fixed ``seed``), keeping
    the original order. Refuses a data set where some class has no example."""
    counts = data.counts()
    if min(counts.values()) == 0:
        raise ValueError(f"cannot balance: some class has no examples ({counts})")
    n = min(counts.values())
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(data.labels == c), n, replace=False) for c in range(len(data.label_names))]
    return data.subset(np.sort(np.concatenate(keep)))


def split(data: LabelledTexts, seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS
          ) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
    """Shuffle with ``seed`` and cut into (train, val, test): ``int(n * f_train)`` rows,
    ``int(n * f_val)`` rows, and the rest (the book's ``random_split``). Each part must be non-empty."""
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    n = len(data)
    n_train, n_val = int(n * fractions[0]), int(n * fractions[1])
    if n_train < 1 or n_val < 1 or n - n_train - n_val < 1:
        raise ValueError(f"{n} examples are too few to split {fractions}: every part needs at least one")
    order = np.random.default_rng(seed).permutation(n)
    return (data.subset(order[:n_train]), data.subset(order[n_train:n_train + n_val]),
            data.subset(order[n_train + n_val:]))


@dataclasses.dataclass(frozen=True)
class Encoded:
    """tokens: int32[n, max_length] right-padded with ``pad_id``; lengths: int32[n] real tokens per
    row (1..max_length); labels: int32[n]; truncated: how many texts lost tokens."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    truncated: int

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "lengths": self.lengths, "labels": self.labels}


def token_lists(encoding: tiktoken.Encoding, texts) -> list[list[int]]:
    """Ids of each text (``<|endoftext|>`` inside a text is ordinary text, never the pad id)."""
    return encoding.encode_batch(list(texts), disallowed_special=())


def encode_texts(encoding: tiktoken.Encoding, texts, max_length: int, *, pad_id: int | None = None,
                 labels=None) -> Encoded:
    """Tokenise ``texts``, keep each one's first ``max_length`` tokens and right-pad with ``pad_id``
    (default ``encoding.eot_token``). A text with no tokens is refused (it has no last token)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    pad_id = encoding.eot_token if pad_id is None else pad_id
    ids = token_lists(encoding, texts)
    if not ids:
        raise ValueError("no texts to encode: the dataset is empty")
    tokens = np.full((len(ids), max_length), pad_id, np.int32)
    lengths = np.zeros(len(ids), np.int32)
    truncated = 0
    for row, seq in enumerate(ids):
        if not seq:
            raise ValueError(f"text {row} is empty: a text needs at least one token")
        truncated += len(seq) > max_length
        seq = seq[:max_length]
        tokens[row, :len(seq)] = seq
        lengths[row] = len(seq)
    labels = np.zeros(len(ids), np.int32) if labels is None else np.asarray(labels, np.int32)
    if labels.shape != (len(ids),):
        raise ValueError(f"labels must have shape [{len(ids)}], got {labels.shape}")
    return Encoded(tokens, lengths, labels, int(truncated))


def longest(encoding: tiktoken.Encoding, texts) -> int:
    """The most tokens any of ``texts`` has."""
    return max((len(seq) for seq in token_lists(encoding, texts)), default=0)
