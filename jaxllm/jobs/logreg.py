"""Burkov ch. 1: logistic regression on the book's 12-example "will buy" (age, income) set.

Trains on logits (sigmoid BCE, the numerically stable form of the book's Sigmoid + BCELoss,
which saturates on these raw features) with the book's SGD lr 0.001, full batch. With raw
features the loss is badly conditioned: about 2,000 epochs are needed, hence the default 3,000.
Prints each example's score against the 0.5 threshold. Full batch: on several devices
(``--parallel``) the 12 rows must divide by the device count (``--accum-steps`` too).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import numpy as np

from jaxllm.data.tabular import will_buy
from jaxllm.models.linear import LogisticConfig, predict_proba
from jaxllm import cli
from jaxllm.options import Devices, MultiHost, Optim, Run, supervised_kwargs
from jaxllm.runio import update_json
from jaxllm.training.supervised import train_supervised


@dataclasses.dataclass(frozen=True)
class LogregConfig:  # no held-out set: no evaluation flags
    __doc__ = __doc__
    JOB: ClassVar[str] = "logreg"
    SPLIT_CPU: ClassVar[bool] = False
    HELP: ClassVar[dict] = {"batch_size": "rows per step (default: full batch)"}
    run: Run = Run(out="runs/logreg", epochs=3000, log_every=100)
    optim: Optim = Optim(optimizer="sgd", lr=1e-3)
    devices: Devices = Devices()
    hosts: MultiHost = MultiHost()


def main(argv=None) -> dict:
    cfg = cli.parse(LogregConfig, argv)
    cli.start(cfg)
    x, y = will_buy()
    config = LogisticConfig(num_inputs=2)
    steps_per_epoch = len(x) // (cfg.optim.batch_size or len(x))
    run = train_supervised(config, (x, y), loss="binary", title="logistic regression",
                           **supervised_kwargs(cfg, steps_per_epoch=steps_per_epoch))
    probs = np.asarray(predict_proba(config.apply(run.params, x)))
    print(f"{'age':>4} {'income':>6}  label  P(buy)  prediction")
    for (age, income), label, p in zip(x, y, probs):
        pred = int(p > 0.5)
        print(f"{age:4.0f} {income:6.0f}  {label:5d}  {p:6.3f}  {pred} {'ok' if pred == label else 'WRONG'}")
    summary = update_json(os.path.join(cfg.run.out, "summary.json"), {
        "accuracy": run.metrics["train_accuracy"],
        "final_loss": run.metrics["train_loss"],
        "probabilities": probs.round(6).tolist(),
    })
    print(f"accuracy {summary['accuracy']:.3f}  loss {summary['final_loss']:.4f}  -> {cfg.run.out}")
    return summary
