"""Classification fine-tuning (Raschka ch. 6): a language model becomes a text classifier.

The base (``--base``: a ``jaxllm train lm`` run directory, default ``runs/lm`` from ``make demo``, or
a local Hugging Face directory (GPT-2, Llama)) keeps every weight; its vocabulary head is replaced by a new
``Linear(d_model, classes)`` and the class is read from the logits at each text's last real token.

Data (``--format``): ``vader`` (default; the VADER movie-review snippets, fetched once with
``python -m jaxllm.data.fetch_vader``; rating > 0 positive, < 0 negative, 0 dropped) or ``sms``
(``label<TAB>text`` lines, labels ham/spam or ``--labels``). Classes are balanced by
undersampling and split 70/10/20 with ``--seed``. Texts are right-padded with the tokenizer's
end-of-text id to one length (``--max-length``, default the longest training text, capped at the
model's context); longer texts keep their first tokens and are counted in ``summary.json``
(``truncated``).

``--mode``: ``lora`` (Raschka app. E: everything frozen, LoRA adapters on every weight matrix, the
new head's included, ``--rank``/``--alpha``), ``last-block`` (ch. 6: last block + final norm +
head), ``head`` or ``full``. AdamW with weight decay 0.1
and batch 8 as in the book; the learning rate and schedule default per mode (``DEFAULT_LR``,
``DEFAULT_SCHEDULE``).

Every epoch the validation accuracy is logged; at the end ``summary.json`` holds train/val/test
accuracy, the test set's majority-class rate (``majority_baseline``), trainable and total
parameter counts, and ``classifier/`` the merged classifier (``params.safetensors``,
``classifier.json``, ``tokenizer.json``: LoRA factors are merged into the weights, so it stands
alone without the base). ``--predict "text" ... --out RUN`` classifies texts with it.
``--parallel``, ``--accum-steps``, ``--dtype`` and ``--remat`` work as in ``jaxllm train lm``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import config_from_dict
from jaxllm.data import classification as cdata
from jaxllm.data.batches import ArrayBatches
from jaxllm.data.tokenizer import load_encoding, save_encoding
from jaxllm.models import classifier
from jaxllm.pretrained import load_base
from jaxllm import cli, runio
from jaxllm.data.corpus import files_fingerprint
from jaxllm.options import Adapters, Devices, Evaluation, MultiHost, Optim, Precision, Run, fit_config, option
from jaxllm.options.parts import eval_batches_option
from jaxllm.options.values import absolute_path, fraction_below_1, positive_int
from jaxllm.training import TrainState, fit, make_eval_step, make_optimizer
from jaxllm.training.checkpoint import run_config
from jaxllm.training.freeze import (count_params, freeze_optimizer, stop_frozen_gradients, trainable_mask,
                                   trainable_predicate)
from jaxllm.training.losses import classification_loss, last_token_logits
from jaxllm.training.optim import default_warmup
from jaxllm.runio import update_json, write_json
from jaxllm.training.precision import mixed_precision
from jaxllm.runio import is_first_process

# Measured on a Burkov-decoder base (lm.py's defaults, BPE 512) with the VADER snippets: docs/finetuning.md.
DEFAULT_LR = {"lora": 8e-4, "last_block": 3e-3, "head": 1e-3, "full": 5e-4}
# last-block on the small demo base: constant 1e-3 gave test +8.5 points over the majority class,
# 3e-3 with 100 warmup steps and cosine decay +10.4 (docs/finetuning.md)
DEFAULT_SCHEDULE = {"last_block": ("warmup_cosine", 100)}
EXPORT_DIR = "classifier"  # one of runio.RUN_OUTPUTS: --overwrite sets it aside with the run
MODES = ("lora", "last-block", "head", "full")


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    __doc__ = __doc__
    JOB: ClassVar[str] = "classify"
    run: Run = Run(out="runs/classify", epochs=3, log_every=100)
    # --lr, --schedule and --warmup-steps default per --mode (``optim_for``): None here, and so in config.yaml
    optim: Optim = Optim(batch_size=8, lr=None, weight_decay=0.1, schedule=None, warmup_steps=None)
    base: str = option("runs/lm", "a `jaxllm train lm` run directory (`make demo` writes runs/lm) or a local HF GPT-2 "
                                  "directory", type=absolute_path, section="model")
    mode: str = option("lora", "what trains: LoRA adapters, the last block + final norm + head, the head, everything",
                       choices=MODES, section="model")
    adapters: Adapters = Adapters()
    dropout: float | None = option(None, "GPT-2 bases: drop rate (default 0.0, the book's)", type=fraction_below_1,
                                   section="model")
    data: str | None = option(None, f"data file (default for vader: {cdata.VADER_DEFAULT})", type=absolute_path,
                              section="data")
    format: str = option("vader", "vader: the movie-review snippets; sms: label<TAB>text lines",
                         choices=cdata.FORMATS, section="data")
    labels: tuple[str, ...] | None = option(None, "sms format: the label names, class 0 first", many=True,
                                            section="data")
    max_length: int | None = option(None, "tokens per text (default: the longest training text, capped at the "
                                          "context)", type=positive_int, section="data")
    evaluation: Evaluation = Evaluation()
    eval_batches: int = eval_batches_option()
    eval_batch_size: int = option(64, "rows per evaluation batch", type=positive_int, section="evaluation")
    predict: tuple[str, ...] | None = option(None, "classify these texts with the classifier saved in --out (no "
                                                   "training)", many=True, metavar="TEXT", section="evaluation")
    devices: Devices = Devices()
    precision: Precision = Precision()
    hosts: MultiHost = MultiHost()

    HELP: ClassVar[dict] = {
        "lr": "learning rate (default: per --mode: " + ", ".join(f"{mode.replace('_', '-')} {lr:g}"
                                                               for mode, lr in DEFAULT_LR.items()) + ")",
        "schedule": "learning-rate schedule (default: per --mode: warmup_cosine for last-block, else constant)",
        "warmup_steps": "warmup of a decaying schedule (default: per --mode, at most a tenth of the run)",
    }

    @property
    def mode_name(self) -> str:
        """``--mode`` as the training code names it: ``last_block``."""
        return self.mode.replace("-", "_")

    @property
    def learning_rate(self) -> float:
        """``--lr``, else the mode's (``DEFAULT_LR``)."""
        return DEFAULT_LR[self.mode_name] if self.optim.lr is None else self.optim.lr

    @property
    def lr_schedule(self) -> str:
        """``--schedule``, else the mode's (``DEFAULT_SCHEDULE``; constant)."""
        if self.optim.schedule is not None:
            return self.optim.schedule
        return DEFAULT_SCHEDULE.get(self.mode_name, ("constant", 0))[0]

    def warmup_for(self, total: int) -> int:
        """``--warmup-steps``, else the mode's warmup (at most a tenth of a run of ``total`` steps)
        under a decaying schedule, 0 under a constant one."""
        if self.optim.warmup_steps is not None:
            return self.optim.warmup_steps
        return default_warmup(self.lr_schedule, total, longest=DEFAULT_SCHEDULE.get(self.mode_name, ("constant", 0))[1])

    def optim_for(self, total: int) -> Optim:
        """The optimiser part with the per-mode defaults filled in, for a run of ``total`` steps."""
        return dataclasses.replace(self.optim, lr=self.learning_rate, schedule=self.lr_schedule,
                                   warmup_steps=self.warmup_for(total))


def listing(counts: dict) -> str:
    """``{"train": 7338, "val": 1048}`` as ``train 7,338, val 1,048``."""
    return ", ".join(f"{name} {count:,}" for name, count in counts.items())


def prepare_data(cfg: ClassifyConfig, encoding, limit: int):
    """Load, balance, split and encode; returns ``(splits {name: Encoded}, label_names, max_length, report)``."""
    path = cfg.data or cdata.VADER_DEFAULT
    seed = cfg.run.seed
    data = cdata.load(path, cfg.format, list(cfg.labels) if cfg.labels is not None else None)
    balanced = cdata.balance(data, seed)
    parts = dict(zip(("train", "val", "test"), cdata.split(balanced, seed)))
    if cfg.max_length is not None:
        if not 1 <= cfg.max_length <= limit:
            raise ValueError(f"--max-length must lie in [1, {limit}] (the model's context), got {cfg.max_length}")
        max_length = cfg.max_length
    else:
        max_length = min(cdata.longest(encoding, parts["train"].texts), limit)
    splits = {name: cdata.encode_texts(encoding, part.texts, max_length, labels=part.labels)
              for name, part in parts.items()}
    report = {"path": os.fspath(path), "format": cfg.format, "loaded": data.counts(),
              "balanced": balanced.counts(), "sizes": {k: len(v) for k, v in parts.items()},
              "test_counts": parts["test"].counts()}
    return splits, data.label_names, max_length, report


def padded_batches(encoded: cdata.Encoded, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Fixed-shape evaluation batches; the last is filled with weight-0 copies of row 0."""
    n = len(encoded.labels)
    rows = -(-n // batch_size) * batch_size
    index = np.concatenate([np.arange(n), np.zeros(rows - n, np.int64)])
    weights = (np.arange(rows) < n).astype(np.float32)
    arrays = {**{k: v[index] for k, v in encoded.arrays().items()}, "weights": weights}
    return [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, rows, batch_size)]


def make_evaluator(loss_fn, batch_size: int):
    """``evaluate(params, encoded, max_batches=None) -> {"loss", "accuracy"}`` over every row exactly
    once (or the rows of the first ``max_batches`` batches)."""
    eval_step = make_eval_step(loss_fn)

    def evaluate(params, encoded: cdata.Encoded, max_batches: int | None = None) -> dict[str, float]:
        loss = correct = count = 0.0
        for batch in padded_batches(encoded, batch_size)[:max_batches]:
            m = jax.device_get(eval_step(params, batch))
            n = float(m["targets"])
            loss, correct, count = loss + float(m["loss"]) * n, correct + float(m["accuracy"]) * n, count + n
        return {"loss": loss / count, "accuracy": correct / count}

    return evaluate


def export(out: str, config, params, encoding, meta: dict) -> str:
    """Write ``out/classifier/{params.safetensors, classifier.json, tokenizer.json}``."""
    from safetensors.numpy import save_file

    from jaxllm.training.freeze import path_str

    directory = os.path.join(out, EXPORT_DIR)
    if not is_first_process():  # a multi-host run: process 0 writes the run's files
        return directory
    os.makedirs(directory, exist_ok=True)
    flat = {path_str(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    save_file(flat, os.path.join(directory, "params.safetensors"))
    save_encoding(encoding, os.path.join(directory, "tokenizer.json"))
    write_json(os.path.join(directory, "classifier.json"), {"config": config.to_dict(), **meta})
    return directory


def load_classifier(out: str):
    """``(config, params, encoding, meta)`` of a finished run's ``classifier/`` export."""
    from safetensors.numpy import load_file

    from jaxllm.training.freeze import path_str

    directory = os.path.join(out, EXPORT_DIR)
    if not os.path.isfile(os.path.join(directory, "classifier.json")):
        raise ValueError(f"{out} holds no finished classifier ({directory}/classifier.json): train one first with "
                         f"jaxllm finetune classify --out {out}")
    with open(os.path.join(directory, "classifier.json")) as f:
        meta = json.load(f)
    config = config_from_dict(meta.pop("config"))
    flat = load_file(os.path.join(directory, "params.safetensors"))
    template = config.param_shapes()

    def fill(path, leaf):
        name = path_str(path)
        if name not in flat or flat[name].shape != leaf.shape:
            raise ValueError(f"{directory}/params.safetensors does not match its config at {name}")
        return jnp.asarray(flat[name])

    params = jax.tree_util.tree_map_with_path(fill, template)
    if len(flat) != len(jax.tree_util.tree_leaves(template)):
        raise ValueError(f"{directory}/params.safetensors holds parameters its config does not have")
    return config, params, load_encoding(os.path.join(directory, "tokenizer.json")), meta


def predict(out: str, texts: list[str]) -> list[dict]:
    """Classify ``texts`` with the classifier saved in ``out``: ``[{"text", "label", "probabilities"}]``."""
    config, params, encoding, meta = load_classifier(out)
    encoded = cdata.encode_texts(encoding, texts, meta["max_length"])
    config.validate_input(encoded.tokens)
    logits = last_token_logits(jax.jit(config.logits)(params, encoded.tokens), encoded.lengths)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    names = meta["label_names"]
    return [{"text": t, "label": names[int(p.argmax())], "probabilities": dict(zip(names, map(float, p))),
             "truncated": bool(n > meta["max_length"])}
            for t, p, n in zip(texts, probs, map(len, cdata.token_lists(encoding, texts)))]


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    cfg = cli.parse(ClassifyConfig, argv)
    if cfg.predict is not None:  # no training: --out is read, not claimed
        cli.start(cfg, claim=False)
        results = predict(cfg.run.out, list(cfg.predict))
        for r in results:
            p = r["probabilities"][r["label"]]
            print(f"{r['label']} ({p:.3f}){' [truncated]' if r['truncated'] else ''}: {r['text']}")
        return {"predictions": results}
    cli.start(cfg)  # now refuse (or --overwrite) an existing run
    run_, mode, precision = cfg.run, cfg.mode_name, cfg.precision
    batch_size, seed, labels = cfg.optim.batch_size, run_.seed, list(cfg.labels) if cfg.labels is not None else None
    strategy = cfg.devices.strategy(batch_size)  # checks --batch-size against the devices and --accum-steps now

    base = load_base(cfg.base)
    lm_config = base.config
    lm_config = lm_config.with_dropout(0.0 if cfg.dropout is None else cfg.dropout)  # the book's 0.0
    if precision.remat:
        lm_config = lm_config.replace(remat=True)
    splits, label_names, max_length, report = prepare_data(cfg, base.encoding, lm_config.context_limit)
    runio.record_data(run_.out, files_fingerprint([report["path"]], format=cfg.format, labels=labels,
                                                  seed=seed), resume=run_.resume,
                      accept_change=run_.accept_data_change)
    for part in splits.values():
        lm_config.validate_input(part.tokens)
    truncated = {name: part.truncated for name, part in splits.items()}
    print(f"examples: {listing(report['sizes'])} (balanced: {listing(report['balanced'])}); max length "
          f"{max_length} tokens; truncated: {listing(truncated)}")

    key_head, key_lora, key_train = jax.random.split(jax.random.PRNGKey(seed), 3)
    config, params = classifier.from_lm(lm_config, base.params, len(label_names), key_head)
    apply = lambda p, tokens, key=None: config.logits(p, tokens, key=key)  # noqa: E731
    lora_cfg = None
    if mode == "lora":
        from jaxllm.nn import lora

        lora_cfg = lora.raschka(rank=cfg.adapters.rank, alpha=cfg.adapters.alpha)
        params = lora.add_lora(params, lora_cfg, key_lora)
        apply = lora.apply_with_lora(apply, lora_cfg)
    mask = trainable_mask(params, trainable_predicate(config, mode))
    loss_fn = classification_loss(apply)

    batches = ArrayBatches(splits["train"].arrays(), batch_size, seed=seed)
    total = run_.total_steps(batches.steps_per_epoch)
    opt_config = cfg.optim_for(total).build(total)  # the mode's lr, schedule and warmup unless given
    optimizer = freeze_optimizer(make_optimizer(opt_config), mask)
    evaluate = make_evaluator(loss_fn, cfg.eval_batch_size)
    run = run_config(config, opt_config, batch_size=batch_size, seed=seed, mode=mode,
                     base=base.source, data=report["path"], format=cfg.format, labels=list(label_names),
                     max_length=max_length, rank=cfg.adapters.rank if lora_cfg else None,
                     alpha=cfg.adapters.alpha if lora_cfg else None,
                     **({"dtype": precision.dtype} if precision.dtype != "float32" else {}))
    # frozen leaves get no gradient computed; bf16 compute when --dtype asks (evaluation stays fp32)
    train_loss = mixed_precision(stop_frozen_gradients(loss_fn, mask), precision.dtype)
    train_step = strategy.train_step(train_loss, optimizer, accum_steps=cfg.devices.accum_steps)
    # config.yaml records the flags as given: --lr/--schedule/--warmup-steps stay per-mode (None) unless set
    fit_cfg = fit_config(cfg, steps_per_epoch=batches.steps_per_epoch, run_config=run, title=f"classifier ({mode})")
    state = fit(TrainState.create(params, optimizer, key_train), train_step, batches, fit_cfg, strategy=strategy,
                eval_fn=lambda p: evaluate(p, splits["val"], cfg.eval_batches),
                final_eval_fn=lambda p: evaluate(p, splits["val"]))

    results = {name: evaluate(state.params, part) for name, part in splits.items()}
    test_labels = splits["test"].labels
    majority = float(np.bincount(test_labels, minlength=len(label_names)).max() / len(test_labels))
    final_params = lora.merge(state.params, lora_cfg) if lora_cfg else state.params
    export(run_.out, config, final_params, base.encoding,
           {"label_names": list(label_names), "max_length": max_length, "mode": mode, "base": base.source,
            "lora_merged": lora_cfg.to_dict() if lora_cfg else None})
    summary = update_json(os.path.join(run_.out, "summary.json"), {
        **{f"{name}_accuracy": r["accuracy"] for name, r in results.items()},
        **{f"{name}_loss": r["loss"] for name, r in results.items()},
        "majority_baseline": majority, "trainable_params": count_params(state.params, mask),
        "total_params": count_params(state.params), "mode": mode, "base": base.source, "lr": cfg.learning_rate,
        "truncated": truncated, "max_length": max_length, "label_names": list(label_names), "data": report,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    })
    print(f"accuracy train {summary['train_accuracy']:.4f} val {summary['val_accuracy']:.4f} test "
          f"{summary['test_accuracy']:.4f} (majority {majority:.4f}); {summary['trainable_params']:,} of "
          f"{summary['total_params']:,} parameters trained ({mode}) -> {run_.out}")
    return summary
