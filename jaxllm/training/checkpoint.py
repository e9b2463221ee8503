"""Orbax checkpoints of a whole run: train state, data-iterator position and model config.

Orbax writes each step into a temporary directory and renames it only once complete, so a
failed or killed save never replaces a good checkpoint; ``keep`` bounds how many stay on disk.
Once a step has committed, ``checksums.json`` in its directory records the sha256 of every
file; ``restore`` verifies them, so flipped bytes or a truncated file are found before anything
is loaded. Without an explicit step it falls back to the newest intact checkpoint (printing a
warning naming the damaged step and why) and refuses when none is intact. A checkpoint whose
config or tree structure does not match the run is refused with a ``CheckpointError`` that says
what differs. A save that fails (disk full, read-only directory) raises ``CheckpointWriteError``
naming the directory and the cause, after removing orbax's temporary directory.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxllm.training.state import TrainState
from jaxllm.training.optim import EXTENDABLE, OptimizerConfig

CHECKSUMS = "checksums.json"
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step still being written
SET_ASIDE_PREFIX = "damaged-"  # damaged steps are renamed, never deleted; orbax ignores the name


def run_config(model_config, optimizer, **data) -> dict:
    """What a checkpoint must match to be resumed: the model, the optimiser and the data settings."""
    return {"model": model_config.to_dict(), "optimizer": dataclasses.asdict(optimizer), "data": data}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, unreadable, or written for a different run."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only or missing directory ...)."""


def _state_dict(state: TrainState) -> dict[str, Any]:
    step = jax.numpy.asarray(state.step, jax.numpy.int32)  # a numpy scalar is not restorable
    return {"params": state.params, "opt_state": state.opt_state, "step": step, "key": jax.numpy.asarray(state.key)}


def _describe(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in flat}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(step_dir: str) -> dict[str, str]:
    """sha256 of every file under ``step_dir`` (but the checksum file), by relative path."""
    sums = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel not in (CHECKSUMS, CHECKSUMS + ".tmp"):
                sums[rel] = _sha256(path)
    return sums


def damage(step_dir: str) -> str | None:
    """Why the checkpoint in ``step_dir`` is damaged (a file missing, changed or added since it was
    saved), or None when every file matches ``checksums.json``. A step saved before checksums
    existed (no ``checksums.json``) is not verifiable: None, and restoring it relies on orbax."""
    path = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            recorded = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {CHECKSUMS} is unreadable ({exc})"
    actual = file_checksums(step_dir)
    missing = sorted(set(recorded) - set(actual))
    if missing:
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    changed = sorted(name for name in recorded if recorded[name] != actual[name])
    if changed:
        return f"{len(changed)} file(s) changed since the save (sha256 mismatch), e.g. {changed[0]}"
    added = sorted(set(actual) - set(recorded))
    if added:
        return f"{len(added)} unexpected file(s), e.g. {added[0]}"
    return None


class Checkpointer:
    """Save and restore a run in ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, config: dict | None = None):
        self.directory = os.path.abspath(os.fspath(directory))
        # as the checkpoint will hold it (JSON: a tuple comes back a list), so a resume compares like with like
        self.config = None if config is None else json.loads(json.dumps(config))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointWriteError(f"cannot keep checkpoints in {self.directory}: it is a file, not a directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot use {self.directory} for checkpoints: {exc.strerror or exc}") from exc

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, *, data_state: dict | None = None) -> int:
        """Write ``state`` under its step number (synchronously), then its checksums; returns the step.

        On failure nothing half-written stays behind (orbax's temporary directory is removed)
        and the earlier checkpoints are untouched; raises ``CheckpointWriteError``.
        """
        step = int(jax.device_get(state.step))
        meta = {"step": step, "data": data_state or {}, "config": self.config}
        try:
            self._save(step, state, meta)
            if jax.process_index() == 0:  # the step has committed on every process: record its files
                self._write_checksums(step)
        except Exception as exc:
            self._remove_partial(step)
            cause = _root_cause(exc)
            raise CheckpointWriteError(f"cannot write checkpoint step {step} to {self.directory}: {cause}") from exc
        return step

    def _save(self, step: int, state: TrainState, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_state_dict(state)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()

    def _write_checksums(self, step: int) -> None:
        step_dir = self.step_dir(step)
        sums = {"algorithm": "sha256", "files": file_checksums(step_dir)}
        tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
        with open(tmp, "w") as f:
            json.dump(sums, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(step_dir, CHECKSUMS))

    def _remove_partial(self, step: int) -> None:
        """Remove what a failed save of ``step`` left: orbax's temporary directory, and the step
        itself if it committed but its checksums could not be written."""
        # orbax's other write tasks of this step may still be running (the first error ended the
        # save, not them) and create directories in its temporary one after a removal: remove it
        # until it has stayed away for a moment (at most ~2 s, on this error path only)
        quiet_checks = 0
        for _ in range(40):
            leftovers = glob.glob(os.path.join(self.directory, f"{step}{ORBAX_TMP_SUFFIX}*"))
            for tmp in leftovers:
                shutil.rmtree(tmp, ignore_errors=True)
            quiet_checks = 0 if leftovers else quiet_checks + 1
            if quiet_checks == 3:
                break
            time.sleep(0.05)
        step_dir = self.step_dir(step)
        if os.path.isdir(step_dir) and not os.path.exists(os.path.join(step_dir, CHECKSUMS)):
            shutil.rmtree(step_dir, ignore_errors=True)
        try:
            self.manager.reload()
        except Exception:  # noqa: BLE001 -- the directory itself may be gone; the save error says why
            pass

    def read_meta(self, step: int) -> dict:
        """The metadata saved with ``step``: ``{"step", "data", "config"}``."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as exc:  # orbax raises many types; the user needs one message
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable: {exc}") from exc

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore ``step`` (default: the newest intact one) into the structure of ``template``.

        Returns ``(state, meta)`` with ``meta["data"]`` the data-iterator position and
        ``meta["step"]`` the step restored. Every file is checked against the checksums recorded
        at save time first. With ``step=None`` a damaged or unreadable newest step is skipped with a
        warning on stderr and the next older one tried; a ``CheckpointError`` lists every step
        when none is intact. A checkpoint of another config is refused at once (not skipped).
        """
        return self.restore_with(lambda meta: template, step)

    def restore_with(self, make_template, step: int | None = None) -> tuple[TrainState, dict]:
        """``restore`` with the template built from the checkpoint's own metadata:
        ``make_template(meta) -> TrainState`` (e.g. from the model config saved in it)."""
        if step is not None:
            return self._restore_step(make_template, step)
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        problems = []
        for candidate in reversed(steps):
            try:
                return self._restore_step(make_template, candidate)
            except _Damaged as exc:
                problems.append(str(exc))
                print(f"warning: {exc}; trying an older checkpoint", file=sys.stderr, flush=True)
        raise CheckpointError(f"no intact checkpoint in {self.directory}:\n  " + "\n  ".join(problems))

    def _restore_step(self, make_template, step: int) -> tuple[TrainState, dict]:
        where = f"checkpoint step {step} in {self.directory}"
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; there are {self.all_steps()}")
        problem = damage(self.step_dir(step))
        if problem:
            raise _Damaged(f"{where} is damaged: {problem}")
        try:
            meta = self.read_meta(step)
        except CheckpointError as exc:
            raise _Damaged(str(exc)) from exc
        if self.config is not None and meta.get("config") is not None and \
                _resumable(meta["config"], step, self.config) != _resumable(self.config, step, meta["config"]):
            raise CheckpointError(f"{where} was written for a different config (saved → this run):\n"
                                  f"{_config_diff(meta.get('config'), self.config)}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state_dict(make_template(meta)))
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as exc:
            # files verified intact: the model differs; unverifiable (saved without checksums): maybe damage
            verified = os.path.exists(os.path.join(self.step_dir(step), CHECKSUMS))
            error = CheckpointError if verified else _Damaged
            raise error(f"{where} cannot be restored into this model: {exc}") from exc
        if _describe(restored) != _describe(abstract):
            raise CheckpointError(f"{where} has a different parameter structure than this model")
        return TrainState(**restored), meta

    def set_aside(self, newer_than: int) -> list[str]:
        """Rename every step after ``newer_than`` to ``damaged-<step>`` (kept for inspection, ignored
        by orbax), so a run resumed from an older step can save those step numbers again."""
        moved = []
        for step in self.all_steps():
            if step > newer_than:
                target = os.path.join(self.directory, f"{SET_ASIDE_PREFIX}{step}")
                suffix = 1
                while os.path.exists(target):
                    target = os.path.join(self.directory, f"{SET_ASIDE_PREFIX}{step}.{suffix}")
                    suffix += 1
                os.rename(self.step_dir(step), target)
                moved.append(target)
        if moved:
            self.manager.reload()
        return moved

    def reload(self) -> None:
        """See the steps on disk again (another process may have added or set aside some)."""
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _without_data_paths(config: dict) -> dict:
    """A run config without where its data lives (``data.text``, ``data.tokens``): a moved corpus, or a
    path stored relative by an older run, is the same data; whether the data itself changed is the
    run's data record's to say (``jaxllm.runio.record_data``: sizes and sha256s)."""
    data = {k: v for k, v in (config.get("data") or {}).items() if k not in ("text", "tokens")}
    return {**config, "data": data} if "data" in config else config


OPTIMIZER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OptimizerConfig)}


def _resumable(config: dict, step: int, other: dict) -> dict:
    """``config`` as a resume from ``step`` compares it with ``other``: without where its data
    lives, with the defaults of optimiser settings it does not record, and, when both schedules
    extend (``EXTENDABLE``) and ``step`` is past both warmups, without the run's length and warmup:
    the steps left train at the same rates either way."""
    config = _without_data_paths(config)
    if "optimizer" in config:  # a setting added since the run was saved: it trained with the default
        config = {**config, "optimizer": {**OPTIMIZER_DEFAULTS, **config["optimizer"]}}
    mine, theirs = config.get("optimizer") or {}, other.get("optimizer") or {}
    if mine.get("schedule") in EXTENDABLE and mine.get("schedule") == theirs.get("schedule") and \
            step >= max(mine.get("warmup_steps", 0), theirs.get("warmup_steps", 0)):
        config = {**config, "optimizer": {k: v for k, v in mine.items() if k not in ("total_steps", "warmup_steps")}}
    return config


def extension_note(saved: dict | None, start: int, total: int) -> str | None:
    """The ``note:`` for a wsd run resumed at ``start`` with another length (``total``): where its
    decay now is, and whether the rate rises again because ``start`` was already decaying."""
    opt = (saved or {}).get("optimizer") or {}
    if opt.get("schedule") != "wsd" or opt.get("total_steps") in (None, total):
        return None
    before, now = (OptimizerConfig(**{**opt, "total_steps": n}) for n in (opt["total_steps"], total))
    old_start, new_start = before.total_steps - before.decay_steps, total - now.decay_steps
    note = (f"note: the wsd schedule now runs {total} steps (it ran {before.total_steps}): its decay moves from "
            f"steps {old_start}-{before.total_steps} to {new_start}-{total}")
    if start > old_start:
        note += f"; step {start} had already decayed: the rate jumps back to the stable one"
    return note


class _Damaged(CheckpointError):
    """A step whose files are damaged or unreadable: ``restore`` may fall back past it."""


def _config_diff(saved, current, prefix: str = "") -> str:
    """The differing entries of two run configs, one ``  key: saved → this run`` line each."""
    if isinstance(saved, (dict, type(None))) and isinstance(current, (dict, type(None))) and (saved or current):
        saved, current = saved or {}, current or {}  # a section only one side has: its keys one by one
        lines = []
        for key in sorted(set(saved) | set(current)):
            lines.append(_config_diff(saved.get(key), current.get(key), f"{prefix}{key}."))
        return "\n".join(line for line in lines if line)
    if saved == current:
        return ""
    return f"  {prefix.rstrip('.')}: {saved!r} → {current!r}"


def _root_cause(exc: BaseException) -> str:
    """The innermost cause of an exception chain as ``message (errno N)`` where it is an OS error
    (also when tensorstore reports one inside its own message), else ``Type: message``."""
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for candidate in reversed(chain):
        if isinstance(candidate, OSError) and candidate.strerror:
            return f"{candidate.strerror} (errno {candidate.errno})"
        code = re.search(r"os_error_code='?(\d+)", str(candidate))
        if code:
            return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
    return f"{type(chain[-1]).__name__}: {chain[-1]}"
