"""Supervised training glue: validate arrays, build the loss, run ``fit``, score accuracy.

Shared by the regression and classification scripts so each script stays a thin CLI.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxllm.data.batches import ArrayBatches
from jaxllm.training.losses import LOSSES
from jaxllm.training.checkpoint import run_config
from jaxllm.training.loop import FitConfig, fit
from jaxllm.training.optim import OptimizerConfig, make_optimizer
from jaxllm.training.parallel import Strategy, make_strategy
from jaxllm.training.state import TrainState
from jaxllm.training.step import evaluate, make_eval_step
from jaxllm.validate import check_labels, check_targets


def validate_arrays(config, x, y, loss: str) -> dict[str, np.ndarray]:
    """Check inputs against the model and targets against the loss; returns the batch dict."""
    x = config.validate_input(x)
    if loss == "mse":
        y = check_targets(y, config.num_outputs, batch=len(x))
    else:
        y = check_labels(y, config.num_classes, batch=len(x))
    return {"x": x, "y": y}


@dataclasses.dataclass
class Run:
    """What ``train_supervised`` returns: final params and the metrics it measured."""

    params: Any
    state: TrainState
    metrics: dict[str, float]


def train_supervised(config, train, *, loss: str, optimizer: OptimizerConfig, out_dir: str,
                     batch_size: int | None = None, epochs: int | None = None, steps: int | None = None,
                     seed: int = 0, test=None, strategy: Strategy | None = None, accum_steps: int = 1,
                     **fit_kwargs) -> Run:
    """Train ``config``'s model on ``train = (x, y)``; evaluate on ``test = (x, y)`` if given.

    ``batch_size=None`` is full-batch gradient descent. ``strategy`` (default single device) and
    ``accum_steps`` choose how each step runs (``jaxllm.training.parallel``); evaluation runs on
    one device with the gathered params. Returns params and ``{"train_loss",
    "train_accuracy", "test_loss", "test_accuracy"}`` (accuracies only for classifiers).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    train_arrays = validate_arrays(config, *train, loss)
    test_arrays = validate_arrays(config, *test, loss) if test is not None else None
    loss_fn = LOSSES[loss](config.apply)
    opt = make_optimizer(optimizer)
    state = TrainState.create(config.init(jax.random.PRNGKey(seed)), opt, jax.random.PRNGKey(seed + 1))
    data = ArrayBatches(train_arrays, batch_size or len(train_arrays["x"]), shuffle=batch_size is not None, seed=seed)
    eval_step = make_eval_step(loss_fn)
    eval_data = ArrayBatches(test_arrays, min(1024, len(test_arrays["x"])), shuffle=False) if test_arrays else None
    eval_fn = (lambda params: evaluate(eval_step, params, eval_data)) if eval_data else None
    strategy = strategy or make_strategy("single")
    train_step = strategy.train_step(loss_fn, opt, accum_steps=accum_steps)
    fit_config = FitConfig(out_dir=out_dir, epochs=epochs, steps=steps, **fit_kwargs,
                           run_config=run_config(config, optimizer, batch_size=data.batch_size, seed=seed))
    state = fit(state, train_step, data, fit_config, strategy=strategy, eval_fn=eval_fn)
    train_eval = ArrayBatches(train_arrays, min(1024, len(train_arrays["x"])), shuffle=False)
    metrics = {f"train_{k}": v for k, v in evaluate(eval_step, state.params, train_eval).items()}
    if eval_data:
        metrics.update({f"test_{k}": v for k, v in evaluate(eval_step, state.params, eval_data).items()})
    return Run(params=state.params, state=state, metrics=metrics)
