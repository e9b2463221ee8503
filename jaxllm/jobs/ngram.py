"""Count-based language models on Shakespeare (or --text files).

The baseline: an interpolated Kneser-Ney model over the same byte-level BPE ids (same split,
same tokenizer flags) that ``jaxllm train rnn`` uses; its validation loss, perplexity and bits per
character go to summary.json. Beside it, Burkov's ch. 2 model on its regex word tokens, as
``book_model_perplexity`` — reproduced from the book, not comparable (unnormalised, lossy tokens).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from jaxllm.data.lm_data import describe, prepare_lm_data
from jaxllm.models.ngram import BookCountLM, KneserNeyLM, book_tokens
from jaxllm.training.lm_eval import bits_per_char
from jaxllm import cli
from jaxllm.training.metrics import MetricsLog
from jaxllm.runio import write_atomically, write_json


def main(argv=None) -> dict:
    p = cli.ArgumentParser(description=__doc__, compile_cache=False)  # counts n-grams in numpy: nothing to compile
    model, data, run = p.group("model"), p.group("data"), p.group("run")
    run.add_argument("--out", default="runs/ngram", help="output directory (summary.json, metrics.jsonl, sample.txt, "
                                                         "tokenizer.json)")
    run.add_argument("--seed", type=cli.non_negative_int, default=0, help="seed for the split and the sample")
    cli.add_text_flags(data)
    model.add_argument("--order", type=cli.positive_int, default=4,
                       help="n-gram order of the Kneser-Ney model (4 scores best on Shakespeare)")
    model.add_argument("--discount", type=cli.positive_fraction, default=0.75, help="Kneser-Ney discount, in (0, 1]")
    model.add_argument("--book-n", type=cli.positive_int, default=5, help="n of the book's count model")
    run.add_argument("--sample-tokens", type=cli.positive_int, default=200, help="length of sample.txt")
    args = p.parse_args(argv)

    data = prepare_lm_data(args.text, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seed=args.seed,
                           out_dir=args.out)
    print(describe(data.report))
    t0 = time.perf_counter()
    lm = KneserNeyLM(order=args.order, vocab_size=data.vocab_size, discount=args.discount).fit(data.train_ids)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    val_nll = lm.total_nll(data.val_ids)
    score_s = time.perf_counter() - t0
    val_loss = val_nll / data.val_ids.size

    t0 = time.perf_counter()
    book = BookCountLM(n=args.book_n).fit(book_tokens(data.train_text))
    book_ppl = book.perplexity(book_tokens(data.val_text))
    book_s = time.perf_counter() - t0

    sample_ids = lm.sample(data.train_ids[:args.order - 1].tolist(), args.sample_tokens, np.random.default_rng(args.seed))
    write_atomically(os.path.join(args.out, "sample.txt"), data.encoding.decode(sample_ids.tolist()) + "\n")
    MetricsLog(os.path.join(args.out, "metrics.jsonl")).append([{
        "step": 0, "split": "train", "fit_s": fit_s, "tokens_per_s": data.train_ids.size / fit_s,
    }, {"step": 0, "split": "eval", "loss": val_loss, "score_s": score_s, "tokens_per_s": data.val_ids.size / score_s}])
    summary = {
        "model": f"interpolated Kneser-Ney, order {args.order}, discount {args.discount}",
        "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
        "val_bpc": bits_per_char(val_nll, len(data.val_text)),
        "book_model_perplexity": book_ppl, "book_model_n": args.book_n, "book_model_s": book_s,
        "data": data.report,
    }
    write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"Kneser-Ney order {args.order}: val loss {val_loss:.4f} nats/token, perplexity {math.exp(val_loss):.2f}, "
          f"{summary['val_bpc']:.4f} bits/char (fit {fit_s:.1f}s, score {score_s:.1f}s)")
    print(f"book's count model (n={args.book_n}, regex word tokens, unnormalised): perplexity {book_ppl:.2f}")
    print(f"sample -> {os.path.join(args.out, 'sample.txt')}")
    return summary
