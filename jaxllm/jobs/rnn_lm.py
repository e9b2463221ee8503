"""Burkov's Elman RNN language model on Shakespeare (or --text files).

Same split and tokenizer as ``jaxllm train ngram`` (a byte-level BPE trained on the training plays),
sliding windows of --context tokens, AdamW as in the book. Validation scores the whole held-out
text with the hidden state carried across chunks, and reports loss, perplexity and bits per
character (comparable with the n-gram baseline's) in summary.json; a sample goes to sample.txt.
``--parallel`` and ``--accum-steps`` choose the devices and micro-batching (same update either way).
"""

from __future__ import annotations

import os

import jax

from jaxllm.data.batches import ArrayBatches
from jaxllm.data.corpus import data_fingerprint
from jaxllm.data.lm_data import VAL_FRACTION, describe, prepare_lm_data
from jaxllm.data.tokenizer import decode_bytes, encode
from jaxllm.data.windows import lm_windows
from jaxllm.generate import sample_recurrent
from jaxllm.models import rnn
from jaxllm import cli, runio
from jaxllm.training import TrainState, fit, make_optimizer
from jaxllm.training.checkpoint import run_config
from jaxllm.training.lm_eval import lm_scores, streaming_nll
from jaxllm.training.losses import lm_loss
from jaxllm.runio import update_json, write_atomically


def main(argv=None) -> dict:
    parser = cli.make_parser(__doc__, job="rnn_lm", split_cpu=False, epochs=5, lr=3e-3, batch_size=16, weight_decay=0.01,
                             log_every=50, precision=False)
    # Tuned on the default split to beat the n-gram baseline in under 10 minutes on 2 CPU cores
    # (see README): small batches, clipped gradients, a short warmup and a cosine decay.
    parser.set_defaults(clip_norm=1.0, schedule="warmup_cosine", warmup_steps=100)
    cli.add_text_flags(parser.group("data"))
    parser.add_argument("--context", type=cli.positive_int, default=64, help="tokens per training window")
    parser.add_argument("--stride", type=cli.positive_int, default=None, help="window stride (default: --context)")
    parser.add_argument("--emb-dim", type=cli.positive_int, default=256,
                        help="embedding = hidden size (the book uses 128)")
    parser.add_argument("--layers", type=cli.positive_int, default=2, help="stacked RNN layers")
    parser.add_argument("--eval-streams", type=cli.positive_int, default=16,
                        help="parallel pieces of the validation text")
    parser.add_argument("--sample-tokens", type=cli.positive_int, default=200, help="length of sample.txt")
    parser.add_argument("--temperature", type=cli.non_negative_float, default=0.8, help="0: greedy")
    cli.add_eval_batches(parser)
    parser.arrange(model=["--emb-dim", "--layers"],
                   data=["--text", "--tokenizer", "--vocab-size", "--context", "--stride"],
                   evaluation=["--eval-streams", "--sample-tokens", "--temperature"])
    args = cli.parse_args(parser, argv)
    strategy = cli.strategy(args)  # checks --batch-size against the devices and --accum-steps now
    stride = args.context if args.stride is None else args.stride

    data = prepare_lm_data(args.text, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seed=args.seed,
                           out_dir=args.out, reuse_tokenizer=args.resume)
    runio.record_data(args.out, data_fingerprint(args.text, seed=args.seed, val_fraction=VAL_FRACTION),
                      resume=args.resume, accept_change=args.accept_data_change)
    print(describe(data.report))
    if data.val_ids.size <= args.eval_streams:  # fail now, not after the first epoch
        raise ValueError(f"the validation split has {data.val_ids.size} tokens; validation needs more than "
                         f"--eval-streams ({args.eval_streams})")
    windows = lm_windows(data.train_ids, args.context, stride, vocab_size=data.vocab_size)
    batches = ArrayBatches(windows, args.batch_size, seed=args.seed)
    config = rnn.RNNConfig(vocab_size=data.vocab_size, emb_dim=args.emb_dim, num_layers=args.layers)
    params = config.init(jax.random.PRNGKey(args.seed))

    last_eval = {}

    def evaluate(params, max_chunks=None) -> dict:  # periodic: the first --eval-batches chunks of each stream
        nll, n, scored = streaming_nll(config, params, data.val_ids, streams=args.eval_streams, max_chunks=max_chunks)
        chars = len(decode_bytes(data.encoding, data.val_ids[scored].tolist()).decode("utf-8", "replace"))
        return lm_scores(nll, n, chars)

    def final_evaluate(params) -> dict:
        last_eval.update(evaluate(params))
        return dict(last_eval)

    total = cli.total_steps(args, batches.steps_per_epoch)
    opt_config = cli.optimizer_config(args, total)
    optimizer = make_optimizer(opt_config)
    loss_fn = lm_loss(config)
    run = run_config(config, opt_config, batch_size=args.batch_size, seed=args.seed, context=args.context,
                     stride=stride, text=args.text, tokenizer=args.tokenizer,
                     vocab_size=data.vocab_size)
    train_step = strategy.train_step(loss_fn, optimizer, accum_steps=args.accum_steps)
    fit_config = cli.fit_config(args, steps_per_epoch=batches.steps_per_epoch, run_config=run, unit="tokens",
                                units_per_batch=args.batch_size * args.context, title="Elman RNN LM")
    state = fit(TrainState.create(params, optimizer, jax.random.PRNGKey(args.seed + 1)), train_step, batches,
                fit_config, eval_fn=lambda params: evaluate(params, args.eval_batches), final_eval_fn=final_evaluate,
                strategy=strategy)

    final = last_eval or evaluate(state.params)  # fit() evaluates after its last step
    prompt = encode(data.encoding, data.val_text[:40])
    sample = sample_recurrent(config, state.params, prompt, max_new_tokens=args.sample_tokens,
                              key=jax.random.PRNGKey(args.seed), temperature=args.temperature)
    write_atomically(os.path.join(args.out, "sample.txt"), data.encoding.decode(prompt + sample) + "\n")
    summary = update_json(os.path.join(args.out, "summary.json"), {
        "val_loss": final["loss"], "val_perplexity": final["perplexity"], "val_bpc": final["bpc"],
        "params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)), "data": data.report,
    })
    print(f"val loss {final['loss']:.4f} nats/token, perplexity {final['perplexity']:.2f}, {final['bpc']:.4f} bits/char "
          f"-> {args.out}")
    return summary
