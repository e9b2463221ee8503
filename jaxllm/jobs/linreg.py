"""The fundamentals' linear regression: y = 2x + 1 + 0.1 noise on 10 points x ~ N(0, 1).

Trained twice from the same initial weights: by hand (the five steps with ``jax.grad`` and a
manual update) and with optax through the shared ``fit()`` loop. The book's lr 0.01 for 100
epochs only moves W toward 2; lr 0.1 gets there, hence the default.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax
import numpy as np

from jaxllm.data.tabular import linear_toy
from jaxllm.models.linear import LinearConfig
from jaxllm import cli
from jaxllm.options import MultiHost, Optim, Run, option, supervised_kwargs
from jaxllm.options.values import positive_int
from jaxllm.training.by_hand import fit_by_hand
from jaxllm.runio import update_json
from jaxllm.training.supervised import train_supervised


@dataclasses.dataclass(frozen=True)
class LinregConfig:  # one device, no held-out set: no device flags, no --eval-every
    __doc__ = __doc__
    JOB: ClassVar[str] = "linreg"
    HELP: ClassVar[dict] = {"batch_size": "rows per step (default: full batch)"}
    points: int = option(10, "number of (x, y) points", type=positive_int, section="data")
    run: Run = Run(out="runs/linreg", epochs=100)
    optim: Optim = Optim(optimizer="sgd", lr=0.1)
    hosts: MultiHost = MultiHost()


def main(argv=None) -> dict:
    cfg = cli.parse(LinregConfig, argv)
    cli.start(cfg)
    run_, optim = cfg.run, cfg.optim
    x, y = linear_toy(cfg.points, seed=run_.seed)
    config = LinearConfig(num_inputs=1, num_outputs=1)
    init = config.init(jax.random.PRNGKey(run_.seed))

    by_hand_epochs = run_.total_steps(1)  # full batch: a step is an epoch
    W, b, losses = fit_by_hand(x, y, init["kernel"], init["bias"], lr=optim.lr, epochs=by_hand_epochs)
    print(f"by hand:   W = {float(W[0, 0]):.4f}  b = {float(b[0]):.4f}  loss {losses[-1]:.5f}")

    steps_per_epoch = len(x) // (optim.batch_size or len(x))
    run = train_supervised(config, (x, y), loss="mse", title="linear regression",
                           **supervised_kwargs(cfg, steps_per_epoch=steps_per_epoch))
    W_opt, b_opt = float(np.asarray(run.params["kernel"])[0, 0]), float(np.asarray(run.params["bias"])[0])
    print(f"optax fit: W = {W_opt:.4f}  b = {b_opt:.4f}  loss {run.metrics['train_loss']:.5f}  (true W = 2, b = 1)")
    return update_json(os.path.join(run_.out, "summary.json"), {
        "W": W_opt, "b": b_opt, "final_loss": run.metrics["train_loss"],
        "by_hand": {"W": float(W[0, 0]), "b": float(b[0]), "final_loss": losses[-1]},
    })
