"""Deterministic, resumable mini-batches.

Epoch ``e`` is shuffled by ``numpy.random.default_rng([seed, e])``, so the iterator's whole
state is ``(epoch, index)``: saved with a checkpoint, it makes a resumed run see exactly the
batches the uninterrupted run would have seen. ``ShuffledBatches`` holds that order and position;
``ArrayBatches`` serves its rows from in-memory arrays, ``jaxllm.data.token_file.TokenWindows``
from a memory-mapped token file.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class ShuffledBatches:
    """The order and position of batches of ``batch_size`` out of ``num_rows`` rows; a subclass
    reads the rows (``_rows(indices)``).

    ``next()`` gives the next batch; ``next_rows(rows)`` only ``rows`` (a slice) of it -- with
    several processes each reads its own block (``jaxllm.training.distributed.ProcessBatches``);
    both advance by one whole batch. Training drops the last partial batch (``drop_last=True``)
    so every step has the same shape and the jitted step compiles once. Each epoch's order is
    computed once and kept (4 bytes a row while there are fewer than 2**32).
    """

    def __init__(self, num_rows: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, rows_are: str = "rows"):
        if not 1 <= batch_size <= num_rows:
            raise ValueError(f"batch_size must be in [1, {num_rows}] (the number of {rows_are}), got {batch_size}")
        self.num_rows, self.batch_size, self.shuffle, self.seed, self.drop_last = (num_rows, batch_size, shuffle,
                                                                                   seed, drop_last)
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        if self._cached is None or self._cached[0] != epoch:
            # permutation(num_rows)'s order, shuffled in place at 4 bytes a row (permutation builds int64)
            order = np.arange(self.num_rows, dtype=np.uint32 if self.num_rows < 2 ** 32 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(order)
            self._cached = (epoch, order)
        return self._cached[1]

    def _rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def next(self) -> dict[str, np.ndarray]:
        return self.next_rows(slice(None))

    def next_rows(self, rows: slice) -> dict[str, np.ndarray]:
        """``rows`` of the next batch; the position moves on by the whole batch, as for ``next()``."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        indices = self._order(self.epoch)[self.index * self.batch_size:(self.index + 1) * self.batch_size][rows]
        self.index += 1
        return self._rows(indices)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(
                f"data position was saved with seed={state.get('seed')}, batch_size={state.get('batch_size')}; "
                f"this run uses seed={self.seed}, batch_size={self.batch_size}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class ArrayBatches(ShuffledBatches):
    """Batches of ``{name: array[n, ...]}``; each batch holds ``batch_size`` rows of every array."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        sizes = {name: len(a) for name, a in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays must have the same number of rows, got {sizes}")
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        super().__init__(next(iter(sizes.values())), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def _rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {name: a[indices] for name, a in self.arrays.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over every row in order (for evaluation; includes the last partial batch)."""
        for start in range(0, self.num_rows, self.batch_size):
            yield {name: a[start:start + self.batch_size] for name, a in self.arrays.items()}
