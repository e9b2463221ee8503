"""Burkov ch. 1: logistic regression on the book's 12-example "will buy" (age, income) set.

Trains on logits (sigmoid BCE, the numerically stable form of the book's Sigmoid + BCELoss,
which saturates on these raw features) with the book's SGD lr 0.001, full batch. With raw
features the loss is badly conditioned: about 2,000 epochs are needed, hence the default 3,000.
Prints each example's score against the 0.5 threshold. Full batch: on several devices
(``--parallel``) the 12 rows must divide by the device count (``--accum-steps`` too).
"""

from __future__ import annotations

import os

import numpy as np

from jaxllm.data.tabular import will_buy
from jaxllm.models.linear import LogisticConfig, predict_proba
from jaxllm import cli
from jaxllm.runio import update_json
from jaxllm.training.supervised import train_supervised


def main(argv=None) -> dict:
    parser = cli.make_parser(__doc__, job="logreg", split_cpu=False, epochs=3000, lr=1e-3, optimizer="sgd",
                             log_every=100, precision=False, evaluation=False)  # no held-out set
    args = cli.parse_args(parser, argv)
    x, y = will_buy()
    config = LogisticConfig(num_inputs=2)
    steps_per_epoch = len(x) // (args.batch_size or len(x))
    run = train_supervised(
        config, (x, y), loss="binary", optimizer=cli.optimizer_config(args, cli.total_steps(args, steps_per_epoch)),
        out_dir=args.out, batch_size=args.batch_size, seed=args.seed, title="logistic regression",
        **cli.parallel_kwargs(args), **cli.length_kwargs(args), **cli.fit_kwargs(args),
    )
    probs = np.asarray(predict_proba(config.apply(run.params, x)))
    print(f"{'age':>4} {'income':>6}  label  P(buy)  prediction")
    for (age, income), label, p in zip(x, y, probs):
        pred = int(p > 0.5)
        print(f"{age:4.0f} {income:6.0f}  {label:5d}  {p:6.3f}  {pred} {'ok' if pred == label else 'WRONG'}")
    summary = update_json(os.path.join(args.out, "summary.json"), {
        "accuracy": run.metrics["train_accuracy"],
        "final_loss": run.metrics["train_loss"],
        "probabilities": probs.round(6).tolist(),
    })
    print(f"accuracy {summary['accuracy']:.3f}  loss {summary['final_loss']:.4f}  -> {args.out}")
    return summary
