import jax
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
    ({"lr": 0.0, "weight_decay": 0.0}, "lr and muon_lr must be > 0"),
    ({"name": "muon", "muon_lr": 0.0, "weight_decay": 0.0}, "lr and muon_lr must be > 0"),
    ({"name": "muon"}, "muon needs weight_decay passed explicitly"),
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


def test_wsd_schedule_warms_up_holds_and_decays_over_the_last_fraction():
    cfg = OptimizerConfig("sgd", lr=0.1, schedule="wsd", warmup_steps=10, total_steps=110, min_lr=0.01,
                          decay_fraction=0.2)  # decay: the last 22 steps, from step 88
    lr = make_schedule(cfg)
    assert cfg.decay_steps == 22
    np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 50, 88)], [0.0, 0.05, 0.1, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(float(lr(99)), 0.1 - 0.09 * 11 / 22, rtol=1e-6)
    np.testing.assert_allclose(float(lr(110)), 0.01, rtol=1e-6)
    # a longer run trains every step before its decay at the same rate
    longer = make_schedule(OptimizerConfig("sgd", lr=0.1, schedule="wsd", warmup_steps=10, total_steps=220,
                                           min_lr=0.01, decay_fraction=0.2))
    assert [float(longer(s)) for s in range(88)] == [float(lr(s)) for s in range(88)]


@pytest.mark.parametrize("kwargs, match", [
    ({"total_steps": None}, "the wsd schedule needs total_steps"),
    ({"decay_fraction": 0.0}, r"decay_fraction must lie in \(0, 1\], got 0.0"),
    ({"decay_fraction": 0.5, "warmup_steps": 6}, r"wsd's warmup \(6 steps\) and decay \(5 steps, decay_fraction "
                                                 r"0.5\) overlap in a run of 10 steps"),
])
def test_bad_wsd_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**{"name": "sgd", "schedule": "wsd", "total_steps": 10, **kwargs})


def test_global_norm_clipping():
    opt = make_optimizer(OptimizerConfig("sgd", lr=1.0, clip_norm=1.0))
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # norm 5
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["a"]), [-0.6, 0.0], rtol=1e-6)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    """Only 2-D params under ``muon_blocks`` get Muon's orthogonalised step (its momentum buffer);
    a block's vector and everything outside the blocks get AdamW's (mu and nu)."""
    from jaxllm.training.optim import orthogonalize

    params = {"embedding": jnp.ones((5, 4)), "layers_0": {"W": jnp.ones((4, 6)), "scale": jnp.ones(4)},
              "output": jnp.ones((4, 5))}
    opt = make_optimizer(OptimizerConfig("muon", lr=1e-3, weight_decay=0.0, muon_blocks=["layers_0"]))
    state = opt.init(params)
    muon_state, adamw_state = state.inner_states["muon"], state.inner_states["adamw"]
    muon_leaves = [x for x in jax.tree_util.tree_leaves(muon_state) if getattr(x, "ndim", 0) == 2]
    assert [x.shape for x in muon_leaves] == [(4, 6)]  # the one block matrix
    adam_mu = adamw_state.inner_state[0].mu
    assert adam_mu["embedding"].shape == (5, 4) and adam_mu["output"].shape == (4, 5)
    assert adam_mu["layers_0"]["scale"].shape == (4,)
    # the direction is orthogonal-ish: singular values of NS(G) lie near 1 (0.5-1.5 by design)
    g = jax.random.normal(jax.random.PRNGKey(0), (16, 48))
    s = np.linalg.svd(np.asarray(orthogonalize(g)), compute_uv=False)
    assert 0.5 < s.min() and s.max() < 1.5
    np.testing.assert_allclose(np.asarray(orthogonalize(g.T)), np.asarray(orthogonalize(g)).T, rtol=1e-5, atol=1e-6)
