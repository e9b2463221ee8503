"""Two processes on localhost (jax.distributed, gloo CPU collectives), 2 devices each, reproduce
the losses of one process with 4 devices; each process feeds only its own half of every batch.

Also run as a script: ``python tests/test_multihost.py DEVICES`` is one worker (the distributed
settings come from the JAX_* environment variables); it prints one JSON line.
"""

import json
import os
import sys

import pytest

import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, ROWS, TIME, VOCAB = 5, 8, 12, 67
TIMEOUT_S = 300


def worker(devices: int) -> dict:
    """Train STEPS steps of a tiny decoder with the sharded strategy over every process's devices."""
    import jax
    import numpy as np
    import optax

    from jaxllm.data.batches import ArrayBatches
    from jaxllm.models import transformer
    from jaxllm.training import TrainState
    from jaxllm.training.distributed import ProcessBatches, initialize, local_rows
    from jaxllm.training.losses import lm_loss
    from jaxllm.training.parallel import make_strategy

    process_id, processes = initialize()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    assert jax.local_device_count() == devices
    strategy = make_strategy("sharded")
    config = transformer.tiny(VOCAB)
    optimizer = optax.adamw(1e-2, weight_decay=0.01)
    params = config.init(jax.random.PRNGKey(0))
    state = strategy.place(TrainState.create(params, optimizer, jax.random.PRNGKey(1)))
    step = strategy.train_step(lm_loss(config), optimizer)
    # every process draws the same global batches; ProcessBatches sends only its own rows to its devices
    ids = np.random.default_rng(0).integers(0, VOCAB, (STEPS * ROWS, TIME + 1)).astype(np.int32)
    source = ArrayBatches({"inputs": ids[:, :-1], "targets": ids[:, 1:]}, ROWS, shuffle=False)
    data = ProcessBatches(source, strategy.batch_sharding)
    assert (local_rows(ids[:ROWS], sharding=strategy.batch_sharding) == local_rows(ids[:ROWS])).all()
    losses, rows_seen = [], []
    for _ in range(STEPS):
        batch = data.next()
        rows_seen.append(sum(shard.data.shape[0] for shard in batch["inputs"].addressable_shards))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    if os.environ.get("CHECKPOINT_DIR"):  # all processes write one checkpoint of the global state
        from jaxllm.training import Checkpointer

        with Checkpointer(os.environ["CHECKPOINT_DIR"]) as ckpt:
            ckpt.save(state)
    final = strategy.gather(state).params
    checksum = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree_util.tree_leaves(final)))
    from jaxllm.training.loop import _decide  # fit(): a signal to any process stops all, process 0's clock decides

    decided = [_decide(4, 2, signum=15 if process_id == 1 else 0, clock=process_id == 0),
               _decide(4, 2, signum=0, clock=process_id != 0),
               _decide(3, 2, signum=2, clock=True)]  # between log steps nothing is decided
    return {"process": process_id, "processes": processes, "devices": jax.device_count(), "losses": losses,
            "rows": rows_seen, "checksum": checksum, "decided": decided}


def spawn(devices: int, env_extra: dict):
    return processes.start([__file__, str(devices)], processes.environment(devices, **env_extra))


def test_two_processes_reproduce_one_process_with_four_devices(tmp_path):
    from parity import TRAJECTORY, assert_close  # here, not in the workers: it imports torch

    address = f"127.0.0.1:{processes.free_port()}"
    workers = [spawn(2, {**processes.multihost(i, 2, address), "CHECKPOINT_DIR": str(tmp_path / "ckpt")})
               for i in range(2)]
    single = spawn(4, {})
    reference, *results = map(processes.last_json, processes.finish([single, *workers], TIMEOUT_S))
    results.sort(key=lambda r: r["process"])
    assert reference["devices"] == 4 and reference["processes"] == 1
    assert reference["rows"] == [ROWS] * STEPS
    for process_id, r in enumerate(results):
        assert r["process"] == process_id and r["processes"] == 2 and r["devices"] == 4
        assert r["rows"] == [ROWS // 2] * STEPS  # each process fed only its half
        assert r["decided"] == [[15, True], [0, False], [0, False]], "every process acts alike"
        assert_close(r["losses"], reference["losses"], TRAJECTORY, err_msg=f"process {process_id}: losses")
        # sum of |params|: within TRAJECTORY whenever every param is
        assert_close(r["checksum"], reference["checksum"], TRAJECTORY, err_msg=f"process {process_id}: checksum")
    assert reference["losses"][-1] != reference["losses"][0]  # it trained

    # the two processes wrote one checkpoint; this one-device process restores it
    import jax
    import numpy as np
    import optax

    from jaxllm.models import transformer
    from jaxllm.training import Checkpointer, TrainState

    config = transformer.tiny(VOCAB)
    params = config.init(jax.random.PRNGKey(5))
    template = TrainState.create(params, optax.adamw(1e-2, weight_decay=0.01), jax.random.PRNGKey(1))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.all_steps() == [STEPS]
        state, _ = ckpt.restore(template)
    checksum = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree_util.tree_leaves(state.params)))
    assert checksum == pytest.approx(results[0]["checksum"], rel=1e-6)  # the same params, restored: no rounding


def test_settings_come_from_arguments_or_the_environment():
    from jaxllm.training.distributed import settings

    assert settings(environ={}) == (None, 1, 0)  # one process: nothing to join
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert settings(environ=env) == ("10.0.0.1:1234", 4, 3)
    assert settings("host:99", 2, 1, environ=env) == ("host:99", 2, 1)  # arguments win
    with pytest.raises(ValueError, match="coordinator address"):
        settings(num_processes=2, process_id=0, environ={})
    with pytest.raises(ValueError, match="process's id"):
        settings("h:1", 2, environ={})
    with pytest.raises(ValueError, match=r"process_id must lie in \[0, 1\]"):
        settings("h:1", 2, 2, environ={})
    with pytest.raises(ValueError, match="must be an integer"):
        settings(environ={"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="host:port"):
        settings("localhost", 2, 0, environ={})


def test_a_cluster_job_of_several_processes_is_detected(monkeypatch):
    """JAX's own detection, consulted only where a scheduler's variables are set (a plain machine
    never asks it): a SLURM step of 4 tasks is 4 processes, one of 1 task stays one process."""
    from jaxllm.training import distributed

    for name in distributed.SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.cluster_processes() == 1
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "4", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "1"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert distributed.cluster_processes() == 4
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.cluster_processes() == 1
    assert distributed.initialize() == (0, 1)  # one task: jax.distributed is not started


def test_each_process_reads_its_own_block_of_rows():
    import numpy as np

    from jaxllm.training.distributed import local_rows, process_rows

    assert [process_rows(8, i, 4) for i in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    batch = {"inputs": np.arange(12).reshape(6, 2), "targets": np.arange(6)}
    assert local_rows(batch, 2, 3)["targets"].tolist() == [4, 5]
    with pytest.raises(ValueError, match="does not divide by 4 processes"):
        process_rows(6, 0, 4)
    with pytest.raises(ValueError, match="same number of rows"):
        local_rows({"a": np.zeros(4), "b": np.zeros(2)}, 0, 2)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    print(json.dumps(worker(int(sys.argv[1]))), flush=True)
