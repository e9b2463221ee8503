"""Device strategies give single-device numbers: losses, parameters, eval metrics, fit() and resume.

The multi-device runs happen once, in a subprocess with 4 forced CPU devices
(``tests/multidevice.py``); these tests compare what it returns. GPT-2 runs with drop_rate 0:
per-device code folds the device index into the dropout key, so its masks differ from one
device's by design.
"""

import dataclasses

import jax
import numpy as np
import pytest

import multidevice
from jaxllm.options import Devices, Optim, Precision, Run
from jaxllm.options.parser import parse
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_strategy, make_train_step
from jaxllm.training.losses import softmax_cross_entropy
from jaxllm.training.parallel import STRATEGIES
from jaxllm.models.mlp import MLPConfig
from parity import TRAJECTORY, assert_close

MULTI = [(model, name, accum) for model, runs in multidevice.RUNS.items() for name, accum in runs
         if name != "single"]


@pytest.fixture
def results(multidevice_results):
    return multidevice_results


def params_of(arrays, prefix):
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def assert_same_params(arrays, prefix, reference, *, exact_ish=False):
    """Params after the same steps: TRAJECTORY when the strategies compute differently;
    ``exact_ish`` (rtol 1e-6, atol 1e-7) when they run the very same compiled step (fit, resume)."""
    got, want = params_of(arrays, prefix), params_of(arrays, reference)
    assert want and set(got) == set(want), f"{prefix}: param names differ"
    for name in want:
        if exact_ish:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=f"{prefix}{name}")
        else:
            assert_close(got[name], want[name], TRAJECTORY, err_msg=f"{prefix}{name}")


@pytest.mark.parametrize("model,name,accum", MULTI, ids=[f"{m}-{n}-accum{a}" for m, n, a in MULTI])
def test_four_devices_match_one(results, model, name, accum):
    arrays, info = results
    tag, ref = f"{model}/{name}/{accum}", f"{model}/single/1"
    assert_close(arrays[f"{tag}/losses"], arrays[f"{ref}/losses"], TRAJECTORY, err_msg=f"{tag} losses")
    assert_close(arrays[f"{tag}/grad_norms"], arrays[f"{ref}/grad_norms"], TRAJECTORY, err_msg=f"{tag} grad norms")
    assert arrays[f"{tag}/targets"] == arrays[f"{ref}/targets"]  # the count is summed, not averaged
    assert_same_params(arrays, f"{tag}/params", f"{ref}/params")
    assert all(shape == [] for shape in info[f"{tag}/metric_shapes"])  # plain scalars, also from pmap
    assert info[f"{tag}/gathered_devices"] == ["cpu:0"]


def test_fsdp_keeps_params_and_optimizer_state_split(results):
    _, info = results
    split, total = info["decoder/fsdp/1/split_leaves"]
    assert total > 10 and split >= total // 2  # adam's mu/nu split like the params; scalars replicated
    assert info["decoder/fsdp/2/split_leaves"] == [split, total]
    assert info["decoder/sharded/1/split_leaves"] == [0, total]


def test_the_runs_are_not_trivially_equal(results):
    arrays, _ = results
    for model in multidevice.RUNS:
        losses = arrays[f"{model}/single/1/losses"]
        assert np.ptp(losses) > 1e-3  # five different batches, a moving model
        assert arrays[f"{model}/single/1/moved"] > 1e-4  # largest change of a param


@pytest.mark.parametrize("name", ["sharded", "fsdp", "shard_map", "pmap"])
def test_eval_step_matches_one_device(results, name):
    arrays, _ = results
    model = multidevice.FIT_MODEL
    for metric in ("loss", "accuracy", "targets"):
        got, want = arrays[f"{model}/{name}/1/eval/{metric}"], arrays[f"{model}/single/1/eval/{metric}"]
        # params differ at float tolerance between strategies; the metrics follow them
        assert_close(got, want, TRAJECTORY, err_msg=f"{name} eval {metric}")


@pytest.mark.parametrize("name", ["single", "sharded", "fsdp", "shard_map", "pmap"])
def test_fit_runs_every_strategy(results, name):
    """fit() places, gathers for eval and checkpoints, and returns one-device params: the same
    numbers as calling the step by hand."""
    arrays, _ = results
    tag = f"{multidevice.FIT_MODEL}/{name}/1"
    # the very same compiled step as by hand: tighter than the policy (it allows for a different computation)
    np.testing.assert_allclose(arrays[f"fit/{name}/losses"], arrays[f"{tag}/losses"], rtol=1e-6)
    assert list(arrays[f"fit/{name}/eval_steps"]) == [2, 4, 5]
    assert_same_params(arrays, f"fit/{name}/params", f"{tag}/params", exact_ish=True)


@pytest.mark.parametrize("name", multidevice.RESUMED)
def test_resumed_fit_continues_the_same_run(results, name):
    arrays, _ = results
    tag = f"{multidevice.FIT_MODEL}/{name}/1"
    assert_same_params(arrays, f"resume/{name}/params", f"{tag}/params", exact_ish=True)


def test_lm_script_under_pmap_with_accumulation_matches_one_device(results):
    _, info = results
    single, pmap = info["lm/single"], info["lm/pmap_accum2"]
    assert single["status"] == pmap["status"] == "finished" and pmap["last_checkpoint"] == 4
    assert_close(pmap["val_loss"], single["val_loss"], TRAJECTORY, err_msg="val_loss after 4 steps")


def test_batches_that_do_not_divide_are_refused(results):
    _, info = results
    assert info["error/sharded/1"] == (
        "the global batch of 6 rows does not divide by 4 device(s) x 1 accumulation step(s) = 4; "
        "use a batch size that is a multiple of 4 (e.g. 4 or 8)")
    for key in ("error/pmap/1", "error/fsdp/1"):
        assert "6 rows does not divide by 4 device(s)" in info[key]
    assert "= 8; use a batch size that is a multiple of 8 (e.g. 8)" in info["error/shard_map/2"]
    assert "1 device(s) x 4 accumulation step(s) = 4" in info["error/single/4"]
    assert info["auto"] == "sharded" and info["num_devices"] == 4


# --- in this process (one device) -------------------------------------------------------------

CONFIG = MLPConfig(num_inputs=4, num_outputs=3, hidden=(8,))


def tiny_problem(rows=8, steps=3):
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((rows, 4)).astype(np.float32), "y": rng.integers(0, 3, rows).astype(np.int32)}
            for _ in range(steps)]
    optimizer = make_optimizer(OptimizerConfig("adam", lr=1e-2))
    state = TrainState.create(CONFIG.init(jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))
    return softmax_cross_entropy(CONFIG.apply), optimizer, state, data


def test_make_strategy_defaults_and_names():
    assert make_strategy().name == "single" and make_strategy("auto").num_devices == 1
    assert make_strategy("single", devices=jax.devices() * 3).num_devices == 1
    with pytest.raises(ValueError, match=r"one of \('single', 'sharded', 'fsdp', 'shard_map', 'pmap'\)"):
        make_strategy("ddp")
    with pytest.raises(ValueError, match="at least one device"):
        make_strategy("sharded", devices=[])


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_runs_on_one_device(name):
    """A script run with --parallel X on a one-device machine just works (and matches single)."""
    loss_fn, optimizer, state, data = tiny_problem()
    reference = make_train_step(loss_fn, optimizer)
    strategy = make_strategy(name)
    step = strategy.train_step(loss_fn, optimizer)
    placed = strategy.place(state)
    ref_state = jax.tree_util.tree_map(np.array, state)  # the donated state cannot be reused
    # one device: every strategy runs the plain step's operations (bit-identical here), so these
    # checks stay tighter than tests/parity.py's TRAJECTORY, which allows for a different computation
    for batch in data:
        placed, metrics = step(placed, batch)
        ref_state, ref_metrics = reference(ref_state, batch)
        assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)
    got = jax.tree_util.tree_leaves(strategy.gather(placed).params)
    for a, b in zip(got, jax.tree_util.tree_leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_single_default_step_is_the_plain_jitted_step():
    loss_fn, optimizer, _, _ = tiny_problem()
    strategy = make_strategy("single")
    step = strategy.train_step(loss_fn, optimizer)
    assert step.strategy is strategy and hasattr(step, "lower")  # a jax.jit function, no wrapper


@dataclasses.dataclass(frozen=True)
class _Job:
    run: Run = Run()
    optim: Optim = Optim(batch_size=8)
    devices: Devices = Devices()
    precision: Precision = Precision()


@dataclasses.dataclass(frozen=True)
class _JobWithoutPrecision:
    run: Run = Run()
    devices: Devices = Devices()


def test_cli_flags():
    config = parse(_Job, ["--parallel", "shard_map", "--accum-steps", "2", "--dtype", "bfloat16", "--remat"])
    assert (config.devices.parallel, config.devices.accum_steps) == ("shard_map", 2)
    assert (config.precision.dtype, config.precision.remat) == ("bfloat16", True)
    defaults = parse(_Job, [])
    assert (defaults.devices.parallel, defaults.devices.accum_steps) == ("auto", 1)
    assert (defaults.precision.dtype, defaults.precision.remat) == ("float32", False)
    assert defaults.devices.strategy(8).name == "single"
    with pytest.raises(SystemExit):  # refused while parsing, before any work
        parse(_Job, ["--accum-steps", "0"])
    with pytest.raises(ValueError, match="8 rows does not divide by 1 device.* 3 accumulation step.*e.g. 6 or 9"):
        parse(_Job, ["--accum-steps", "3"]).devices.strategy(8)
    with pytest.raises(SystemExit):
        parse(_Job, ["--parallel", "ddp"])
    with pytest.raises(SystemExit):  # a job without the precision part has no --dtype
        parse(_JobWithoutPrecision, ["--dtype", "bfloat16"])
