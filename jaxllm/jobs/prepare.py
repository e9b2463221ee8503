"""Tokenize a corpus once into a token directory for ``jaxllm train lm --tokens DIR``.

Shakespeare (or the ``--text`` files) is split and tokenized as ``jaxllm train lm --text`` does it
-- same split by documents, same BPE, same ids for the same flags and seed -- and the ids of each
split are written to ``train.bin`` / ``val.bin`` (uint16 or uint32), next to ``tokenizer.json`` and
``meta.json``. Training then reads them through memory maps, so the corpus need not fit in memory;
neither does preparing it: files are read and encoded piece by piece. The BPE is trained on the
first ``--bpe-train-chars`` characters of the train split (all of it when shorter).

    jaxllm prepare --text corpus/*.txt --vocab-size 4096 --out data/mycorpus
    jaxllm train lm --tokens data/mycorpus --out runs/mycorpus
"""

from __future__ import annotations

from jaxllm.data.lm_data import describe
from jaxllm.data.token_file import BPE_TRAIN_CHARS, load_token_dir, prepare_tokens
from jaxllm import cli


def main(argv=None) -> dict:
    p = cli.ArgumentParser(description=__doc__, compile_cache=False)  # tokenizes: nothing to compile
    data, run = p.group("data"), p.group("run")
    cli.add_text_flags(data)
    data.add_argument("--val-fraction", type=cli.float_in(0.0, 1.0, low_open=True, high_open=True), default=0.1,
                      help="share of the characters held out for validation, whole documents (jaxllm train lm's is "
                           "0.1)")
    data.add_argument("--bpe-train-chars", type=cli.positive_int, default=BPE_TRAIN_CHARS,
                      help="the BPE learns from at most the first this many characters of the train split")
    run.add_argument("--seed", type=cli.non_negative_int, default=0,
                     help="seed of the split (the same as jaxllm train lm --seed gives the same split)")
    run.add_argument("--out", default="data/tokens", help="the token directory to write")
    run.add_argument("--overwrite", action="store_true", help="replace a token directory already prepared in --out")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)

    meta = prepare_tokens(args.text, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seed=args.seed,
                          val_fraction=args.val_fraction, bpe_train_chars=args.bpe_train_chars,
                          overwrite=args.overwrite, progress=not args.no_progress)
    data = load_token_dir(args.out)  # read back: the files agree with meta.json
    print(f"{args.out}: {describe(data.report)}, {meta['dtype']}, in {meta['prepare_s']:.1f} s "
          f"-> jaxllm train lm --tokens {args.out}")
    return meta
