"""Instruction data (Raschka ch. 7): Alpaca-format records, the book's prompt template, and the
padding / masking collate.

A record is ``{"instruction": str, "input": str, "output": str}`` (``input`` may be empty or
absent). The model sees ``format_input(entry) + RESPONSE_HEADER + entry["output"]`` followed by
one end-of-text token, and learns to predict every next token of that text; with
``mask_prompt`` only the response (and its end-of-text) is scored.

The prompt and the response are tokenised separately and concatenated. For GPT-2-style
pre-tokenisation this gives the same ids as encoding the whole text at once (the split falls
after a newline, where the pre-tokeniser always splits) unless the response starts with
whitespace; it also tells exactly where the prompt ends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tiktoken

from jaxllm.data.tokenizer import encode

SHIPPED_PATH = Path(__file__).parent / "assets" / "instructions.json"
IGNORE_INDEX = -100  # torch's cross_entropy default ignore_index, as the book uses
PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"
FIELDS = ("instruction", "input", "output")


def format_input(entry: dict) -> str:
    """The book's Alpaca prompt: preamble, ``### Instruction:`` and (when non-empty) ``### Input:``."""
    instruction_text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def format_prompt(entry: dict) -> str:
    """What the model is given at generation time: ``format_input(entry)`` + the response header."""
    return format_input(entry) + RESPONSE_HEADER


def format_example(entry: dict) -> str:
    """The full training text: prompt, response header and the desired ``output``."""
    return format_prompt(entry) + entry["output"]


# --------------------------------------------------------------------------- loading


def validate_instructions(records, source: str = "instruction data") -> list[dict[str, str]]:
    """Check ``records`` is a non-empty list of Alpaca records; returns copies with ``input``
    filled in (``""`` when absent). Raises ``ValueError`` naming the first bad record."""
    if not isinstance(records, list):
        raise ValueError(f"{source} must be a JSON list of records, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{source} holds no records: it needs at least one {{instruction, input, output}} record")
    clean = []
    for i, record in enumerate(records):
        where = f"{source}: record {i}"
        if not isinstance(record, dict):
            raise ValueError(f"{where} must be an object with keys {FIELDS}, got {type(record).__name__}")
        missing = [k for k in ("instruction", "output") if k not in record]
        if missing:
            raise ValueError(f"{where} lacks the key(s) {missing} (every record needs instruction and output; "
                             "input is optional)")
        for key in FIELDS:
            value = record.get(key, "")
            if not isinstance(value, str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        if not record["instruction"].strip():
            raise ValueError(f"{where}: 'instruction' is empty")
        clean.append({**record, "input": record.get("input", "")})
    return clean


def load_instructions(path: str | os.PathLike = SHIPPED_PATH) -> list[dict[str, str]]:
    """Records of an Alpaca-format JSON file (a list of ``{instruction, input, output}``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no instruction file {path}: pass --data with an Alpaca-format JSON list")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid UTF-8 JSON: {exc}") from exc
    return validate_instructions(records, source=str(path))


def split_instructions(records: Sequence[dict], *, train: float = 0.85, test: float = 0.10,
                       seed: int | None = 0) -> tuple[list, list, list]:
    """``(train, test, val)`` as the book: the first ``int(n * train)`` records, the next
    ``int(n * test)``, the rest; shuffled first by ``seed`` (``None``: the file's order).
    Each part gets at least one record, so at least 3 are needed."""
    n = len(records)
    if n < 3:
        raise ValueError(f"{n} record(s) cannot be split into train, test and validation sets: need at least 3")
    if not (0 < train < 1 and 0 < test < 1 and train + test < 1):
        raise ValueError(f"train {train} and test {test} fractions must be positive with a sum below 1")
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    shuffled = [records[i] for i in order]
    n_train = min(max(int(n * train), 1), n - 2)
    n_test = min(max(int(n * test), 1), n - n_train - 1)
    return shuffled[:n_train], shuffled[n_train:n_train + n_test], shuffled[n_train + n_test:]


# --------------------------------------------------------------------------- tokens and batches


def tokenize_instructions(encoding: tiktoken.Encoding, records: Sequence[dict]) -> tuple[list[list[int]], list[int]]:
    """``(token_lists, prompt_lengths)``: each record's prompt ids followed by its response ids
    (no end-of-text; ``collate`` adds it), and how many of them are the prompt."""
    token_lists, prompt_lengths = [], []
    for record in records:
        prompt = encode(encoding, format_prompt(record))
        token_lists.append(prompt + encode(encoding, record["output"]))
        prompt_lengths.append(len(prompt))
    return token_lists, prompt_lengths


def collate(token_lists: Sequence[Sequence[int]], *, pad_id: int, prompt_lengths: Sequence[int] | None = None,
            max_length: int | None = None, length: int | None = None,
            ignore_index: int = IGNORE_INDEX) -> dict[str, np.ndarray]:
    """The book's ``custom_collate_fn`` with a fixed width, so a jitted step compiles once.

    Each row is ``ids + [pad_id]`` padded with ``pad_id``: ``inputs`` are its first ``T`` tokens,
    ``targets`` the same shifted by one. The first end-of-text target (the one right after the
    text, which teaches the model to stop) is kept; every padding target after it becomes
    ``ignore_index``. With ``prompt_lengths``, the targets that predict prompt tokens (the first
    ``prompt_length - 1``) are ignored too (the book's exercise 7.2). Rows longer than ``T`` are
    truncated (their end-of-text target is lost).

    ``T`` is ``length`` if given, else the longest row (as the book), then capped at ``max_length``.
    Returns ``{"inputs": int32[B, T], "targets": int32[B, T]}``.
    """
    if len(token_lists) == 0:
        raise ValueError("collate needs at least one token list")
    if prompt_lengths is not None and len(prompt_lengths) != len(token_lists):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(token_lists)} token lists")
    for name, value in (("max_length", max_length), ("length", length)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    width = max(len(ids) for ids in token_lists) if length is None else length
    width = width if max_length is None else min(width, max_length)
    inputs = np.full((len(token_lists), width), pad_id, np.int32)
    targets = np.full((len(token_lists), width), ignore_index, np.int32)
    for row, ids in enumerate(token_lists):
        if len(ids) == 0:
            raise ValueError(f"token list {row} is empty")
        text = np.asarray(list(ids) + [pad_id], np.int64)  # the text and its one end-of-text
        n = min(len(ids), width)
        inputs[row, :n] = text[:n]
        targets[row, :n] = text[1:n + 1]  # position len(ids) - 1 predicts the end-of-text
        if prompt_lengths is not None:
            targets[row, :max(min(prompt_lengths[row] - 1, width), 0)] = ignore_index
    return {"inputs": inputs, "targets": targets}


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int, *, pad_id: int,
                   ignore_index: int = IGNORE_INDEX) -> list[dict[str, np.ndarray]]:
    """``collate`` output cut into batches of exactly ``batch_size`` rows (for evaluation): the
    last one is filled with rows of padding whose targets are all ignored, so every batch has one
    shape and the filler adds nothing to a loss that skips ``ignore_index``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows, width = arrays["inputs"].shape
    fill = -rows % batch_size
    inputs = np.concatenate([arrays["inputs"], np.full((fill, width), pad_id, np.int32)])
    targets = np.concatenate([arrays["targets"], np.full((fill, width), ignore_index, np.int32)])
    return [{"inputs": inputs[i:i + batch_size], "targets": targets[i:i + batch_size]}
            for i in range(0, rows + fill, batch_size)]
