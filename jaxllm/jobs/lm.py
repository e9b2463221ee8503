"""Transformer language model on Shakespeare (or --text files): Burkov's decoder or Raschka's GPT-2.

``--model decoder`` (presets burkov | tiny | llama: RoPE, RMSNorm) or ``--model gpt2`` (presets
tiny | gpt2_124m | gpt2_medium: learned positions, LayerNorm, dropout), with ``--d-model``,
``--layers`` and ``--heads`` overriding the preset's sizes. GPT-2's learned positions cover
``--context``, and its vocabulary is the tokenizer's.

Same split and tokenizer as ``jaxllm train ngram`` and ``jaxllm train rnn`` (a byte-level BPE of
``--vocab-size`` trained on the training plays, or GPT-2's), so bits per character compare on the
same held-out text. Training uses non-overlapping windows of ``--context`` tokens, AdamW with
warmup, cosine decay and gradient clipping. ``--tokens DIR`` trains on a token directory written by
``jaxllm prepare`` instead, read through memory maps (for corpora larger than memory): the same ids,
split and batches as ``--text`` on the files it was prepared from, its tokenizer and vocabulary.

Validation: a transformer cannot carry state across chunks, so the held-out ids are cut into
non-overlapping windows of ``--context`` tokens (the last one padded and masked) and every token
after the first is scored once, predicted from the 1 to ``--context`` tokens before it inside its
window (the first target of each window sees one token, the last sees ``--context``). Loss,
perplexity and bits per character (total NLL over the characters of the scored text) go to
summary.json with the wall time and parameter count; a KV-cached sample goes to sample.txt.

Devices and memory: on a CPU the batch is split over one JAX device per core (``--cpu-devices``);
``--parallel`` picks the device strategy (auto: data-parallel ``sharded`` on
several devices; ``fsdp`` also splits params and optimiser state; ``shard_map``; ``pmap``) and
``--accum-steps k`` splits each ``--batch-size`` batch into k micro-batches -- the update is the
same either way, only memory and speed change. ``--dtype bfloat16`` computes in bf16 with fp32
master weights; ``--remat`` recomputes transformer blocks in the backward pass.
"""

from __future__ import annotations

import os
import re
import time

import jax

from jaxllm.data.batches import ArrayBatches
from jaxllm.data.corpus import data_fingerprint
from jaxllm.data.lm_data import VAL_FRACTION, describe, prepare_lm_data
from jaxllm.data.token_file import TokenData, TokenWindows, load_token_dir
from jaxllm.data.tokenizer import decode_bytes, encode
from jaxllm.data.windows import lm_windows
from jaxllm.generate import fit_context, generate
from jaxllm.models import LANGUAGE_MODELS, language_model
from jaxllm import cli, runio
from jaxllm.training import TrainState, fit, make_optimizer
from jaxllm.training.checkpoint import run_config
from jaxllm.training.lm_eval import eval_windows, lm_scores, window_nll
from jaxllm.training.losses import lm_loss
from jaxllm.runio import update_json, write_atomically
from jaxllm.training.precision import mixed_precision

ALL_PRESETS = tuple(dict.fromkeys(p for family in LANGUAGE_MODELS.values() for p in family.PRESETS))  # --preset's choices
# the config fields the size flags set, so a config's own error can name the flags behind it
FIELD_FLAGS = {"d_model": "--d-model", "emb_dim": "--d-model", "num_layers": "--layers", "n_layers": "--layers",
               "num_heads": "--heads", "n_heads": "--heads", "head_dim": "--heads", "drop_rate": "--dropout",
               "max_len": "--context", "context_length": "--context", "dropout": "--dropout"}


def preset_sizes(field_flag: str) -> str:
    """``--d-model``'s (``--layers``', ``--heads``') value in each preset, for its help:
    ``decoder: burkov 128, tiny 16, llama 128; gpt2: ...``."""
    families = []
    for model, family in LANGUAGE_MODELS.items():
        sizes = []
        for preset in family.PRESETS:
            config = language_model(model, preset, 512, 128)
            value = next(getattr(config, f) for f, flag in FIELD_FLAGS.items()
                         if flag == field_flag and hasattr(config, f) and f != "head_dim")
            sizes.append(f"{preset} {value}")
        families.append(f"{model}: {', '.join(sizes)}")
    return "; ".join(families)


def build_config(model: str, preset: str, vocab_size: int, context: int, *, d_model: int | None = None,
                 layers: int | None = None, heads: int | None = None, dropout: float | None = None):
    """The model config for ``--model``/``--preset`` with the size overrides applied."""
    try:
        return language_model(model, preset, vocab_size, context, d_model=d_model, layers=layers, heads=heads,
                              dropout=dropout)
    except ValueError as err:  # e.g. --heads that does not divide --d-model: say which flags to change
        if str(err).startswith("--"):  # an unknown --model or --preset: already names the flag
            raise
        flags = [f for field, f in FIELD_FLAGS.items() if re.search(rf"\b{field}\b", str(err))]
        raise ValueError(f"{err} (--model {model} --preset {preset}; check "
                         f"{', '.join(dict.fromkeys(flags)) or 'the size flags'})") from None


def sample_text(config, params, encoding, prompt: str, *, max_new_tokens: int, key, temperature: float = 0.8,
                top_k: int | None = 40, top_p: float | None = None) -> tuple[str, str]:
    """KV-cached sampling from ``prompt``; returns ``(prompt as decoded, continuation)``.

    Prompt + new tokens stay within the model's context limit (GPT-2's ``context_length``, its
    learned positions; the decoder's ``max_len``). What does not fit is cut, and each cut is
    announced with one ``note:`` line: a prompt that fills the whole context keeps its last
    half-context tokens, then the new tokens are reduced to the room that is left."""
    ids = encode(encoding, prompt)
    if not ids:
        raise ValueError("the prompt is empty: it needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    ids, max_new_tokens, notes = fit_context(ids, max_new_tokens, config.context_limit)
    for note in notes:
        print(note)
    if top_k is not None:
        top_k = min(top_k, config.vocab_size)
    new = generate(config, params, [ids], max_new_tokens=max_new_tokens, key=key, temperature=temperature,
                   top_k=top_k, top_p=top_p, max_len=len(ids) + max_new_tokens)[0]
    return encoding.decode(ids), encoding.decode(new)


def data_flags(args) -> TokenData | None:
    """Resolve ``--tokenizer``/``--vocab-size``: with ``--tokens``, the directory's (loaded and
    returned; ``--text``, or a ``--tokenizer``/``--vocab-size`` other than it was prepared with, is
    refused), else bpe and 512, recorded so in the run's config.yaml."""
    if args.tokens is None:
        for key, dest, default in (("tokenizer", "tokenizer", "bpe"), ("vocab-size", "vocab_size", 512)):
            if getattr(args, dest) is None:
                setattr(args, dest, default)
                args.flags[key] = default
        return None
    if args.text:
        raise ValueError(f"--tokens and --text contradict each other: {args.tokens} holds the corpus it was prepared "
                         f"from (drop --text, or prepare the files: jaxllm prepare --text FILE... --out DIR)")
    tokens = load_token_dir(args.tokens)
    meta = tokens.meta
    if args.tokenizer not in (None, meta["tokenizer"]):
        raise ValueError(f"--tokenizer {args.tokenizer} contradicts --tokens {args.tokens}, prepared with "
                         f"{meta['tokenizer']} (drop --tokenizer: the directory decides)")
    if args.vocab_size not in (None, meta["requested_vocab_size"], meta["vocab_size"]):
        raise ValueError(f"--vocab-size {args.vocab_size} contradicts --tokens {args.tokens}, whose "
                         f"{meta['tokenizer']} vocabulary has {meta['vocab_size']:,} ids (drop --vocab-size: the "
                         "directory decides)")
    args.tokenizer, args.vocab_size = meta["tokenizer"], tokens.vocab_size
    return tokens


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    parser = cli.make_parser(__doc__, job="lm", epochs=3, lr=2e-3, batch_size=32, weight_decay=0.1,
                             log_every=50)
    # defaults chosen with the burkov preset on 2 CPU cores (its figures: README, Language models);
    # 576 steps are an epoch of Shakespeare at batch 32 x context 128 with the 512 BPE
    parser.set_defaults(clip_norm=1.0, schedule="warmup_cosine", warmup_steps=100, eval_every=576)
    cli.add_text_flags(parser.group("data"), tokenizer=None, vocab_size=None,
                       default_note=" (default: bpe, 512; with --tokens: the directory's)")
    parser.add_argument("--tokens", type=cli.absolute_path, default=None, metavar="DIR",
                        help="train on a token directory written by `jaxllm prepare` (memory-mapped, for corpora "
                             "larger than memory) instead of --text; its tokenizer and vocabulary are used")
    parser.add_argument("--model", choices=tuple(LANGUAGE_MODELS), default="decoder")
    parser.add_argument("--preset", choices=ALL_PRESETS, default=None,
                        help="decoder: burkov|tiny|llama (default burkov); gpt2: tiny|gpt2_124m|gpt2_medium "
                             "(default tiny)")
    parser.add_argument("--d-model", type=cli.positive_int, default=None,
                        help=f"the model width (default: the preset's -- {preset_sizes('--d-model')})")
    parser.add_argument("--layers", type=cli.positive_int, default=None,
                        help=f"the number of blocks (default: the preset's -- {preset_sizes('--layers')})")
    parser.add_argument("--heads", type=cli.positive_int, default=None,
                        help=f"the number of heads (default: the preset's -- {preset_sizes('--heads')})")
    parser.add_argument("--dropout", type=cli.fraction_below_1, default=None,
                        help="GPT-2's drop rate (default: the preset's)")
    parser.add_argument("--context", type=cli.positive_int, default=128,
                        help="tokens per training and validation window")
    parser.add_argument("--stride", type=cli.positive_int, default=None,
                        help="training window stride (default: --context)")
    parser.add_argument("--eval-batch-size", type=cli.positive_int, default=32, help="validation windows per batch")
    parser.add_argument("--sample-tokens", type=cli.positive_int, default=200, help="length of sample.txt")
    cli.add_sampling_flags(parser.group("evaluation"), top_p=False, all_tokens=False)
    cli.add_eval_batches(parser)
    parser.arrange(model=["--model", "--preset", "--d-model", "--layers", "--heads", "--dropout"],
                   data=["--text", "--tokens", "--tokenizer", "--vocab-size", "--context", "--stride"],
                   evaluation=["--eval-batch-size", "--sample-tokens", "--temperature", "--top-k"])
    args = cli.parse_args(parser, argv)
    strategy = cli.strategy(args)  # checks --batch-size against the devices and --accum-steps now
    token_dir = data_flags(args)  # --tokens: its directory, read (a contradicting flag is refused now)
    preset = args.preset or next(iter(LANGUAGE_MODELS[args.model].PRESETS))  # the family's first preset
    # the model from the flags alone (the tokenizer's size stands in for the vocabulary until the
    # data is ready): --model/--preset and --d-model/--heads/... that do not fit fail before any data work
    config = build_config(args.model, preset, args.vocab_size, args.context, d_model=args.d_model,
                          layers=args.layers, heads=args.heads, dropout=args.dropout)
    if args.remat:
        config = config.replace(remat=True)
    stride = args.context if args.stride is None else args.stride

    if token_dir is None:
        data = prepare_lm_data(args.text, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seed=args.seed,
                               out_dir=args.out, reuse_tokenizer=args.resume)
        val_prompt = data.val_text[:40]
    else:  # the same ids, split and batches as --text on the corpus it was prepared from, read from disk
        data = token_dir
        data.save_tokenizer(args.out, resume=args.resume)  # generate, chat and export read the run's copy
        val_prompt = data.val_prefix(40)
    print(describe(data.report))
    fingerprint = (data_fingerprint(args.text, seed=args.seed, val_fraction=VAL_FRACTION) if token_dir is None
                   else token_dir.fingerprint())
    runio.record_data(args.out, fingerprint, resume=args.resume, accept_change=args.accept_data_change)
    config = config.replace(vocab_size=data.vocab_size)
    if token_dir is None:
        batches = ArrayBatches(lm_windows(data.train_ids, args.context, stride, vocab_size=data.vocab_size),
                               args.batch_size, seed=args.seed)
    else:
        batches = TokenWindows(data.train_ids, args.context, args.batch_size, stride=stride, seed=args.seed,
                               vocab_size=data.vocab_size)
    val_batches = eval_windows(data.val_ids, args.context, args.eval_batch_size)  # fails before training
    params = config.init(jax.random.PRNGKey(args.seed))

    def scorer(batches):
        """Loss, perplexity and bits/char of the held-out windows in ``batches`` (a prefix of val_batches)."""
        tokens = int(sum(b["mask"].sum() for b in batches))
        chars = len(decode_bytes(data.encoding, data.val_ids[1:tokens + 1].tolist()).decode("utf-8", "replace"))
        return lambda params: lm_scores(window_nll(config, params, batches), tokens, chars)

    evaluate = scorer(val_batches)
    last_eval = {}

    def final_evaluate(params) -> dict:  # every held-out token; periodic evaluations score --eval-batches
        last_eval.update(evaluate(params))
        return dict(last_eval)

    total = cli.total_steps(args, batches.steps_per_epoch)
    opt_config = cli.optimizer_config(args, total, muon_blocks=config.block_names)
    optimizer = make_optimizer(opt_config)
    run = run_config(config, opt_config, batch_size=args.batch_size, seed=args.seed, context=args.context,
                     stride=stride, text=args.text, tokenizer=args.tokenizer,
                     vocab_size=data.vocab_size, **({"dtype": args.dtype} if args.dtype != "float32" else {}),
                     # a resume must read the same token files: their place and size
                     **({"tokens": os.path.abspath(args.tokens), "train_tokens": int(data.train_ids.size),
                         "val_tokens": int(data.val_ids.size)} if token_dir is not None else {}))
    title = f"{args.model} LM ({preset})"
    loss_fn = mixed_precision(lm_loss(config), args.dtype)  # float32: unchanged
    train_step = strategy.train_step(loss_fn, optimizer, accum_steps=args.accum_steps)
    fit_config = cli.fit_config(args, steps_per_epoch=batches.steps_per_epoch, run_config=run, unit="tokens",
                                units_per_batch=args.batch_size * args.context, title=title)
    state = fit(TrainState.create(params, optimizer, jax.random.PRNGKey(args.seed + 1)), train_step, batches,
                fit_config, eval_fn=scorer(val_batches[:args.eval_batches]), final_eval_fn=final_evaluate,
                strategy=strategy)

    final = last_eval or evaluate(state.params)  # fit() evaluates after its last step
    prompt, sample = sample_text(config, state.params, data.encoding, val_prompt,
                                 max_new_tokens=args.sample_tokens, key=jax.random.PRNGKey(args.seed),
                                 temperature=args.temperature, top_k=args.top_k)
    write_atomically(os.path.join(args.out, "sample.txt"), prompt + sample + "\n")
    summary = update_json(os.path.join(args.out, "summary.json"), {
        "val_loss": final["loss"], "val_perplexity": final["perplexity"], "val_bpc": final["bpc"],
        "model": args.model, "preset": preset, "context": args.context,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)), "data": data.report,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    })
    print(f"--- sample (KV-cache generation, temperature {args.temperature}, top-k {args.top_k}) ---\n"
          f"{prompt + sample}\n---")
    print(f"val loss {final['loss']:.4f} nats/token, perplexity {final['perplexity']:.2f}, {final['bpc']:.4f} bits/char "
          f"-> {args.out}")
    return summary
