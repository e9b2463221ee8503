"""Instruction fine-tuning (Raschka ch. 7) of a base language model on Alpaca-format records.

The base is a ``jaxllm train lm`` run directory (default ``runs/lm``, made by ``make demo``) or a
local Hugging Face directory (GPT-2, Llama), with its own tokenizer. ``--data`` is an Alpaca JSON list
(default: the small data set this project ships, ``jaxllm/data/assets/instructions.json``),
split 85/10/5 into train/test/validation after a shuffle by ``--seed``.

Each record becomes the book's prompt + response + one end-of-text token; rows are padded with
end-of-text to one fixed width (the longest record, at most ``--max-length`` tokens, by default
the context the base was trained at) and every padding target but the first is ignored (-100).
``--mask-prompt`` also ignores the targets inside the prompt, so only the response is learned.

AdamW with weight decay 0.1 and batch 8 as the book; lr and epochs default to the book's 5e-5 x 2
for a Hugging Face GPT-2 base and to 1e-3 x 5 for a (small, from-scratch) ``jaxllm train lm`` base.
The validation loss (mean over scored tokens) is measured before training and every
``--eval-every`` steps (default: a quarter epoch); metrics.jsonl, loss.png and checkpoints/ go
to ``--out`` with the base's tokenizer.json, so the output directory is itself a base for
``jaxllm generate``. After training, greedy KV-cached responses to the test records (stopped
at end-of-text) are written to ``test_responses.json`` (each record plus ``model_response``),
and summary.json gets ``val_loss_first``, ``val_loss_last``, the record counts and the test
exact-match rate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import ClassVar

import jax
import numpy as np

from jaxllm.data.batches import ArrayBatches
from jaxllm.data.instruct import (IGNORE_INDEX, SHIPPED_PATH, collate, format_prompt, load_instructions,
                                  padded_batches, split_instructions, tokenize_instructions)
from jaxllm.data.tokenizer import encode, save_encoding
from jaxllm.generate import generate
from jaxllm.nn import lora
from jaxllm.pretrained import load_base
from jaxllm import cli, runio
from jaxllm.data.corpus import files_fingerprint
from jaxllm.options import Adapters, Devices, Evaluation, MultiHost, Optim, Precision, Run, fit_config, option, parts
from jaxllm.options.values import absolute_path, fraction_below_1, int_in, positive_int
from jaxllm.training import TrainState, fit, make_optimizer
from jaxllm.training.precision import mixed_precision
from jaxllm.training.checkpoint import run_config
from jaxllm.training.freeze import AdapterTraining, count_params
from jaxllm.training.losses import lm_loss
from jaxllm.runio import ADAPTERS_FILE, update_json, write_atomically


MODES = ("full", "lora")


@dataclasses.dataclass(frozen=True)
class InstructConfig:
    __doc__ = __doc__
    JOB: ClassVar[str] = "instruct"
    # The book's AdamW (weight decay 0.1, batch 8). Its lr 5e-5 for 2 epochs suits a pretrained GPT-2
    # (the default for a Hugging Face base); the small models `jaxllm train lm` makes here barely move at
    # that rate. Measured on a 0.5M-parameter Burkov decoder base (`jaxllm train lm`, 400 steps): val loss
    # 4.91 -> 1.53 in 2 epochs at 5e-5, -> 0.36 at 1e-3; at 1e-3 it levels off near 0.29 after ~5
    # epochs (10 epochs: 0.288), when responses have taken each task's form. So a run-directory
    # base defaults to lr 1e-3 for 5 epochs. --lr and --epochs default per base (``lr_for``,
    # ``run_for``): None here, and so in config.yaml.
    run: Run = Run(out="runs/instruct", epochs=None, log_every=10)
    optim: Optim = Optim(batch_size=8, lr=None, weight_decay=0.1)
    base: str = option("runs/lm", "a `jaxllm train lm` output directory or a local Hugging Face directory (GPT-2, Llama)",
                       type=absolute_path, section="model")
    mode: str = option("full", "what trains: every weight (the book's), or LoRA adapters on every weight matrix with "
                               "the rest frozen (saved apart as adapters.safetensors; checkpoints hold them, and "
                               "generate, chat and export merge them)", choices=MODES, section="model")
    adapters: Adapters = Adapters()
    dropout: float | None = option(None, "GPT-2 bases: drop rate while fine-tuning (default: the base's; the book "
                                         "uses 0.0)", type=fraction_below_1, section="model")
    data: str = option(str(SHIPPED_PATH), "Alpaca-format JSON list of records", type=absolute_path, section="data")
    mask_prompt: bool = option(False, "score only the response tokens", section="data")
    max_length: int | None = option(None, "tokens per training row (default: the context the base was trained at)",
                                    type=int_in(2), section="data")
    evaluation: Evaluation = Evaluation()
    eval_batches: int = parts.eval_batches_option()
    max_new_tokens: int = option(48, "response length limit for the test records", type=positive_int,
                                 section="evaluation")
    eval_batch_size: int = option(32, "rows per validation / generation batch", type=positive_int,
                                  section="evaluation")
    devices: Devices = Devices()
    precision: Precision = Precision()
    hosts: MultiHost = MultiHost()

    HELP: ClassVar[dict] = {
        "lr": "learning rate (default: 5e-5 for a Hugging Face base, else 1e-3)",
        "epochs": "passes over the training records (default: 2 for a Hugging Face base, else 5)",
    }

    def lr_for(self, pretrained: bool) -> float:
        """``--lr``, else the book's 5e-5 for a Hugging Face base (``pretrained``), 1e-3 for a run directory."""
        if self.optim.lr is not None:
            return self.optim.lr
        return 5e-5 if pretrained else 1e-3

    def run_for(self, pretrained: bool) -> Run:
        """The run part with its length decided: ``--steps``, ``--epochs``, else 2 epochs of a
        Hugging Face base (``pretrained``), 5 of a run directory."""
        if self.run.epochs is not None or self.run.steps is not None:
            return self.run
        return dataclasses.replace(self.run, epochs=2 if pretrained else 5)


def make_evaluate(model, batches):
    """``evaluate(params, max_batches=None) -> {"loss", "accuracy"}``: means over every scored target
    of ``batches`` (or of their first ``max_batches``), weighted by token, so the filler rows of the
    last batch count for nothing. ``model``: anything with the language models' ``logits``."""
    loss_fn = lm_loss(model, pad_id=IGNORE_INDEX)

    @jax.jit
    def sums(params, batch):
        loss, aux = loss_fn(params, batch, None)
        return loss * aux["targets"], aux["accuracy"] * aux["targets"], aux["targets"]

    def evaluate(params, max_batches: int | None = None) -> dict:
        totals = np.sum([jax.device_get(sums(params, b)) for b in batches[:max_batches]], axis=0)
        if totals[2] == 0:
            raise ValueError("the validation records have no scored tokens (all truncated away?)")
        return {"loss": float(totals[0] / totals[2]), "accuracy": float(totals[1] / totals[2])}

    return evaluate


def respond(config, params, encoding, records, *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy KV-cached responses to ``records``' prompts, each stopped at end-of-text. A model with
    a position limit (GPT-2's ``context_length``) keeps prompt + new tokens within it: longer
    prompts keep their last tokens."""
    eot = encoding.eot_token
    prompts = [encode(encoding, format_prompt(r)) for r in records]
    if config.max_positions is not None:
        room = config.max_positions - max_new_tokens
        if room < 1:
            raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the base's "
                             f"{config.max_positions} positions")
        prompts = [p[-room:] for p in prompts]
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        new = generate(config, params, chunk, max_new_tokens=max_new_tokens, key=jax.random.PRNGKey(0),
                       eos_id=eot, max_len=max(map(len, chunk)) + max_new_tokens)
        texts += [encoding.decode([t for t in ids if t != eot]).strip() for ids in new]
    return texts


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    cfg = cli.parse(InstructConfig, argv)
    cli.start(cfg)
    seed, precision, batch_size = cfg.run.seed, cfg.precision, cfg.optim.batch_size

    records = load_instructions(cfg.data)  # bad data fails before the base is loaded
    runio.record_data(cfg.run.out, files_fingerprint([cfg.data], seed=seed), resume=cfg.run.resume,
                      accept_change=cfg.run.accept_data_change)
    train_records, test_records, val_records = split_instructions(records, seed=seed)
    base = load_base(cfg.base)
    pretrained = base.source.startswith("hf:")
    # the base decides --lr and the run's length unless given (config.yaml keeps them as given)
    run_, optim = cfg.run_for(pretrained), dataclasses.replace(cfg.optim, lr=cfg.lr_for(pretrained))
    config = base.config
    if cfg.dropout is not None:
        config = config.with_dropout(cfg.dropout)  # refused by a base without dropout
    if precision.remat:
        config = config.replace(remat=True)
    strategy = cfg.devices.strategy(batch_size)  # checks --batch-size against the devices and --accum-steps now
    max_length = cfg.max_length or base.context
    limit = config.max_positions
    if max_length < 2 or (limit is not None and max_length > limit):
        raise ValueError(f"--max-length must lie in [2, {limit or 'inf'}] (the base's context), got {max_length}")

    pad_id = base.encoding.eot_token
    splits = {name: tokenize_instructions(base.encoding, part)
              for name, part in (("train", train_records), ("val", val_records), ("test", test_records))}
    longest = max(len(ids) for token_lists, _ in splits.values() for ids in token_lists)
    width = min(longest, max_length)
    truncated = sum(len(ids) > width for token_lists, _ in splits.values() for ids in token_lists)
    if truncated:
        hint = ("" if limit is not None else
                f"; the model has no position limit, so --max-length {longest} would keep them whole")
        print(f"warning: {truncated} of {len(records)} records exceed --max-length {max_length} tokens and are cut "
              f"(their response ends are not learned){hint}", file=sys.stderr)

    def arrays(name):
        token_lists, prompt_lengths = splits[name]
        return collate(token_lists, pad_id=pad_id, length=width,
                       prompt_lengths=prompt_lengths if cfg.mask_prompt else None)

    if batch_size > len(train_records):
        raise ValueError(f"--batch-size {batch_size} exceeds the {len(train_records)} training records")
    batches = ArrayBatches(arrays("train"), batch_size, seed=seed)
    params, model, adapters = base.params, config, None
    if cfg.mode == "lora":
        adapters = AdapterTraining.start(config, params, rank=cfg.adapters.rank, alpha=cfg.adapters.alpha,
                                         key=jax.random.PRNGKey(seed + 2))
        params, model = adapters.params, adapters.model
    evaluate = make_evaluate(model, padded_batches(arrays("val"), cfg.eval_batch_size, pad_id=pad_id))
    val_first = evaluate(params)["loss"]
    print(f"{len(records)} records: {len(train_records)} train, {len(val_records)} val, {len(test_records)} test; "
          f"rows of {width} tokens; val loss before fine-tuning {val_first:.4f}")

    total = run_.total_steps(batches.steps_per_epoch)
    opt_config = optim.build(total, muon_blocks=config.block_names)
    optimizer = make_optimizer(opt_config)
    loss_fn = lm_loss(model, pad_id=IGNORE_INDEX)
    if adapters is not None:  # only the adapters train: no optimiser state or gradient for the rest
        optimizer, loss_fn = adapters.optimizer(optimizer), adapters.loss(loss_fn)
    run = run_config(config, opt_config, batch_size=batch_size, seed=seed, context=max_length,
                     **({"dtype": precision.dtype} if precision.dtype != "float32" else {}),
                     **({"lora": adapters.lora.to_dict()} if adapters is not None else {}),
                     base=base.source, instructions=os.path.abspath(cfg.data), mask_prompt=cfg.mask_prompt)
    os.makedirs(run_.out, exist_ok=True)
    save_encoding(base.encoding, os.path.join(run_.out, "tokenizer.json"))  # the output is a base itself
    last_eval = {}

    def final_eval_fn(params):  # every validation record; periodic evaluations score --eval-batches
        last_eval.update(evaluate(params))
        return dict(last_eval)

    fit_cfg = fit_config(cfg, steps_per_epoch=batches.steps_per_epoch, **run_.length(), run_config=run,
                         unit="tokens", units_per_batch=batch_size * width, title="instruction fine-tuning",
                         eval_every=cfg.evaluation.eval_every or max(1, batches.steps_per_epoch // 4))
    state = fit(TrainState.create(params, optimizer, jax.random.PRNGKey(seed + 1)),
                strategy.train_step(mixed_precision(loss_fn, precision.dtype), optimizer,
                                    accum_steps=cfg.devices.accum_steps),
                batches, fit_cfg, eval_fn=lambda params: evaluate(params, cfg.eval_batches),
                final_eval_fn=final_eval_fn, strategy=strategy)
    val_last = (last_eval or evaluate(state.params))["loss"]
    tuned = state.params
    if adapters is not None:
        lora.save_lora(os.path.join(run_.out, ADAPTERS_FILE), state.params, adapters.lora)
        tuned = adapters.merged(state.params)  # the KV-cached decoder reads plain weights

    responses = respond(config, tuned, base.encoding, test_records, max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.eval_batch_size)
    answered = [{**record, "model_response": text} for record, text in zip(test_records, responses)]
    write_atomically(os.path.join(run_.out, "test_responses.json"),  # record order and key order kept
                     json.dumps(answered, indent=1, ensure_ascii=False))
    exact = sum(r["model_response"] == r["output"].strip() for r in answered)
    summary = update_json(os.path.join(run_.out, "summary.json"), {
        "val_loss_first": val_first, "val_loss_last": val_last, "base": base.source,
        "records": {"total": len(records), "train": len(train_records), "val": len(val_records),
                    "test": len(test_records), "truncated": truncated},
        "max_length": max_length, "row_tokens": width, "mask_prompt": cfg.mask_prompt, "mode": cfg.mode,
        "trainable_params": count_params(state.params, lora.lora_mask(state.params)) if adapters else
        count_params(state.params),
        "test_exact_match": exact / len(answered),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    })
    print(f"val loss {val_first:.4f} -> {val_last:.4f}; test exact match {exact}/{len(answered)}; "
          f"responses in {os.path.join(run_.out, 'test_responses.json')}")
    return summary
