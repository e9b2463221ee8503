"""Freezing: masks by path, an optimiser with no state for frozen leaves that trains the rest
exactly as the plain optimiser would, stopped gradients, parameter counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.training.freeze import (count_params, freeze_optimizer, path_str, stop_frozen_gradients,
                                    trainable_mask)


def params_tree():
    rng = np.random.default_rng(0)
    return {"enc": {"layers_0": {"kernel": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
                                 "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}},
            "head": {"kernel": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}


def head_only(params):
    return trainable_mask(params, lambda p: p.startswith("head/"))


def test_path_str_and_mask():
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [{"k": 1}, 2], "b": (3,)})[0]]
    assert paths == ["a/0/k", "a/1", "b/0"]
    mask = head_only(params_tree())
    assert mask == {"enc": {"layers_0": {"kernel": False, "bias": False}}, "head": {"kernel": True, "bias": True}}


def test_count_params():
    params = params_tree()
    assert count_params(params) == 15 + 5 + 10 + 2
    assert count_params(params, head_only(params)) == 12
    shapes = jax.eval_shape(lambda: params_tree())
    assert count_params(shapes) == 32 and count_params(shapes, head_only(shapes)) == 12


def test_frozen_leaves_have_no_state_and_never_move():
    params = params_tree()
    adamw = optax.adamw(1e-2, weight_decay=0.1)
    optimizer = freeze_optimizer(adamw, head_only(params))
    state = optimizer.init(params)
    shapes = sorted(np.shape(leaf) for leaf in jax.tree_util.tree_leaves(state) if np.ndim(leaf) > 0)
    assert shapes == [(2,), (2,), (5, 2), (5, 2)]  # Adam's mu and nu for the head only

    # The head follows plain AdamW run on the head alone; the encoder stays bit-for-bit.
    head, head_state = params["head"], adamw.init(params["head"])
    rng = np.random.default_rng(1)
    for _ in range(3):
        grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        head_updates, head_state = adamw.update(grads["head"], head_state, head)
        head = optax.apply_updates(head, head_updates)
    original = params_tree()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["enc"], original["enc"])
    # the same AdamW operations on the same leaves (bit-identical here): tighter than TRAJECTORY
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params["head"], head)
    assert not np.allclose(params["head"]["kernel"], original["head"]["kernel"])


def test_mask_function_and_nothing_trainable():
    params = params_tree()
    optimizer = freeze_optimizer(optax.sgd(0.1), head_only)  # a function of the params works too
    updates, _ = optimizer.update(jax.tree_util.tree_map(jnp.ones_like, params), optimizer.init(params), params)
    assert float(jnp.abs(updates["enc"]["layers_0"]["kernel"]).max()) == 0.0
    np.testing.assert_allclose(updates["head"]["bias"], -0.1)
    with pytest.raises(ValueError, match="nothing would be trained"):
        freeze_optimizer(optax.sgd(0.1), trainable_mask(params, lambda p: False))


def test_stop_frozen_gradients():
    params = params_tree()
    x = jnp.ones((4, 3))

    def loss_fn(p, batch, key):
        h = jnp.tanh(batch @ p["enc"]["layers_0"]["kernel"] + p["enc"]["layers_0"]["bias"])
        return jnp.sum((h @ p["head"]["kernel"] + p["head"]["bias"]) ** 2), {}

    full = jax.grad(lambda p: loss_fn(p, x, None)[0])(params)
    stopped = jax.grad(lambda p: stop_frozen_gradients(loss_fn, head_only(params))(p, x, None)[0])(params)
    assert float(jnp.abs(full["enc"]["layers_0"]["kernel"]).max()) > 0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(stopped["enc"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, stopped["head"], full["head"])
