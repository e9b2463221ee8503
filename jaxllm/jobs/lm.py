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

import dataclasses
import os
import re
import shutil
import time
from typing import Any, ClassVar

import jax

from jaxllm.data.batches import ArrayBatches
from jaxllm.data.corpus import data_fingerprint
from jaxllm.data.lm_data import VAL_FRACTION, describe, prepare_lm_data
from jaxllm.data.token_file import TokenData, TokenWindows, load_token_dir
from jaxllm.data.tokenizer import decode_bytes, encode
from jaxllm.data.windows import lm_windows
from jaxllm.generate import fit_context, generate_past_context
from jaxllm.models import LANGUAGE_MODELS, language_model
from jaxllm.nn import lora
from jaxllm.pretrained import load_run
from jaxllm import cli, runio
from jaxllm.options import (Adapters, Devices, Evaluation, MultiHost, Optim, Precision, Run, TextData,
                            fit_config, option, parts)
from jaxllm.options.values import absolute_path, fraction_below_1, non_negative_float, positive_int
from jaxllm.training import TrainState, fit, make_optimizer
from jaxllm.training.checkpoint import run_config
from jaxllm.training.freeze import AdapterTraining
from jaxllm.training.lm_eval import eval_windows, lm_scores, window_nll
from jaxllm.training.losses import lm_loss
from jaxllm.training.tensorboard import add_text
from jaxllm.runio import ADAPTERS_FILE, update_json, write_atomically
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

    A prompt that fills the model's whole context (GPT-2's ``context_length``, its learned
    positions; the decoder's ``max_len``) keeps its last half-context tokens; new tokens past the
    context are generated with a sliding window (``generate_past_context``). Each of these is
    announced with one ``note:`` line."""
    ids = encode(encoding, prompt)
    if not ids:
        raise ValueError("the prompt is empty: it needs at least one token")
    ids, max_new_tokens, notes = fit_context(ids, max_new_tokens, config.context_limit, slide=True)
    for note in notes:
        print(note)
    if top_k is not None:
        top_k = min(top_k, config.vocab_size)
    new = generate_past_context(config, params, ids, max_new_tokens=max_new_tokens, key=key,
                                temperature=temperature, top_k=top_k, top_p=top_p)
    return encoding.decode(ids), encoding.decode(new)


def say_if_not_exportable(config, preset: str) -> None:
    """One ``note:`` line, before training, when ``jaxllm export`` will not make a Hugging Face model of the run."""
    try:
        config.hf_export_config().to_hf_config()
    except ValueError:  # the reasons are long; jaxllm export lists them
        print(f"note: --preset {preset} has no Hugging Face architecture: jaxllm export can write its raw params "
              "(--format safetensors), not a transformers model")


@dataclasses.dataclass(frozen=True)
class InitRun:
    """The run ``--init-from`` names: its model config, the params of its latest checkpoint, its step."""
    directory: str
    config: Any
    params: Any
    step: int

    def params_for(self, config) -> Any:
        """Its params, for a run whose model is ``config``: the same model, or a ``ValueError`` naming
        each difference."""
        if config != self.config:
            mine, theirs = config.to_dict(), self.config.to_dict()
            diff = ", ".join(f"{k} {theirs.get(k)!r} → {mine.get(k)!r}" for k in sorted(set(mine) | set(theirs))
                             if mine.get(k) != theirs.get(k))
            raise ValueError(f"--init-from {self.directory}: this run's model differs from that run's ({diff}); "
                             "drop the model flags that change it")
        print(f"starting from {self.directory}, step {self.step} (a new schedule and optimiser state)")
        return self.params


def load_init_run(cfg, token_dir) -> InitRun:
    """``--init-from``'s run, its tokenizer copied into ``--out`` (the new run reads the same ids)."""
    if token_dir is not None:
        raise ValueError("--init-from with --tokens is not supported: the token directory has its own tokenizer "
                         "(train on --text, which --init-from tokenizes with its run's tokenizer)")
    config, params, _, step = load_run(cfg.init_from)
    os.makedirs(cfg.run.out, exist_ok=True)
    shutil.copyfile(os.path.join(cfg.init_from, "tokenizer.json"), os.path.join(cfg.run.out, "tokenizer.json"))
    return InitRun(cfg.init_from, config, params, step)


@dataclasses.dataclass(frozen=True)
class LmConfig:
    __doc__ = __doc__
    JOB: ClassVar[str] = "lm"
    # what --init-from takes from the other run's config.yaml: its model and tokenizer, not its training
    INHERITED: ClassVar[tuple] = ("model", "preset", "d-model", "layers", "heads", "dropout", "tokenizer",
                                  "vocab-size", "context")
    # chosen with the burkov preset on 2 CPU cores (docs/performance.md); 576 steps are an epoch of
    # Shakespeare at batch 32 x context 128 with the 512 BPE
    run: Run = Run(out="runs/lm", epochs=3, log_every=50)
    optim: Optim = Optim(batch_size=32, lr=2e-3, weight_decay=0.1, clip_norm=1.0, schedule="warmup_cosine")
    model: str = option("decoder", "the model family", choices=tuple(LANGUAGE_MODELS), section="model")
    preset: str | None = option(None, "decoder: burkov|tiny|llama (default burkov); gpt2: tiny|gpt2_124m|gpt2_medium "
                                      "(default tiny)", choices=ALL_PRESETS, section="model")
    d_model: int | None = option(None, type=positive_int, section="model")
    layers: int | None = option(None, type=positive_int, section="model")
    heads: int | None = option(None, type=positive_int, section="model")
    dropout: float | None = option(None, "GPT-2's drop rate (default: the preset's)", type=fraction_below_1,
                                   section="model")
    data: TextData = TextData(tokenizer=None, vocab_size=None)
    tokens: str | None = option(None, "train on a token directory written by `jaxllm prepare` (memory-mapped, for "
                                      "corpora larger than memory) instead of --text; its tokenizer and vocabulary "
                                      "are used", type=absolute_path, metavar="DIR", section="data")
    mode: str = option("full", "with --init-from: train every weight, or LoRA adapters on every weight matrix with "
                               "the rest frozen (saved apart as adapters.safetensors; generate, chat and export "
                               "merge them)", choices=("full", "lora"), section="model")
    adapters: Adapters = Adapters()
    init_from: str | None = option(None, "start from the weights of another jaxllm train lm run (its latest "
                                         "checkpoint), with a new schedule and optimiser state; its model and "
                                         "tokenizer (its config.yaml gives the model flags' defaults)",
                                   type=absolute_path, metavar="RUN", section="model")
    context: int = option(128, "tokens per training and validation window", type=positive_int, section="data")
    stride: int | None = option(None, "training window stride (default: --context)", type=positive_int,
                                section="data")
    evaluation: Evaluation = Evaluation(eval_every=576)
    eval_batches: int = parts.eval_batches_option()
    eval_batch_size: int = option(32, "validation windows per batch", type=positive_int, section="evaluation")
    sample_tokens: int = option(200, "length of sample.txt", type=positive_int, section="evaluation")
    temperature: float = option(0.8, "sample.txt's sampling temperature; 0: greedy", type=non_negative_float,
                                section="evaluation")
    top_k: int = option(40, "sample.txt keeps the k likeliest tokens", type=positive_int, section="evaluation")
    devices: Devices = Devices()
    precision: Precision = Precision()
    hosts: MultiHost = MultiHost()

    HELP: ClassVar[dict] = {
        **{field: f"{text} (default: the preset's -- {preset_sizes(flag)})" for field, flag, text in (
            ("d_model", "--d-model", "the model width"), ("layers", "--layers", "the number of blocks"),
            ("heads", "--heads", "the number of heads"))},
        "tokenizer": "bpe: a byte-level BPE trained on the training text; gpt2: GPT-2's (default: bpe; with "
                     "--tokens: the directory's)",
        "vocab_size": "size of the trained BPE (bpe tokenizer) (default: 512; with --tokens: the directory's)",
    }

    @property
    def preset_name(self) -> str:
        """``--preset``, or the family's first preset."""
        return self.preset or next(iter(LANGUAGE_MODELS[self.model].PRESETS))

    @property
    def window_stride(self) -> int:
        return self.context if self.stride is None else self.stride


@dataclasses.dataclass(frozen=True)
class FinetuneLmConfig(LmConfig):
    """Language-model fine-tuning: jaxllm finetune lm --base RUN --text NEW.txt [--mode lora].

    Another run's model, weights and tokenizer, trained on a new corpus (--text, tokenized with the
    base run's tokenizer) with a new schedule and optimiser state: every weight (--mode full), or
    LoRA adapters (--mode lora: --rank, --alpha; saved apart as adapters.safetensors, merged by
    generate, chat and export). The base run's config.yaml gives the model flags' defaults. The same
    as jaxllm train lm --init-from RUN."""
    JOB: ClassVar[str] = "finetune_lm"
    run: Run = Run(out="runs/finetune_lm", epochs=1, log_every=50)
    init_from: str | None = option(None, "the jaxllm train lm run to fine-tune (its latest checkpoint; required)",
                                   type=absolute_path, metavar="RUN", section="model", flag="base")


def resolve_data(config: LmConfig) -> tuple[LmConfig, TextData, TokenData | None]:
    """``(the config as config.yaml records it, the data settings the run uses, the --tokens
    directory or None)``. Without ``--tokens``: bpe and 512 unless given, recorded so. With it: the
    directory's tokenizer and vocabulary (loaded now; a ``--tokenizer``/``--vocab-size`` other than
    it was prepared with is refused), not recorded, so the file fits another directory too."""
    data = config.data
    if config.tokens is None:
        data = dataclasses.replace(data, tokenizer=data.tokenizer or "bpe", vocab_size=data.vocab_size or 512)
        return dataclasses.replace(config, data=data), data, None
    if data.text:
        raise ValueError(f"--tokens and --text contradict each other: {config.tokens} holds the corpus it was prepared "
                         "from (drop --text, or prepare the files: jaxllm prepare --text FILE... --out DIR)")
    tokens = load_token_dir(config.tokens)
    meta = tokens.meta
    if data.tokenizer not in (None, meta["tokenizer"]):
        raise ValueError(f"--tokenizer {data.tokenizer} contradicts --tokens {config.tokens}, prepared with "
                         f"{meta['tokenizer']} (drop --tokenizer: the directory decides)")
    if data.vocab_size not in (None, meta["requested_vocab_size"], meta["vocab_size"]):
        raise ValueError(f"--vocab-size {data.vocab_size} contradicts --tokens {config.tokens}, whose "
                         f"{meta['tokenizer']} vocabulary has {meta['vocab_size']:,} ids (drop --vocab-size: the "
                         "directory decides)")
    return config, dataclasses.replace(data, tokenizer=meta["tokenizer"], vocab_size=tokens.vocab_size), tokens


def finetune(argv=None) -> dict:
    """``jaxllm finetune lm``: ``main`` with ``FinetuneLmConfig`` (``--base`` is ``--init-from``)."""
    return main(argv, FinetuneLmConfig)


def main(argv=None, job: type = None) -> dict:
    t_start = time.perf_counter()
    cfg = cli.parse(job or LmConfig, argv)
    if isinstance(cfg, FinetuneLmConfig) and cfg.init_from is None:
        raise ValueError("--base: name the jaxllm train lm run to fine-tune")
    if cfg.mode == "lora" and cfg.init_from is None:
        raise ValueError("--mode lora adapts a trained model: name it with --init-from RUN (or use jaxllm finetune lm "
                         "--base RUN)")
    cli.start(cfg)
    run_, optim = cfg.run, cfg.optim
    strategy = cfg.devices.strategy(optim.batch_size)  # checks --batch-size against the devices now
    cfg, data_cfg, token_dir = resolve_data(cfg)  # --tokens: its directory, read (a contradicting flag is refused now)
    preset = cfg.preset_name
    # the model from the flags alone (the tokenizer's size stands in for the vocabulary until the
    # data is ready): --model/--preset and --d-model/--heads/... that do not fit fail before any data work
    config = build_config(cfg.model, preset, data_cfg.vocab_size, cfg.context, d_model=cfg.d_model,
                          layers=cfg.layers, heads=cfg.heads, dropout=cfg.dropout)
    if cfg.precision.remat:
        config = config.replace(remat=True)
    say_if_not_exportable(config, preset)
    stride, dtype = cfg.window_stride, cfg.precision.dtype

    start_from = None if run_.resume or cfg.init_from is None else load_init_run(cfg, token_dir)
    if token_dir is None:
        data = prepare_lm_data(data_cfg.text, tokenizer=data_cfg.tokenizer, vocab_size=data_cfg.vocab_size,
                               seed=run_.seed, out_dir=run_.out, reuse_tokenizer=run_.resume or bool(start_from))
        val_prompt = data.val_text[:40]
    else:  # the same ids, split and batches as --text on the corpus it was prepared from, read from disk
        data = token_dir
        data.save_tokenizer(run_.out, resume=run_.resume)  # generate, chat and export read the run's copy
        val_prompt = data.val_prefix(40)
    print(describe(data.report))
    fingerprint = (data_fingerprint(data_cfg.text, seed=run_.seed, val_fraction=VAL_FRACTION) if token_dir is None
                   else token_dir.fingerprint())
    runio.record_data(run_.out, fingerprint, resume=run_.resume, accept_change=run_.accept_data_change)
    config = config.replace(vocab_size=data.vocab_size)
    if token_dir is None:
        batches = ArrayBatches(lm_windows(data.train_ids, cfg.context, stride, vocab_size=data.vocab_size),
                               optim.batch_size, seed=run_.seed)
    else:
        batches = TokenWindows(data.train_ids, cfg.context, optim.batch_size, stride=stride, seed=run_.seed,
                               vocab_size=data.vocab_size)
    val_batches = eval_windows(data.val_ids, cfg.context, cfg.eval_batch_size)  # fails before training
    if start_from is None:
        params = config.init(jax.random.PRNGKey(run_.seed))
    else:
        params = start_from.params_for(config)
    model, adapters, plain = config, None, lambda params: params
    if cfg.mode == "lora":  # a resume restores the adapters
        adapters = AdapterTraining.start(config, params, rank=cfg.adapters.rank, alpha=cfg.adapters.alpha,
                                         key=jax.random.PRNGKey(run_.seed + 2))
        params, model, plain = adapters.params, adapters.model, adapters.merged

    def scorer(batches):
        """Loss, perplexity and bits/char of the held-out windows in ``batches`` (a prefix of val_batches)."""
        tokens = int(sum(b["mask"].sum() for b in batches))
        chars = len(decode_bytes(data.encoding, data.val_ids[1:tokens + 1].tolist()).decode("utf-8", "replace"))
        return lambda params: lm_scores(window_nll(config, plain(params), batches), tokens, chars)

    evaluate = scorer(val_batches)
    last_eval = {}

    def final_evaluate(params) -> dict:  # every held-out token; periodic evaluations score --eval-batches
        last_eval.update(evaluate(params))
        return dict(last_eval)

    opt_config = optim.build(run_.total_steps(batches.steps_per_epoch), muon_blocks=config.block_names)
    optimizer = make_optimizer(opt_config)
    run = run_config(config, opt_config, batch_size=optim.batch_size, seed=run_.seed, context=cfg.context,
                     stride=stride, text=list(data_cfg.text) if data_cfg.text else None,
                     tokenizer=data_cfg.tokenizer, vocab_size=data.vocab_size,
                     **({"dtype": dtype} if dtype != "float32" else {}),
                     # a resume must read the same token files: their place and size
                     **({"tokens": cfg.tokens, "train_tokens": int(data.train_ids.size),
                         "val_tokens": int(data.val_ids.size)} if token_dir is not None else {}),
                     **({"lora": adapters.lora.to_dict()} if adapters is not None else {}))
    title = f"{cfg.model} LM ({preset})"
    loss_fn = lm_loss(model)
    if adapters is not None:  # only the adapters train: no optimiser state or gradient for the rest
        optimizer, loss_fn = adapters.optimizer(optimizer), adapters.loss(loss_fn)
    loss_fn = mixed_precision(loss_fn, dtype)  # float32: unchanged
    train_step = strategy.train_step(loss_fn, optimizer, accum_steps=cfg.devices.accum_steps)
    fit_settings = fit_config(cfg, steps_per_epoch=batches.steps_per_epoch, run_config=run, unit="tokens",
                                units_per_batch=optim.batch_size * cfg.context, title=title)
    state = fit(TrainState.create(params, optimizer, jax.random.PRNGKey(run_.seed + 1)), train_step, batches,
                fit_settings, eval_fn=scorer(val_batches[:cfg.eval_batches]), final_eval_fn=final_evaluate,
                strategy=strategy)

    final = last_eval or evaluate(state.params)  # fit() evaluates after its last step
    if adapters is not None:
        lora.save_lora(os.path.join(run_.out, ADAPTERS_FILE), state.params, adapters.lora)
    prompt, sample = sample_text(config, plain(state.params), data.encoding, val_prompt,
                                 max_new_tokens=cfg.sample_tokens, key=jax.random.PRNGKey(run_.seed),
                                 temperature=cfg.temperature, top_k=cfg.top_k)
    write_atomically(os.path.join(run_.out, "sample.txt"), prompt + sample + "\n")
    add_text(run_.out, "sample", prompt + sample, int(state.step))
    summary = update_json(os.path.join(run_.out, "summary.json"), {
        "val_loss": final["loss"], "val_perplexity": final["perplexity"], "val_bpc": final["bpc"],
        "model": cfg.model, "preset": preset, "context": cfg.context,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(state.params)), "data": data.report,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    })
    print(f"--- sample (KV-cache generation, temperature {cfg.temperature}, top-k {cfg.top_k}) ---\n"
          f"{prompt + sample}\n---")
    print(f"val loss {final['loss']:.4f} nats/token, perplexity {final['perplexity']:.2f}, {final['bpc']:.4f} bits/char "
          f"-> {run_.out}")
    return summary
