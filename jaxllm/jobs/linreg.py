"""The fundamentals' linear regression: y = 2x + 1 + 0.1 noise on 10 points x ~ N(0, 1).

Trained twice from the same initial weights: by hand (the five steps with ``jax.grad`` and a
manual update) and with optax through the shared ``fit()`` loop. The book's lr 0.01 for 100
epochs only moves W toward 2; lr 0.1 gets there, hence the default.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxllm.data.tabular import linear_toy
from jaxllm.models.linear import LinearConfig
from jaxllm import cli
from jaxllm.training.by_hand import fit_by_hand
from jaxllm.runio import update_json
from jaxllm.training.supervised import train_supervised


def main(argv=None) -> dict:
    # one device, no held-out set: no device flags, no --eval-every
    parser = cli.make_parser(__doc__, job="linreg", parallel=False, evaluation=False, epochs=100, lr=0.1,
                             optimizer="sgd")
    parser.group("data").add_argument("--points", type=cli.positive_int, default=10, help="number of (x, y) points")
    args = cli.parse_args(parser, argv)
    x, y = linear_toy(args.points, seed=args.seed)
    config = LinearConfig(num_inputs=1, num_outputs=1)
    init = config.init(jax.random.PRNGKey(args.seed))

    by_hand_epochs = args.steps if args.steps is not None else args.epochs  # full batch: a step is an epoch
    W, b, losses = fit_by_hand(x, y, init["kernel"], init["bias"], lr=args.lr, epochs=by_hand_epochs)
    print(f"by hand:   W = {float(W[0, 0]):.4f}  b = {float(b[0]):.4f}  loss {losses[-1]:.5f}")

    steps_per_epoch = len(x) // (args.batch_size or len(x))
    run = train_supervised(
        config, (x, y), loss="mse", optimizer=cli.optimizer_config(args, cli.total_steps(args, steps_per_epoch)),
        out_dir=args.out, batch_size=args.batch_size, seed=args.seed, title="linear regression",
        **cli.length_kwargs(args), **cli.fit_kwargs(args),
    )
    W_opt, b_opt = float(np.asarray(run.params["kernel"])[0, 0]), float(np.asarray(run.params["bias"])[0])
    print(f"optax fit: W = {W_opt:.4f}  b = {b_opt:.4f}  loss {run.metrics['train_loss']:.5f}  (true W = 2, b = 1)")
    return update_json(os.path.join(args.out, "summary.json"), {
        "W": W_opt, "b": b_opt, "final_loss": run.metrics["train_loss"],
        "by_hand": {"W": float(W[0, 0]), "b": float(b[0]), "final_loss": losses[-1]},
    })
