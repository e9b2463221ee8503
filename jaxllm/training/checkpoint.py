"""Orbax checkpoints of a whole run: train state, data-iterator position and model config.

Orbax writes each step into a temporary directory and renames it only once complete, so a
failed or killed save never replaces a good checkpoint; ``keep`` bounds how many stay on disk.
A checkpoint whose config or tree structure does not match the run is refused with a
``CheckpointError`` that says what differs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxllm.training.state import TrainState


def run_config(model_config, optimizer, **data) -> dict:
    """What a checkpoint must match to be resumed: the model, the optimiser and the data settings."""
    return {"model": model_config.to_dict(), "optimizer": dataclasses.asdict(optimizer), "data": data}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or written for a different run."""


def _state_dict(state: TrainState) -> dict[str, Any]:
    step = jax.numpy.asarray(state.step, jax.numpy.int32)  # a numpy scalar is not restorable
    return {"params": state.params, "opt_state": state.opt_state, "step": step, "key": jax.numpy.asarray(state.key)}


def _describe(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in flat}


class Checkpointer:
    """Save and restore a run in ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, config: dict | None = None):
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, *, data_state: dict | None = None) -> int:
        """Write ``state`` under its step number (synchronously) and return that step."""
        step = int(jax.device_get(state.step))
        meta = {"step": step, "data": data_state or {}, "config": self.config}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_dict(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        return step

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore ``step`` (default: the latest) into the structure of ``template``.

        Returns ``(state, meta)`` with ``meta["data"]`` the data-iterator position.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        where = f"checkpoint step {step} in {self.directory}"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as exc:  # orbax raises many types; the user needs one message
            raise CheckpointError(f"{where} is unreadable (corrupt or incomplete): {exc}") from exc
        if self.config is not None and meta.get("config") not in (None, self.config):
            raise CheckpointError(
                f"{where} was written for a different config:\n  saved: {meta.get('config')}\n"
                f"  this run: {self.config}"
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state_dict(template))
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as exc:
            raise CheckpointError(f"{where} cannot be restored into this model: {exc}") from exc
        if _describe(restored) != _describe(abstract):
            raise CheckpointError(f"{where} has a different parameter structure than this model")
        state = TrainState(**restored)
        return state, meta

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
