"""Deterministic, resumable mini-batches over in-memory arrays.

Epoch ``e`` is shuffled by ``numpy.random.default_rng([seed, e])``, so the iterator's whole
state is ``(epoch, index)``: saved with a checkpoint, it makes a resumed run see exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class ArrayBatches:
    """Batches of ``{name: array[n, ...]}``; each batch holds ``batch_size`` rows of every array.

    Training drops the last partial batch (``drop_last=True``) so every step has the same
    shape and the jitted step compiles once.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        sizes = {name: len(a) for name, a in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays must have the same number of rows, got {sizes}")
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.num_rows = next(iter(sizes.values()))
        if not 1 <= batch_size <= self.num_rows:
            raise ValueError(f"batch_size must be in [1, {self.num_rows}] (the number of rows), got {batch_size}")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch, self.index = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def next(self) -> dict[str, np.ndarray]:
        return self.next_rows(slice(None))

    def next_rows(self, rows: slice) -> dict[str, np.ndarray]:
        """``rows`` of the next global batch (one process's block, ``jaxllm.training.distributed``);
        the position moves on by the whole batch, as for ``next()``."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        take = self._order(self.epoch)[self.index * self.batch_size:(self.index + 1) * self.batch_size][rows]
        self.index += 1
        return {name: a[take] for name, a in self.arrays.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over every row in order (for evaluation; includes the last partial batch)."""
        for start in range(0, self.num_rows, self.batch_size):
            yield {name: a[start:start + self.batch_size] for name, a in self.arrays.items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(
                f"data position was saved with seed={state.get('seed')}, batch_size={state.get('batch_size')}; "
                f"this run uses seed={self.seed}, batch_size={self.batch_size}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
