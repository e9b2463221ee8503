"""One preparation for every language-model script: corpus -> split -> tokenizer -> ids.

``jaxllm train ngram``, ``rnn`` and ``lm`` call ``prepare_lm_data`` with the same flags,
so the baseline and the neural models see the same split and the same token ids.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import tiktoken

from jaxllm.data.corpus import load_documents, train_val_split
from jaxllm.data.tokenizer import encode, gpt2_encoding, load_encoding, save_encoding, train_bpe

TOKENIZERS = ("bpe", "gpt2")
VAL_FRACTION = 0.1  # the held-out share of every language-model job


@dataclasses.dataclass
class LMData:
    encoding: tiktoken.Encoding
    train_ids: np.ndarray  # int32[n_train]
    val_ids: np.ndarray    # int32[n_val]
    train_text: str
    val_text: str
    report: dict

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab


def prepare_lm_data(text_files: list[str] | None, *, tokenizer: str = "bpe", vocab_size: int = 2048,
                    seed: int = 0, val_fraction: float = VAL_FRACTION, out_dir: str | None = None,
                    reuse_tokenizer: bool = False) -> LMData:
    """Load the corpus (Shakespeare unless ``text_files``), split 90/10 with no leakage, and
    tokenize with GPT-2's BPE or a byte-level BPE of ``vocab_size`` trained on the train split
    only (saved as ``out_dir/tokenizer.json``, next to the checkpoints; with ``reuse_tokenizer``,
    as when resuming, an existing file there is loaded instead of training a new one)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    t0 = time.perf_counter()
    train_text, val_text, report = train_val_split(load_documents(text_files), val_fraction, seed)
    saved = os.path.join(out_dir, "tokenizer.json") if out_dir is not None else None
    if reuse_tokenizer and saved and os.path.exists(saved):
        enc = load_encoding(saved)
    elif tokenizer == "gpt2":
        enc = gpt2_encoding()
    else:
        enc = train_bpe(train_text, vocab_size)
    if saved and not (reuse_tokenizer and os.path.exists(saved)):
        os.makedirs(out_dir, exist_ok=True)
        save_encoding(enc, saved)
    train_ids = np.asarray(encode(enc, train_text), np.int32)
    val_ids = np.asarray(encode(enc, val_text), np.int32)
    report = {**report, "tokenizer": tokenizer, "vocab_size": enc.n_vocab, "train_tokens": int(train_ids.size),
              "val_tokens": int(val_ids.size), "prepare_s": round(time.perf_counter() - t0, 2)}
    return LMData(enc, train_ids, val_ids, train_text, val_text, report)


def describe(report: dict) -> str:
    return (f"train {report['train_chars']:,} chars / {report['train_tokens']:,} tokens, "
            f"val {report['val_chars']:,} chars / {report['val_tokens']:,} tokens "
            f"({report['tokenizer']}, vocab {report['vocab_size']:,})")
