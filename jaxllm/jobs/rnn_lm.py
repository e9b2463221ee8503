"""Burkov's Elman RNN language model on Shakespeare (or --text files).

Same split and tokenizer as ``jaxllm train ngram`` (a byte-level BPE trained on the training plays),
sliding windows of --context tokens, AdamW as in the book. Validation scores the whole held-out
text with the hidden state carried across chunks, and reports loss, perplexity and bits per
character (comparable with the n-gram baseline's) in summary.json; a sample goes to sample.txt.
``--parallel`` and ``--accum-steps`` choose the devices and micro-batching (same update either way).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax

from jaxllm.data.batches import ArrayBatches
from jaxllm.data.corpus import data_fingerprint
from jaxllm.data.lm_data import VAL_FRACTION, describe, prepare_lm_data
from jaxllm.data.tokenizer import decode_bytes, encode
from jaxllm.data.windows import lm_windows
from jaxllm.generate import sample_recurrent
from jaxllm.models import rnn
from jaxllm import cli, runio
from jaxllm.options import (Devices, Evaluation, MultiHost, Optim, Run, TextData, fit_config, option,
                            parts)
from jaxllm.options.values import non_negative_float, positive_int
from jaxllm.training import TrainState, fit, make_optimizer
from jaxllm.training.checkpoint import run_config
from jaxllm.training.lm_eval import lm_scores, streaming_nll
from jaxllm.training.losses import lm_loss
from jaxllm.runio import update_json, write_atomically


@dataclasses.dataclass(frozen=True)
class RnnConfig:
    __doc__ = __doc__
    JOB: ClassVar[str] = "rnn_lm"
    SPLIT_CPU: ClassVar[bool] = False
    emb_dim: int = option(256, "embedding = hidden size (the book uses 128)", type=positive_int, section="model")
    layers: int = option(2, "stacked RNN layers", type=positive_int, section="model")
    data: TextData = TextData()
    context: int = option(64, "tokens per training window", type=positive_int, section="data")
    stride: int | None = option(None, "window stride (default: --context)", type=positive_int, section="data")
    # tuned on the default split to beat the n-gram baseline in under 10 minutes on 2 CPU cores:
    # small batches, clipped gradients, a short warmup and a cosine decay
    run: Run = Run(out="runs/rnn_lm", epochs=5, log_every=50)
    optim: Optim = Optim(batch_size=16, lr=3e-3, weight_decay=0.01, clip_norm=1.0, schedule="warmup_cosine")
    evaluation: Evaluation = Evaluation()
    eval_batches: int = parts.eval_batches_option()
    eval_streams: int = option(16, "parallel pieces of the validation text", type=positive_int, section="evaluation")
    sample_tokens: int = option(200, "length of sample.txt", type=positive_int, section="evaluation")
    temperature: float = option(0.8, "0: greedy", type=non_negative_float, section="evaluation")
    devices: Devices = Devices()
    hosts: MultiHost = MultiHost()


def main(argv=None) -> dict:
    cfg = cli.parse(RnnConfig, argv)
    cli.start(cfg)
    run_, optim, text = cfg.run, cfg.optim, cfg.data
    strategy = cfg.devices.strategy(optim.batch_size)  # checks --batch-size against the devices now
    stride = cfg.context if cfg.stride is None else cfg.stride

    data = prepare_lm_data(text.text, tokenizer=text.tokenizer, vocab_size=text.vocab_size, seed=run_.seed,
                           out_dir=run_.out, reuse_tokenizer=run_.resume)
    runio.record_data(run_.out, data_fingerprint(text.text, seed=run_.seed, val_fraction=VAL_FRACTION),
                      resume=run_.resume, accept_change=run_.accept_data_change)
    print(describe(data.report))
    if data.val_ids.size <= cfg.eval_streams:  # fail now, not after the first epoch
        raise ValueError(f"the validation split has {data.val_ids.size} tokens; validation needs more than "
                         f"--eval-streams ({cfg.eval_streams})")
    windows = lm_windows(data.train_ids, cfg.context, stride, vocab_size=data.vocab_size)
    batches = ArrayBatches(windows, optim.batch_size, seed=run_.seed)
    config = rnn.RNNConfig(vocab_size=data.vocab_size, emb_dim=cfg.emb_dim, num_layers=cfg.layers)
    params = config.init(jax.random.PRNGKey(run_.seed))

    last_eval = {}

    def evaluate(params, max_chunks=None) -> dict:  # periodic: the first --eval-batches chunks of each stream
        nll, n, scored = streaming_nll(config, params, data.val_ids, streams=cfg.eval_streams, max_chunks=max_chunks)
        chars = len(decode_bytes(data.encoding, data.val_ids[scored].tolist()).decode("utf-8", "replace"))
        return lm_scores(nll, n, chars)

    def final_evaluate(params) -> dict:
        last_eval.update(evaluate(params))
        return dict(last_eval)

    opt_config = optim.build(run_.total_steps(batches.steps_per_epoch))
    optimizer = make_optimizer(opt_config)
    loss_fn = lm_loss(config)
    run = run_config(config, opt_config, batch_size=optim.batch_size, seed=run_.seed, context=cfg.context,
                     stride=stride, text=list(text.text) if text.text else None, tokenizer=text.tokenizer,
                     vocab_size=data.vocab_size)
    train_step = strategy.train_step(loss_fn, optimizer, accum_steps=cfg.devices.accum_steps)
    fit_settings = fit_config(cfg, steps_per_epoch=batches.steps_per_epoch, run_config=run, unit="tokens",
                                units_per_batch=optim.batch_size * cfg.context, title="Elman RNN LM")
    state = fit(TrainState.create(params, optimizer, jax.random.PRNGKey(run_.seed + 1)), train_step, batches,
                fit_settings, eval_fn=lambda params: evaluate(params, cfg.eval_batches), final_eval_fn=final_evaluate,
                strategy=strategy)

    final = last_eval or evaluate(state.params)  # fit() evaluates after its last step
    prompt = encode(data.encoding, data.val_text[:40])
    sample = sample_recurrent(config, state.params, prompt, max_new_tokens=cfg.sample_tokens,
                              key=jax.random.PRNGKey(run_.seed), temperature=cfg.temperature)
    write_atomically(os.path.join(run_.out, "sample.txt"), data.encoding.decode(prompt + sample) + "\n")
    summary = update_json(os.path.join(run_.out, "summary.json"), {
        "val_loss": final["loss"], "val_perplexity": final["perplexity"], "val_bpc": final["bpc"],
        "params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)), "data": data.report,
    })
    print(f"val loss {final['loss']:.4f} nats/token, perplexity {final['perplexity']:.2f}, {final['bpc']:.4f} bits/char "
          f"-> {run_.out}")
    return summary
