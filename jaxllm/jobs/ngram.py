"""Count-based language models on Shakespeare (or --text files).

The baseline: an interpolated Kneser-Ney model over the same byte-level BPE ids (same split,
same tokenizer flags) that ``jaxllm train rnn`` uses; its validation loss, perplexity and bits per
character go to summary.json. Beside it, Burkov's ch. 2 model on its regex word tokens, as
``book_model_perplexity`` — reproduced from the book, not comparable (unnormalised, lossy tokens).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

from jaxllm.data.lm_data import describe, prepare_lm_data
from jaxllm.models.ngram import BookCountLM, KneserNeyLM, book_tokens
from jaxllm.training.lm_eval import bits_per_char
from jaxllm import cli
from jaxllm.options import TextData, option
from jaxllm.options.values import non_negative_int, positive_fraction, positive_int
from jaxllm.training.metrics import MetricsLog
from jaxllm.runio import write_atomically, write_json


@dataclasses.dataclass(frozen=True)
class NgramConfig:  # counts n-grams in numpy: nothing to compile, no training run
    __doc__ = __doc__
    order: int = option(4, "n-gram order of the Kneser-Ney model (4 scores best on Shakespeare)", type=positive_int,
                        section="model")
    discount: float = option(0.75, "Kneser-Ney discount, in (0, 1]", type=positive_fraction, section="model")
    book_n: int = option(5, "n of the book's count model", type=positive_int, section="model")
    data: TextData = TextData()
    out: str = option("runs/ngram", "output directory (summary.json, metrics.jsonl, sample.txt, tokenizer.json)")
    seed: int = option(0, "seed for the split and the sample", type=non_negative_int)
    sample_tokens: int = option(200, "length of sample.txt", type=positive_int)


def main(argv=None) -> dict:
    cfg = cli.parse(NgramConfig, argv)
    data = prepare_lm_data(cfg.data.text, tokenizer=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size, seed=cfg.seed,
                           out_dir=cfg.out)
    print(describe(data.report))
    t0 = time.perf_counter()
    lm = KneserNeyLM(order=cfg.order, vocab_size=data.vocab_size, discount=cfg.discount).fit(data.train_ids)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    val_nll = lm.total_nll(data.val_ids)
    score_s = time.perf_counter() - t0
    val_loss = val_nll / data.val_ids.size

    t0 = time.perf_counter()
    book = BookCountLM(n=cfg.book_n).fit(book_tokens(data.train_text))
    book_ppl = book.perplexity(book_tokens(data.val_text))
    book_s = time.perf_counter() - t0

    sample_ids = lm.sample(data.train_ids[:cfg.order - 1].tolist(), cfg.sample_tokens, np.random.default_rng(cfg.seed))
    write_atomically(os.path.join(cfg.out, "sample.txt"), data.encoding.decode(sample_ids.tolist()) + "\n")
    MetricsLog(os.path.join(cfg.out, "metrics.jsonl")).append([{
        "step": 0, "split": "train", "fit_s": fit_s, "tokens_per_s": data.train_ids.size / fit_s,
    }, {"step": 0, "split": "eval", "loss": val_loss, "score_s": score_s, "tokens_per_s": data.val_ids.size / score_s}])
    summary = {
        "model": f"interpolated Kneser-Ney, order {cfg.order}, discount {cfg.discount}",
        "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
        "val_bpc": bits_per_char(val_nll, len(data.val_text)),
        "book_model_perplexity": book_ppl, "book_model_n": cfg.book_n, "book_model_s": book_s,
        "data": data.report,
    }
    write_json(os.path.join(cfg.out, "summary.json"), summary)
    print(f"Kneser-Ney order {cfg.order}: val loss {val_loss:.4f} nats/token, perplexity {math.exp(val_loss):.2f}, "
          f"{summary['val_bpc']:.4f} bits/char (fit {fit_s:.1f}s, score {score_s:.1f}s)")
    print(f"book's count model (n={cfg.book_n}, regex word tokens, unnormalised): perplexity {book_ppl:.2f}")
    print(f"sample -> {os.path.join(cfg.out, 'sample.txt')}")
    return summary
