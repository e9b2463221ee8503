"""An MLP (Raschka's appendix-A shape, 30 -> 20 hidden) on scikit-learn's breast-cancer data,
against a logistic-regression baseline trained the same way (same optimiser, batches, epochs).

Split 80/20 stratified with --seed; features standardised with the training split's statistics.
The MLP's run is written to --out, the baseline's to --out/baseline. ``--parallel`` and
``--accum-steps`` choose the devices and micro-batching (the same update either way).
"""

from __future__ import annotations

import os

from jaxllm.data.tabular import breast_cancer
from jaxllm.models.linear import LogisticConfig
from jaxllm.models.mlp import MLPConfig
from jaxllm import cli, runio
from jaxllm.runio import update_json
from jaxllm.training.supervised import train_supervised


def main(argv=None) -> dict:
    parser = cli.make_parser(__doc__, job="mlp", split_cpu=False, epochs=30, lr=3e-3, batch_size=32, precision=False)
    parser.group("model").add_argument("--hidden", type=cli.positive_int, nargs="+", default=[30, 20],
                                       help="hidden layer widths")
    args = cli.parse_args(parser, argv)
    train, test = breast_cancer(seed=args.seed)
    steps_per_epoch = len(train[0]) // args.batch_size
    optimizer = cli.optimizer_config(args, cli.total_steps(args, steps_per_epoch))
    common = dict(optimizer=optimizer, batch_size=args.batch_size, seed=args.seed, test=test,
                  **cli.parallel_kwargs(args), **cli.length_kwargs(args),
                  **cli.fit_kwargs(args, steps_per_epoch=steps_per_epoch))

    mlp = MLPConfig(num_inputs=train[0].shape[1], num_outputs=2, hidden=tuple(args.hidden))
    run = train_supervised(mlp, train, loss="softmax", out_dir=args.out, title="MLP", **common)
    baseline = os.path.join(args.out, "baseline")
    # the run's config.yaml is the MLP's, in --out; a run stopped during the MLP has no baseline to resume
    resume_baseline = args.resume and runio.has_checkpoints(baseline)
    base = train_supervised(LogisticConfig(num_inputs=train[0].shape[1]), train, loss="binary", out_dir=baseline,
                            title="baseline", **{**common, "flags": None, "resume": resume_baseline})
    summary = update_json(os.path.join(args.out, "summary.json"), {
        "test_accuracy": run.metrics["test_accuracy"],
        "train_accuracy": run.metrics["train_accuracy"],
        "baseline_test_accuracy": base.metrics["test_accuracy"],
        "baseline_train_accuracy": base.metrics["train_accuracy"],
        "test_examples": len(test[0]),
    })
    print(f"test accuracy: MLP {summary['test_accuracy']:.4f}   logistic baseline "
          f"{summary['baseline_test_accuracy']:.4f}   ({len(test[0])} held-out rows) -> {args.out}")
    return summary
