"""Gradient accumulation: k micro-batches give the update of one k-times larger batch.

Masked token means (padding, instruction tuning) are weighted by their token counts, so the
result is the mean over every counted token of the whole batch, not a mean of micro-batch means.
The GPT-2 / decoder runs come from tests/multidevice.py (shared with test_parallel.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multidevice
from jaxllm.models.mlp import MLPConfig
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_strategy, make_train_step
from jaxllm.training.losses import mean_squared_error
from jaxllm.training.step import evaluate, finish_sums, split_micro_batches, weighted_sums
from parity import TRAJECTORY, assert_close


@pytest.fixture
def results(multidevice_results):
    return multidevice_results


def model_params(arrays, prefix):
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


@pytest.mark.parametrize("model", list(multidevice.RUNS))
@pytest.mark.parametrize("data", ["padded", "unpadded"])
def test_four_micro_batches_equal_one_big_batch(results, model, data):
    arrays, _ = results
    suffix = "" if data == "padded" else "/unpadded"
    one, four = f"{model}/single/1{suffix}", f"{model}/single/4{suffix}"
    assert_close(arrays[f"{four}/losses"], arrays[f"{one}/losses"], TRAJECTORY, err_msg=f"{four} losses")
    want = model_params(arrays, f"{one}/params")
    got = model_params(arrays, f"{four}/params")
    assert want and set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], TRAJECTORY, err_msg=f"{four} params {name}")


@pytest.mark.parametrize("model", list(multidevice.RUNS))
def test_padding_makes_a_mean_of_means_wrong(results, model):
    """The padded test above can fail: averaging the micro-batches' means misses by far more
    than its tolerance (by 45x / 90x here: 0.5% / 1% of the loss)."""
    arrays, _ = results
    whole, naive = float(arrays[f"{model}/whole_batch_loss"]), float(arrays[f"{model}/mean_of_micro_means"])
    assert abs(naive - whole) > 10 * (TRAJECTORY.rtol * whole + TRAJECTORY.atol * whole)  # a loss's bound


# --- in this process -------------------------------------------------------------------------

def test_split_micro_batches_keeps_every_row_once_and_shards_local():
    rows = np.arange(16)
    micro = np.asarray(split_micro_batches({"r": rows}, 4)["r"])
    assert micro.shape == (4, 4) and sorted(micro.ravel()) == list(rows)
    assert micro[1].tolist() == [4, 5, 6, 7]  # one device: contiguous slices
    sharded = np.asarray(split_micro_batches({"r": rows}, 2, shards=4)["r"])  # device d holds 4d..4d+3
    assert sharded.shape == (2, 8) and sorted(sharded.ravel()) == list(rows)
    for piece in sharded:  # each micro-batch takes 2 rows from every device, in device order
        assert [r // 4 for r in piece] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_regression_loss_without_a_count_is_weighted_by_rows():
    config = MLPConfig(num_inputs=3, num_outputs=2, hidden=(5,))
    loss_fn = mean_squared_error(config.apply)
    optimizer = make_optimizer(OptimizerConfig("sgd", lr=0.1, momentum=0.9))
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((12, 3)).astype(np.float32), "y": rng.standard_normal((12, 2)).astype(np.float32)}
            for _ in range(3)]
    start = TrainState.create(config.init(jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))
    finals = {}
    for k in (1, 3):
        state = jax.tree_util.tree_map(jnp.array, start)  # a copy: the step donates its input
        step = make_train_step(loss_fn, optimizer, accum_steps=k)
        losses = []
        for batch in data:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        finals[k] = (losses, jax.tree_util.tree_leaves(state.params))
    assert_close(finals[3][0], finals[1][0], TRAJECTORY, err_msg="losses, 3 micro-batches vs 1")
    for i, (a, b) in enumerate(zip(finals[3][1], finals[1][1])):
        assert_close(a, b, TRAJECTORY, err_msg=f"param leaf {i}, 3 micro-batches vs 1")


def test_weighted_sums_use_the_loss_count():
    def loss_fn(params, batch, key):  # mean of x*w over the rows where mask is 1
        mask = batch["mask"]
        count = mask.sum()
        return (batch["x"] * params["w"] * mask).sum() / jnp.maximum(count, 1.0), {"targets": count, "acc": count / 10}

    params = {"w": jnp.float32(2.0)}
    pieces = [{"x": jnp.array([1.0, 2.0, 3.0]), "mask": jnp.array([1.0, 1.0, 1.0])},
              {"x": jnp.array([5.0, 7.0, 9.0]), "mask": jnp.array([1.0, 0.0, 0.0])}]
    sums = [weighted_sums(loss_fn, params, p, None) for p in pieces]
    total = finish_sums(jax.tree_util.tree_map(lambda a, b: a + b, *sums))
    # whole batch: (1+2+3+5) * 2 / 4 tokens = 5.5; the mean of the two means would be (4 + 10) / 2 = 7
    assert float(total["loss"]) == pytest.approx(5.5)
    assert float(total["grads"]["w"]) == pytest.approx(11 / 4)
    assert float(total["aux"]["targets"]) == 4.0  # summed, not averaged
    assert float(total["aux"]["acc"]) == pytest.approx((3 * 0.3 + 1 * 0.1) / 4)
    empty = finish_sums({"count": jnp.float32(0), "loss": jnp.float32(0), "aux": {}})
    assert float(empty["loss"]) == 0.0  # nothing counted: 0, not NaN


def test_evaluate_weights_by_the_reported_count():
    batches = [{"x": np.zeros((2, 1))}, {"x": np.zeros((2, 1))}]
    answers = iter([{"loss": 1.0, "targets": 3.0}, {"loss": 4.0, "targets": 1.0}])
    metrics = evaluate(lambda params, batch: next(answers), None, batches)
    assert metrics["loss"] == pytest.approx((1.0 * 3 + 4.0 * 1) / 4) and metrics["targets"] == 4.0
    rows_only = iter([{"loss": 1.0}, {"loss": 4.0}])
    assert evaluate(lambda p, b: next(rows_only), None, batches)["loss"] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="no batches"):
        evaluate(lambda p, b: {}, None, [])


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_accum_steps_are_refused(bad):
    def loss_fn(params, batch, key):
        return jnp.sum(params["w"] * batch["x"]), {}

    with pytest.raises(ValueError, match="accum_steps must be an integer >= 1"):
        make_train_step(loss_fn, make_optimizer(OptimizerConfig("sgd", lr=0.1)), accum_steps=bad)
    optimizer = make_optimizer(OptimizerConfig("sgd", lr=0.1))
    state = TrainState.create({"w": jnp.ones(2)}, optimizer, jax.random.PRNGKey(0))
    step = make_strategy("single").train_step(loss_fn, optimizer, accum_steps=3)
    with pytest.raises(ValueError, match=r"global batch of 4 rows does not divide by 1 device\(s\) x 3 accumulation"):
        step(state, {"x": np.ones((4, 2), np.float32)})
