import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.training import OptimizerConfig, make_optimizer, make_schedule


def test_adamw_requires_explicit_weight_decay():
    with pytest.raises(ValueError, match="weight_decay passed explicitly"):
        OptimizerConfig("adamw", lr=1e-3)
    assert make_optimizer(OptimizerConfig("adamw", lr=1e-3, weight_decay=0.0))


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "lion", "weight_decay": 0.0}, "optimizer must be one of"),
    ({"schedule": "step", "weight_decay": 0.0}, "schedule must be one of"),
    ({"lr": 0.0, "weight_decay": 0.0}, "lr must be > 0"),
    ({"schedule": "warmup_cosine", "weight_decay": 0.0}, "needs total_steps"),
    ({"warmup_steps": 20, "total_steps": 10, "weight_decay": 0.0}, "exceeds total_steps"),
    # optax's cosine needs a step after the warmup: refused here, in our words, not in optax's
    ({"schedule": "warmup_cosine", "warmup_steps": 10, "total_steps": 10, "weight_decay": 0.0},
     r"warmup_cosine needs warmup_steps \(10\) < total_steps \(10\)"),
    ({"warmup_steps": -1, "weight_decay": 0.0}, "warmup_steps must be >= 0"),
    ({"clip_norm": 0.0, "weight_decay": 0.0}, "clip_norm must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay and momentum must be >= 0"),
])
def test_bad_optimizer_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)


def test_warmup_cosine_schedule():
    cfg = OptimizerConfig("sgd", lr=0.1, schedule="warmup_cosine", warmup_steps=10, total_steps=110, min_lr=0.01)
    lr = make_schedule(cfg)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 0.05, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 0.01 + 0.5 * (0.1 - 0.01), rtol=1e-5)
    np.testing.assert_allclose(float(lr(110)), 0.01, rtol=1e-6)


def test_global_norm_clipping():
    opt = make_optimizer(OptimizerConfig("sgd", lr=1.0, clip_norm=1.0))
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # norm 5
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["a"]), [-0.6, 0.0], rtol=1e-6)
