"""Classification fine-tuning (Raschka ch. 6): a language model becomes a text classifier.

The base (``--base``: a ``jaxllm train lm`` run directory, default ``runs/lm`` from ``make demo``, or
a local Hugging Face GPT-2 directory) keeps every weight; its vocabulary head is replaced by a new
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

import json
import os
import time

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
from jaxllm.training import TrainState, fit, make_eval_step, make_optimizer
from jaxllm.training.checkpoint import run_config
from jaxllm.training.freeze import (count_params, freeze_optimizer, stop_frozen_gradients, trainable_mask,
                                   trainable_predicate)
from jaxllm.training.losses import classification_loss, last_token_logits
from jaxllm.runio import update_json, write_json
from jaxllm.training.precision import mixed_precision
from jaxllm.runio import is_first_process

# Measured on a Burkov-decoder base (lm.py's defaults, BPE 512) with the VADER snippets: see README.
DEFAULT_LR = {"lora": 8e-4, "last_block": 3e-3, "head": 1e-3, "full": 5e-4}
# last-block on the small demo base: constant 1e-3 gave test +8.5 points over the majority class,
# 3e-3 with 100 warmup steps and cosine decay +10.4 (README table)
DEFAULT_SCHEDULE = {"last_block": ("warmup_cosine", 100)}
EXPORT_DIR = "classifier"  # one of runio.RUN_OUTPUTS: --overwrite sets it aside with the run


def prepare_data(args, encoding, limit: int):
    """Load, balance, split and encode; returns ``(splits {name: Encoded}, label_names, max_length, report)``."""
    path = args.data or cdata.VADER_DEFAULT
    data = cdata.load(path, args.format, args.labels)
    balanced = cdata.balance(data, args.seed)
    parts = dict(zip(("train", "val", "test"), cdata.split(balanced, args.seed)))
    if args.max_length is not None:
        if not 1 <= args.max_length <= limit:
            raise ValueError(f"--max-length must lie in [1, {limit}] (the model's context), got {args.max_length}")
        max_length = args.max_length
    else:
        max_length = min(cdata.longest(encoding, parts["train"].texts), limit)
    splits = {name: cdata.encode_texts(encoding, part.texts, max_length, labels=part.labels)
              for name, part in parts.items()}
    report = {"path": os.fspath(path), "format": args.format, "loaded": data.counts(),
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


def make_parser():
    parser = cli.make_parser(__doc__, job="classify", epochs=3, lr=0.0, batch_size=8, weight_decay=0.1,
                             log_every=100)
    parser.set_defaults(lr=None, schedule=None, warmup_steps=None)  # per-mode defaults, resolved in main
    parser.add_argument("--base", type=cli.absolute_path, default="runs/lm",
                        help="a `jaxllm train lm` run directory (`make demo` writes runs/lm) or a local HF GPT-2 directory")
    parser.add_argument("--data", type=cli.absolute_path, default=None, help=f"data file (default for vader: {cdata.VADER_DEFAULT})")
    parser.add_argument("--format", choices=cdata.FORMATS, default="vader",
                        help="vader: the movie-review snippets; sms: label<TAB>text lines")
    parser.add_argument("--labels", nargs="+", default=None, help="sms format: the label names, class 0 first")
    parser.add_argument("--mode", choices=("lora", "last-block", "head", "full"), default="lora",
                        help="what trains: LoRA adapters, the last block + final norm + head, the head, everything")
    parser.add_argument("--rank", type=cli.positive_int, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=cli.positive_float, default=16.0, help="LoRA alpha (scale alpha / rank)")
    parser.add_argument("--max-length", type=cli.positive_int, default=None,
                        help="tokens per text (default: the longest training text, capped at the context)")
    parser.add_argument("--dropout", type=cli.fraction_below_1, default=None,
                        help="GPT-2 bases: drop rate (default 0.0, the book's)")
    parser.add_argument("--eval-batch-size", type=cli.positive_int, default=64, help="rows per evaluation batch")
    parser.add_argument("--predict", nargs="+", default=None, metavar="TEXT",
                        help="classify these texts with the classifier saved in --out (no training)")
    cli.add_eval_batches(parser)
    parser.reword(lr=f"learning rate (default: per --mode, {DEFAULT_LR})",
                  schedule="learning-rate schedule (default: per --mode: warmup_cosine for last-block, else constant)",
                  warmup_steps="warmup of a decaying schedule (default: per --mode, at most a tenth of the run)")
    parser.arrange(model=["--base", "--mode", "--rank", "--alpha", "--dropout"],
                   data=["--data", "--format", "--labels", "--max-length"],
                   evaluation=["--eval-batch-size", "--predict"])
    return parser


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.predict is not None:
        results = predict(args.out, args.predict)
        for r in results:
            p = r["probabilities"][r["label"]]
            print(f"{r['label']} ({p:.3f}){' [truncated]' if r['truncated'] else ''}: {r['text']}")
        return {"predictions": results}
    args = cli.parse_args(parser, argv)  # now refuse (or --overwrite) an existing run
    mode = args.mode.replace("-", "_")
    lr = DEFAULT_LR[mode] if args.lr is None else args.lr
    args.lr = lr
    schedule, warmup = DEFAULT_SCHEDULE.get(mode, ("constant", 0))
    args.schedule = schedule if args.schedule is None else args.schedule
    strategy = cli.strategy(args)  # checks --batch-size against the devices and --accum-steps now

    base = load_base(args.base)
    lm_config = base.config
    lm_config = lm_config.with_dropout(0.0 if args.dropout is None else args.dropout)  # the book's 0.0
    if args.remat:
        lm_config = lm_config.replace(remat=True)
    splits, label_names, max_length, report = prepare_data(args, base.encoding, lm_config.context_limit)
    runio.record_data(args.out, files_fingerprint([report["path"]], format=args.format, labels=args.labels,
                                                  seed=args.seed), resume=args.resume,
                      accept_change=args.accept_data_change)
    for part in splits.values():
        lm_config.validate_input(part.tokens)
    truncated = {name: part.truncated for name, part in splits.items()}
    print(f"{report['sizes']} examples (balanced {report['balanced']}), max length {max_length} tokens, "
          f"truncated {truncated}")

    key_head, key_lora, key_train = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    config, params = classifier.from_lm(lm_config, base.params, len(label_names), key_head)
    apply = lambda p, tokens, key=None: config.logits(p, tokens, key=key)  # noqa: E731
    lora_cfg = None
    if mode == "lora":
        from jaxllm.nn import lora

        lora_cfg = lora.raschka(rank=args.rank, alpha=args.alpha)
        params = lora.add_lora(params, lora_cfg, key_lora)
        apply = lora.apply_with_lora(apply, lora_cfg)
    mask = trainable_mask(params, trainable_predicate(config, mode))
    loss_fn = classification_loss(apply)

    batches = ArrayBatches(splits["train"].arrays(), args.batch_size, seed=args.seed)
    total = cli.total_steps(args, batches.steps_per_epoch)
    if args.warmup_steps is None:  # the mode's warmup, at most a tenth of a short run
        args.warmup_steps = min(warmup, total // 10) if args.schedule != "constant" else 0
    opt_config = cli.optimizer_config(args, total)
    optimizer = freeze_optimizer(make_optimizer(opt_config), mask)
    evaluate = make_evaluator(loss_fn, args.eval_batch_size)
    run = run_config(config, opt_config, batch_size=args.batch_size, seed=args.seed, mode=mode,
                     base=base.source, data=report["path"], format=args.format, labels=list(label_names),
                     max_length=max_length, rank=args.rank if lora_cfg else None,
                     alpha=args.alpha if lora_cfg else None,
                     **({"dtype": args.dtype} if args.dtype != "float32" else {}))
    # frozen leaves get no gradient computed; bf16 compute when --dtype asks (evaluation stays fp32)
    train_loss = mixed_precision(stop_frozen_gradients(loss_fn, mask), args.dtype)
    train_step = strategy.train_step(train_loss, optimizer, accum_steps=args.accum_steps)
    fit_config = cli.fit_config(args, steps_per_epoch=batches.steps_per_epoch, run_config=run,
                                title=f"classifier ({mode})")
    state = fit(TrainState.create(params, optimizer, key_train), train_step, batches, fit_config, strategy=strategy,
                eval_fn=lambda p: evaluate(p, splits["val"], args.eval_batches),
                final_eval_fn=lambda p: evaluate(p, splits["val"]))

    results = {name: evaluate(state.params, part) for name, part in splits.items()}
    test_labels = splits["test"].labels
    majority = float(np.bincount(test_labels, minlength=len(label_names)).max() / len(test_labels))
    final_params = lora.merge(state.params, lora_cfg) if lora_cfg else state.params
    export(args.out, config, final_params, base.encoding,
           {"label_names": list(label_names), "max_length": max_length, "mode": mode, "base": base.source,
            "lora_merged": lora_cfg.to_dict() if lora_cfg else None})
    summary = update_json(os.path.join(args.out, "summary.json"), {
        **{f"{name}_accuracy": r["accuracy"] for name, r in results.items()},
        **{f"{name}_loss": r["loss"] for name, r in results.items()},
        "majority_baseline": majority, "trainable_params": count_params(state.params, mask),
        "total_params": count_params(state.params), "mode": mode, "base": base.source, "lr": lr,
        "truncated": truncated, "max_length": max_length, "label_names": list(label_names), "data": report,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    })
    print(f"accuracy train {summary['train_accuracy']:.4f} val {summary['val_accuracy']:.4f} test "
          f"{summary['test_accuracy']:.4f} (majority {majority:.4f}); {summary['trainable_params']:,} of "
          f"{summary['total_params']:,} parameters trained ({mode}) -> {args.out}")
    return summary
