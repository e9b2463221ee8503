"""The Flax models and their PyTorch twins compute the same thing: outputs, gradients, and
10-step optimiser trajectories under SGD (with momentum) and AdamW, for every family so far."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxllm import interop
from jaxllm.models import cnn, linear, mlp
from jaxllm.torch_ref import cnn as t_cnn, linear as t_linear, mlp as t_mlp
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step
from jaxllm.training.losses import LOSSES
from parity import GRAD, OUTPUT, TRAJECTORY, assert_close, assert_same_tensors, to_numpy_state, torch_grads

pytestmark = pytest.mark.optimized  # parity: compiled as users run it (see conftest.py)

TORCH_LOSSES = {
    "softmax": lambda out, y: torch.nn.functional.cross_entropy(out, y.long()),
    "binary": lambda out, y: torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], y.float()),
    "mse": lambda out, y: torch.nn.functional.mse_loss(out, y),
}


@dataclasses.dataclass
class Family:
    config: object
    make_twin: Callable[[], torch.nn.Module]   # returns a module that outputs what the Flax model does
    loss: str
    make_batch: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def features(n_in, n_classes=None, n_out=None):
    def make(rng, n):
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        y = rng.integers(0, n_classes, n).astype(np.int32) if n_classes else rng.standard_normal((n, n_out)).astype(np.float32)
        return x, y
    return make


def images(size):
    def make(rng, n):
        return rng.random((n, size, size)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)
    return make


FAMILIES = {
    "linear": Family(linear.LinearConfig(3, 2), lambda: t_linear.linear_regression(3, 2), "mse", features(3, n_out=2)),
    "logistic": Family(linear.LogisticConfig(2), lambda: t_linear.logistic_regression(2)[:-1], "binary", features(2, 2)),
    "mlp_raschka": Family(mlp.raschka_appendix_a(5, 3), lambda: t_mlp.NeuralNetwork(5, 3), "softmax", features(5, 3)),
    "mlp_burkov": Family(mlp.burkov_two_layer(2), lambda: t_mlp.two_layer_sigmoid_net(2)[:-1], "binary", features(2, 2)),
    "cnn_8x8": Family(cnn.CNNConfig(8, (4, 8), 16, 10), lambda: t_cnn.ConvNet(8, (4, 8), 16, 10), "softmax", images(8)),
    "cnn_28x28": Family(cnn.CNNConfig(28, (4, 8), 16, 10), lambda: t_cnn.ConvNet(28, (4, 8), 16, 10), "softmax", images(28)),
}


def twin_and_params(family: Family, seed=0):
    torch.manual_seed(seed)
    twin = family.make_twin()
    return twin, interop.from_torch(family.config, twin.state_dict())


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_and_gradients_match(name):
    family = FAMILIES[name]
    twin, params = twin_and_params(family)
    x, y = family.make_batch(np.random.default_rng(1), 6)

    out_jax = family.config.apply(params, jnp.asarray(x))
    out_torch = twin(torch.from_numpy(x))
    assert_close(out_jax, out_torch.detach().numpy(), OUTPUT, err_msg=f"{name} outputs")

    loss_fn = LOSSES[family.loss](family.config.apply)
    (loss_jax, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, {"x": x, "y": y}, None)
    loss_torch = TORCH_LOSSES[family.loss](out_torch, torch.from_numpy(y))
    loss_torch.backward()
    assert_close(float(loss_jax), loss_torch.item(), OUTPUT, err_msg=f"{name} loss")
    assert_same_tensors(grads, torch_grads(twin), GRAD, what=f"{name} gradients")


OPTIMIZERS = {
    "sgd_momentum": (OptimizerConfig("sgd", lr=0.05, momentum=0.9),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "sgd_l2": (OptimizerConfig("sgd", lr=0.05, weight_decay=0.01),
               lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.01)),
    "adam": (OptimizerConfig("adam", lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
    "adamw": (OptimizerConfig("adamw", lr=1e-3, weight_decay=0.1),
              lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1)),
}

def torch_adamw_warmup_cosine_clipped(params):
    """torch's AdamW + LambdaLR (warmup 3, cosine to 0 at step 10) + clip_grad_norm_(0.5)."""
    import math

    params = list(params)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    lam = lambda t: t / 3 if t < 3 else 0.5 * (1 + math.cos(math.pi * (t - 3) / 7))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)

    class Stepper:
        def zero_grad(self):
            opt.zero_grad()

        def step(self):
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            sched.step()

    return Stepper()


OPTIMIZERS["adamw_warmup_cosine_clip"] = (
    OptimizerConfig("adamw", lr=1e-3, weight_decay=0.1, schedule="warmup_cosine", warmup_steps=3, total_steps=10,
                    clip_norm=0.5),
    torch_adamw_warmup_cosine_clipped,
)



def torch_sgd_wsd(params):
    """torch's SGD (momentum 0.9) + LambdaLR as wsd is defined: warmup 2 steps from 0, stable, then a
    linear decay to 0 over the last 20 % of the 10 steps (steps 8 and 9)."""
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: t / 2 if t < 2 else 1.0 if t < 8 else 1 - (t - 8) / 2)

    class Stepper:
        def zero_grad(self):
            opt.zero_grad()

        def step(self):
            opt.step()
            sched.step()

    return Stepper()


OPTIMIZERS["sgd_momentum_wsd"] = (
    OptimizerConfig("sgd", lr=0.05, momentum=0.9, schedule="wsd", warmup_steps=2, total_steps=10, decay_fraction=0.2),
    torch_sgd_wsd,
)

TRAJECTORY_CASES = [(f, o) for f in FAMILIES for o in ("sgd_momentum", "adamw")] + [
    ("mlp_raschka", "sgd_l2"), ("mlp_raschka", "adam"), ("mlp_raschka", "adamw_warmup_cosine_clip"),
    ("cnn_8x8", "adamw_warmup_cosine_clip"), ("mlp_raschka", "sgd_momentum_wsd")]


@pytest.mark.parametrize("name,opt_name", TRAJECTORY_CASES)
def test_ten_step_trajectory_matches(name, opt_name):
    family = FAMILIES[name]
    opt_cfg, make_torch_opt = OPTIMIZERS[opt_name]
    twin, params = twin_and_params(family, seed=3)
    rng = np.random.default_rng(4)
    batches = [family.make_batch(rng, 8) for _ in range(10)]

    optimizer = make_optimizer(opt_cfg)
    step = make_train_step(LOSSES[family.loss](family.config.apply), optimizer)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(0))
    jax_losses = []
    for x, y in batches:
        state, metrics = step(state, {"x": x, "y": y})
        jax_losses.append(float(metrics["loss"]))

    torch_opt = make_torch_opt(twin.parameters())
    torch_losses = []
    for x, y in batches:
        torch_opt.zero_grad()
        loss = TORCH_LOSSES[family.loss](twin(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        torch_opt.step()
        torch_losses.append(loss.item())

    assert_close(jax_losses, torch_losses, TRAJECTORY, err_msg=f"{name}/{opt_name} losses over 10 steps")
    assert_same_tensors(state.params, to_numpy_state(twin), TRAJECTORY, what=f"{name}/{opt_name} params after 10 steps")


def test_logistic_probabilities_match_the_books_sigmoid_model():
    torch.manual_seed(0)
    book_model = t_linear.logistic_regression(2)  # nn.Sequential(Linear, Sigmoid), as printed
    params = interop.from_torch(linear.LogisticConfig(2), book_model.state_dict())
    x = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32) * 30
    probs = linear.predict_proba(linear.LogisticConfig(2).apply(params, x))
    assert_close(probs, book_model(torch.from_numpy(x))[:, 0].detach().numpy(), OUTPUT,
                 err_msg="logistic probabilities")


def test_five_steps_by_hand_match():
    from jaxllm.data.tabular import linear_toy
    from jaxllm.training.by_hand import fit_by_hand

    x, y = linear_toy(10, seed=0)
    W0, b0 = np.array([[-0.3]], np.float32), np.array([0.2], np.float32)
    W_j, b_j, losses_j = fit_by_hand(x, y, W0, b0, lr=0.05, epochs=30)
    W_t, b_t, losses_t = t_linear.fit_by_hand(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(W0),
                                              torch.from_numpy(b0), lr=0.05, epochs=30)
    assert_close(losses_j, losses_t, TRAJECTORY, err_msg="by-hand losses over 30 epochs")
    assert_close(W_j, W_t.numpy(), TRAJECTORY, err_msg="by-hand W after 30 epochs")
    assert_close(b_j, b_t.numpy(), TRAJECTORY, err_msg="by-hand b after 30 epochs")
    assert losses_j[-1] < 0.1 * losses_j[0]
