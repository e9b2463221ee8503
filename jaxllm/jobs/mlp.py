"""An MLP (Raschka's appendix-A shape, 30 -> 20 hidden) on scikit-learn's breast-cancer data,
against a logistic-regression baseline trained the same way (same optimiser, batches, epochs).

Split 80/20 stratified with --seed; features standardised with the training split's statistics.
The MLP's run is written to --out, the baseline's to --out/baseline. ``--parallel`` and
``--accum-steps`` choose the devices and micro-batching (the same update either way).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

from jaxllm.data.tabular import breast_cancer
from jaxllm.models.linear import LogisticConfig
from jaxllm.models.mlp import MLPConfig
from jaxllm import cli, runio
from jaxllm.options import Devices, Evaluation, MultiHost, Optim, Run, option, supervised_kwargs
from jaxllm.options.values import positive_int
from jaxllm.runio import update_json
from jaxllm.training.supervised import train_supervised


@dataclasses.dataclass(frozen=True)
class MlpConfig:
    __doc__ = __doc__
    JOB: ClassVar[str] = "mlp"
    SPLIT_CPU: ClassVar[bool] = False
    hidden: tuple[int, ...] = option((30, 20), "hidden layer widths", type=positive_int, many=True, section="model")
    run: Run = Run(out="runs/mlp", epochs=30)
    optim: Optim = Optim(batch_size=32, lr=3e-3)
    evaluation: Evaluation = Evaluation()
    devices: Devices = Devices()
    hosts: MultiHost = MultiHost()


def main(argv=None) -> dict:
    cfg = cli.parse(MlpConfig, argv)
    cli.start(cfg)
    run_ = cfg.run
    train, test = breast_cancer(seed=run_.seed)
    common = dict(test=test, **supervised_kwargs(cfg, steps_per_epoch=len(train[0]) // cfg.optim.batch_size))

    mlp = MLPConfig(num_inputs=train[0].shape[1], num_outputs=2, hidden=cfg.hidden)
    run = train_supervised(mlp, train, loss="softmax", title="MLP", **common)
    baseline = os.path.join(run_.out, "baseline")
    # the run's config.yaml is the MLP's, in --out; a run stopped during the MLP has no baseline to resume
    resume_baseline = run_.resume and runio.has_checkpoints(baseline)
    base = train_supervised(LogisticConfig(num_inputs=train[0].shape[1]), train, loss="binary",
                            title="baseline", **{**common, "out_dir": baseline, "flags": None, "resume": resume_baseline})
    summary = update_json(os.path.join(run_.out, "summary.json"), {
        "test_accuracy": run.metrics["test_accuracy"],
        "train_accuracy": run.metrics["train_accuracy"],
        "baseline_test_accuracy": base.metrics["test_accuracy"],
        "baseline_train_accuracy": base.metrics["train_accuracy"],
        "test_examples": len(test[0]),
    })
    print(f"test accuracy: MLP {summary['test_accuracy']:.4f}   logistic baseline "
          f"{summary['baseline_test_accuracy']:.4f}   ({len(test[0])} held-out rows) -> {run_.out}")
    return summary
