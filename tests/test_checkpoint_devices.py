"""A checkpoint written by a 4-device run (sharded and fsdp) restores on 1 and on 2 devices:
the same parameters, laid out for the new devices, and the next step gives the 4-device run's.

Also run as a script: ``python tests/test_checkpoint_devices.py save|restore DIR`` is one worker
(its device count comes from XLA_FLAGS); it prints one JSON line.
"""

import json
import os
import sys

import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ("sharded", "fsdp")
ROWS, TIME, VOCAB = 4, 8, 64  # vocab and widths divide by 4: fsdp really splits the arrays
TIMEOUT_S = 300


def setup(strategy_name: str, devices=None):
    import jax
    import numpy as np
    import optax

    from jaxllm.models import transformer
    from jaxllm.training import TrainState
    from jaxllm.training.losses import lm_loss
    from jaxllm.training.parallel import make_strategy

    devices = jax.devices() if devices is None else devices
    strategy = make_strategy(strategy_name if len(devices) > 1 else "single", devices=devices)
    config = transformer.tiny(VOCAB)
    optimizer = optax.adamw(1e-2, weight_decay=0.01)
    params = config.init(jax.random.PRNGKey(0))
    state = strategy.place(TrainState.create(params, optimizer, jax.random.PRNGKey(1)))
    ids = np.random.default_rng(0).integers(0, VOCAB, (3, ROWS, TIME + 1)).astype(np.int32)
    batches = [{"inputs": x[:, :-1], "targets": x[:, 1:]} for x in ids]
    run = {"model": config.to_dict(), "strategy": "any"}  # the checkpoint's config: no device count in it
    return strategy, state, strategy.train_step(lm_loss(config), optimizer), batches, run


def flat_params(state) -> dict:
    import jax
    import numpy as np

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}


def save(directory: str) -> dict:
    """4 devices: 2 steps, checkpoint, keep the params; then the 3rd step's loss and params."""
    import numpy as np

    from jaxllm.training import Checkpointer

    out = {}
    for name in STRATEGIES:
        strategy, state, step, batches, run = setup(name)
        for b in batches[:2]:
            state, _ = step(state, b)
        sharded_leaves = sum(not leaf.sharding.is_fully_replicated for leaf in _leaves(state.params))
        with Checkpointer(os.path.join(directory, name), config=run) as ckpt:
            ckpt.save(state)
        np.savez(os.path.join(directory, f"{name}_step2.npz"), **flat_params(strategy.gather(state)))
        state, metrics = step(state, batches[2])
        np.savez(os.path.join(directory, f"{name}_step3.npz"), **flat_params(strategy.gather(state)))
        out[name] = {"loss3": float(metrics["loss"]), "sharded_leaves": sharded_leaves}
    return out


def restore(directory: str, devices=None) -> dict:
    """On ``devices`` (default: all): restore each checkpoint into their layout, take the 3rd step;
    its params go to ``{strategy}_on{count}_step3.npz`` for the test to compare."""
    import jax
    import numpy as np

    from jaxllm.training import Checkpointer

    out = {}
    for name in STRATEGIES:
        strategy, template, step, batches, run = setup(name, devices)
        with Checkpointer(os.path.join(directory, name), config=run) as ckpt:
            state, meta = ckpt.restore(template)
        step2 = np.load(os.path.join(directory, f"{name}_step2.npz"))
        same = all(np.array_equal(v, step2[k]) for k, v in flat_params(strategy.gather(state)).items())
        used = {d.id for leaf in _leaves(state) for d in leaf.sharding.device_set}
        state, metrics = step(state, batches[2])
        np.savez(os.path.join(directory, f"{name}_on{strategy.num_devices}_step3.npz"),
                 **flat_params(strategy.gather(state)))
        out[name] = {"step": int(state.step), "same_params": same, "devices": sorted(used),
                     "loss3": float(metrics["loss"]), "meta_step": meta["step"], "count": strategy.num_devices}
    return out


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def run_worker(mode: str, directory: str, devices: int):
    return processes.start([__file__, mode, directory], processes.environment(devices))


def result(proc) -> dict:
    return processes.last_json(processes.finish([proc], TIMEOUT_S)[0])


def test_checkpoint_from_four_devices_restores_on_one_and_two(tmp_path):
    import jax
    import numpy as np

    from parity import OUTPUT, TRAJECTORY, assert_close  # here, not in the workers: it imports torch

    saved = result(run_worker("save", str(tmp_path), 4))
    on_two = run_worker("restore", str(tmp_path), 2)
    try:
        restored = {1: restore(str(tmp_path), jax.devices()[:1])}  # in this process, on one device
    except BaseException:
        on_two.kill()
        raise
    restored[2] = result(on_two)
    assert saved["sharded"]["sharded_leaves"] == 0  # data parallel: params replicated
    assert saved["fsdp"]["sharded_leaves"] > 0  # fsdp: params split over the 4 devices
    for n, by_strategy in restored.items():
        for name in STRATEGIES:
            r = by_strategy[name]
            assert r["count"] == n and r["devices"] == list(range(n)), r
            assert r["meta_step"] == 2 and r["step"] == 3
            assert r["same_params"], f"{name} restored on {n} device(s) differs from what was saved"
            # the same params (checked above), one forward on another device count
            assert_close(r["loss3"], saved[name]["loss3"], OUTPUT, err_msg=f"{name} on {n}: 3rd step's loss")
            with np.load(tmp_path / f"{name}_on{n}_step3.npz") as got, np.load(tmp_path / f"{name}_step3.npz") as want:
                assert set(got.files) == set(want.files)
                for k in want.files:  # one optimiser step from the same params
                    assert_close(got[k], want[k], TRAJECTORY, err_msg=f"{name} on {n}: params after the 3rd step {k}")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    mode, directory = sys.argv[1], sys.argv[2]
    print(json.dumps(save(directory) if mode == "save" else restore(directory)), flush=True)
