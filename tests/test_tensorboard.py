"""fit()'s TensorBoard event files, read back by a reader of their own (TFRecord framing, CRCs
checked bit by bit, not by tensorboardX's table): the scalars are metrics.jsonl's rows, the lr
follows the schedule, a resumed run hides what it trains again, only process 0 writes."""

import builtins
import errno
import glob
import json
import os
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event, SessionLog

from jaxllm import cli
from jaxllm.training import FitConfig, fit, make_schedule, tensorboard
from jaxllm.training.checkpoint import run_config
from test_training_loop import CONFIG, OPT, DiesAfter, Killed, fresh

RUN = run_config(CONFIG, OPT, batch_size=8, seed=5)  # fit takes the lr schedule from its "optimizer"


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path) -> list[Event]:
    """TFRecords: length (u64), its masked CRC-32C, the Event bytes, their masked CRC-32C."""
    data, pos, events = open(path, "rb").read(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        body = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<II", data[pos + 8:pos + 12] + data[pos + 12 + length:pos + 16 + length]) == (
            masked_crc(header), masked_crc(body)), f"bad CRC in record at byte {pos} of {path}"
        events.append(Event.FromString(body))
        pos += 16 + length
    assert pos == len(data), "a truncated record at the end"
    return events


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` as TensorBoard shows ``directory``: files in name order, a
    SessionLog START at step s hiding what earlier events logged from step s on."""
    out: dict[str, list] = {}
    paths = sorted(glob.glob(os.path.join(directory, "*tfevents*")))
    for path in paths:
        events = read_events(path)
        assert events[0].file_version == "brain.Event:2"
        for event in events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                out = {tag: [(s, v) for s, v in series if s < event.step] for tag, series in out.items()}
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":  # not the hyperparameters or texts
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def summaries(directory, tag) -> list:
    """Every summary value under ``tag`` in ``directory``'s event files, as ``(step, value)``."""
    return [(event.step, value) for path in tensorboard.event_files(directory) for event in read_events(path)
            for value in event.summary.value if value.tag == tag]


def hyperparameters(directory) -> dict:
    """The hyperparameters TensorBoard's HPARAMS tab shows for the run in ``directory``."""
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    ((_, value),) = summaries(directory, "_hparams_/session_start_info")
    info = HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
    return {name: getattr(v, v.WhichOneof("kind")) for name, v in info.hparams.items()}


def jsonl(directory, split):
    return [r for r in map(json.loads, open(os.path.join(directory, "metrics.jsonl"))) if r["split"] == split]


def as_logged(rows, key):
    """(step, value) of the rows holding ``key``, rounded to the event file's float32."""
    return [(r["step"], float(np.float32(r[key]))) for r in rows if key in r]


def test_event_file_holds_the_rows_of_metrics_jsonl(tmp_path):
    state, step, data = fresh()
    fit(state, step, data, FitConfig(out_dir=tmp_path, steps=20, eval_every=10, checkpoint_every=10, log_every=3,
        progress=False, run_config=RUN), eval_fn=lambda p: {"loss": 1.5, "bpc": 2.0})
    assert len(tensorboard.event_files(tmp_path)) == 1
    logged = scalars(tmp_path)
    train, evals = jsonl(tmp_path, "train"), jsonl(tmp_path, "eval")
    assert set(logged) == {"train/loss", "train/grad_norm", "train/accuracy", "train/lr", "train/examples_per_s",
                           "eval/loss", "eval/bpc"}
    for key in ("loss", "grad_norm", "accuracy", "lr", "examples_per_s"):
        assert logged[f"train/{key}"] == as_logged(train, key), key
    assert [s for s, _ in logged["train/loss"]] == list(range(1, 21))
    assert logged["eval/loss"] == [(10, 1.5), (20, 1.5)] and logged["eval/bpc"] == [(10, 2.0), (20, 2.0)]

    norms = [r["grad_norm"] for r in train]
    assert all(np.isfinite(n) and n > 0 for n in norms)
    lrs = [r["lr"] for r in train]  # warmup 3 steps from 0, then cosine down to 0 at step 20
    np.testing.assert_allclose(lrs, [float(make_schedule(OPT)(s - 1)) for s in range(1, 21)], rtol=0, atol=0)
    assert lrs[0] == 0 and lrs[3] == pytest.approx(OPT.lr)
    assert lrs[:4] == sorted(lrs[:4]) and lrs[3:] == sorted(lrs[3:], reverse=True) and lrs[-1] < OPT.lr / 50


def test_the_logged_lr_is_the_one_the_step_trained_with(tmp_path):
    """Step 1 logs lr 0 (optax counts from 0, the warmup starts at 0): its update changes nothing."""
    state, step, data = fresh()
    before = jax.device_get(state.params)
    after = fit(state, step, data, FitConfig(out_dir=tmp_path, steps=1, progress=False, run_config=RUN))
    assert jsonl(tmp_path, "train")[0]["lr"] == 0
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(jax.device_get(after.params))):
        np.testing.assert_array_equal(a, b)


def test_a_resumed_run_appends_a_file_that_hides_the_steps_trained_again(tmp_path):
    state, step, data = fresh()
    with pytest.raises(Killed):  # steps 11 and 12 are logged, the checkpoint is step 10
        fit(state, step, DiesAfter(data, 12), FitConfig(out_dir=tmp_path, steps=20, checkpoint_every=5, log_every=3,
            progress=False, run_config=RUN))
    first = tensorboard.event_files(tmp_path)
    assert max(s for s, _ in scalars(tmp_path)["train/loss"]) == 12

    state, step, data = fresh()
    fit(state, step, data, FitConfig(out_dir=tmp_path, steps=20, checkpoint_every=5, log_every=3, progress=False,
        run_config=RUN, resume=True))
    files = tensorboard.event_files(tmp_path)
    assert len(files) == 2 and files[0] == first[0]
    marker = read_events(files[1])[1]
    assert marker.session_log.status == SessionLog.START and marker.step == 11
    logged, train = scalars(tmp_path), jsonl(tmp_path, "train")
    assert [s for s, _ in logged["train/loss"]] == list(range(1, 21))
    assert logged["train/loss"] == as_logged(train, "loss") and logged["train/lr"] == as_logged(train, "lr")


def test_the_flags_are_the_runs_hyperparameters_written_once(tmp_path):
    flags = {"lr": 0.1, "model": "decoder", "no-progress": True, "clip-norm": None, "text": ["a.txt"]}
    state, step, data = fresh()
    with pytest.raises(Killed):
        fit(state, step, DiesAfter(data, 4), FitConfig(out_dir=tmp_path, steps=6, checkpoint_every=2, progress=False,
            run_config=RUN, flags=flags))
    assert hyperparameters(tmp_path) == {"lr": 0.1, "model": "decoder", "no-progress": True, "clip-norm": "None",
                                         "text": "['a.txt']"}
    state, step, data = fresh()
    fit(state, step, data, FitConfig(out_dir=tmp_path, steps=6, checkpoint_every=2, progress=False, run_config=RUN,
        flags=flags, resume=True))
    assert len(tensorboard.event_files(tmp_path)) == 2
    assert len(summaries(tmp_path, "_hparams_/session_start_info")) == 1  # the resumed run is the same run


def test_a_fresh_run_and_overwrite_remove_earlier_event_files(tmp_path):
    stale = tmp_path / "events.out.tfevents.1.host"
    stale.write_bytes(b"")
    state, step, data = fresh()
    fit(state, step, data, FitConfig(out_dir=tmp_path, steps=2, progress=False))
    files = tensorboard.event_files(tmp_path)
    assert len(files) == 1 and not stale.exists()
    assert "train/lr" not in scalars(tmp_path)  # neither a schedule nor a run config: no lr

    from jaxllm.jobs.linreg import LinregConfig

    cli.start(cli.parse(LinregConfig, ["--out", str(tmp_path), "--overwrite"]))
    assert tensorboard.event_files(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()


def test_only_process_0_writes_the_run_files(tmp_path, monkeypatch):
    state, step, data = fresh()
    fit(state, step, data, FitConfig(out_dir=tmp_path / "first", steps=3, progress=False, run_config=RUN,
        flags={"lr": 0.1}))
    written = {"metrics.jsonl", "summary.json", "loss.png", "config.yaml"}
    assert written <= set(os.listdir(tmp_path / "first")) and tensorboard.event_files(tmp_path / "first")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")  # how the writers tell the processes of a run apart
    state, step, data = fresh()
    fit(state, step, data, FitConfig(out_dir=tmp_path / "other", steps=3, progress=False, run_config=RUN,
        flags={"lr": 0.1}))
    assert not written & set(os.listdir(tmp_path / "other")) and tensorboard.event_files(tmp_path / "other") == []


class DiskFullAfter:
    """A file whose writes fail (ENOSPC) after ``n`` of them."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def write(self, data):
        self.n -= 1
        if self.n < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def test_a_failed_event_write_stops_the_run_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard, "open", lambda path, mode: DiskFullAfter(builtins.open(path, mode), 3),
                        raising=False)
    state, step, data = fresh()
    with pytest.raises(OSError, match=r"cannot write .*events\.out\.tfevents\.\S+: No space left on device"):
        fit(state, step, data, FitConfig(out_dir=tmp_path, steps=10, log_every=1, progress=False, run_config=RUN))
    assert len(jsonl(tmp_path, "train")) == 3  # step 3: its metrics.jsonl row, then the failed event
