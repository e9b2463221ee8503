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

import dataclasses

from jaxllm.data.lm_data import describe
from jaxllm.data.token_file import BPE_TRAIN_CHARS, load_token_dir, prepare_tokens
from jaxllm import cli
from jaxllm.options import TextData, option
from jaxllm.options.values import float_in, non_negative_int, positive_int


@dataclasses.dataclass(frozen=True)
class PrepareConfig:  # tokenizes: nothing to compile
    __doc__ = __doc__
    data: TextData = TextData()
    val_fraction: float = option(0.1, "share of the characters held out for validation, whole documents (jaxllm "
                                      "train lm's is 0.1)", type=float_in(0.0, 1.0, low_open=True, high_open=True),
                                 section="data")
    bpe_train_chars: int = option(BPE_TRAIN_CHARS, "the BPE learns from at most the first this many characters of the "
                                                   "train split", type=positive_int, section="data")
    seed: int = option(0, "seed of the split (the same as jaxllm train lm --seed gives the same split)",
                       type=non_negative_int)
    out: str = option("data/tokens", "the token directory to write")
    overwrite: bool = option(False, "replace a token directory already prepared in --out")
    no_progress: bool = option(False, "hide the progress bar")


def main(argv=None) -> dict:
    cfg = cli.parse(PrepareConfig, argv)
    meta = prepare_tokens(cfg.data.text, cfg.out, tokenizer=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size, seed=cfg.seed,
                          val_fraction=cfg.val_fraction, bpe_train_chars=cfg.bpe_train_chars,
                          overwrite=cfg.overwrite, progress=not cfg.no_progress)
    data = load_token_dir(cfg.out)  # read back: the files agree with meta.json
    print(f"{cfg.out}: {describe(data.report)}, {meta['dtype']}, in {meta['prepare_s']:.1f} s "
          f"-> jaxllm train lm --tokens {cfg.out}")
    return meta
