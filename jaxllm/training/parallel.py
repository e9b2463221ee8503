"""Device strategies: how one training step runs on one or many devices. Models never know.

* ``single``: one device, ``jax.jit``.
* ``sharded``: ``jax.jit`` over a 1-D ``Mesh`` with a ``data`` axis -- the batch is split over
  the devices (``NamedSharding(mesh, P("data"))``), params and optimiser state are replicated;
  XLA inserts the gradient all-reduce. The default on several devices.
* ``fsdp``: as ``sharded``, but every param / optimiser-state array is also split over the
  ``data`` axis (along its largest dimension that divides by the device count; arrays with no
  such dimension stay replicated), so a model need not fit on one device; XLA gathers weights
  where they are used.
* ``shard_map``: per-device code (``jax.shard_map``): each device computes its shard's
  gradients, then an explicit ``lax.psum`` of count-weighted sums -- the cross-device mean
  (``lax.pmean`` when every device counts the same).
* ``pmap``: the classic per-device style (``jax.pmap`` with an axis name, state with a leading
  device axis). In maintenance mode since JAX 0.8; kept because users compare against it.

Meshes use ``AxisType.Auto``: ``jax.make_mesh`` defaults to Explicit axes in this JAX, under
which an embedding lookup on batch-sharded ids is a sharding-type error.

Every strategy takes the GLOBAL batch as a host pytree (numpy, leading dim = rows) and gives the
same losses and parameters as ``single`` on that batch, to float tolerance (dropout draws
differ in per-device code: each device folds its index into the key).
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxllm.jax_internals import compiled_versions
from jaxllm.training.step import make_eval_step, make_train_step

STRATEGIES = ("single", "sharded", "fsdp", "shard_map", "pmap")
DATA_AXIS = "data"

# XLA's CPU client gives each device 32 slots for computations in flight, and launches the
# devices' parts of a step from a thread pool, in no fixed order. With 33 or more steps queued,
# later steps can take all of one device's slots (each waiting for the step before it) while the
# earliest step still waits for a slot there -- and the other device waits for it in the
# all-reduce: a deadlock, which XLA's rendezvous timeout turns into an abort. Several CPU devices
# of one process therefore dispatch a step only once the step before the previous one has finished.
MAX_STEPS_IN_FLIGHT = 2


def make_strategy(name: str | None = None, *, devices: Sequence | None = None) -> "Strategy":
    """The strategy ``name`` over ``devices`` (default ``jax.devices()``: every process's devices).

    ``None`` or ``"auto"`` picks ``sharded`` when there are several devices, else ``single``.
    ``single`` uses the first device.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_strategy() needs at least one device")
    if name in (None, "auto"):
        name = "sharded" if len(devices) > 1 else "single"
    if name not in STRATEGIES:
        raise ValueError(f"parallel strategy must be one of {STRATEGIES} (or 'auto'), got {name!r}")
    if name == "single":
        return SingleDevice(devices[:1])
    if name in ("sharded", "fsdp"):
        return MeshStrategy(devices, shard_params=name == "fsdp")
    if name == "shard_map":
        return ShardMapStrategy(devices)
    return PmapStrategy(devices)


class Step:
    """A strategy's train or eval step: checks and places the host batch, then runs ``jitted``.

    ``prepare(batch)`` gives what ``jitted`` takes (for ``jitted.lower``); ``lower(*args)``
    lowers with a prepared batch (memory analysis). ``train``: the output is ``(state,
    metrics)``, the state donated to the next call. On several CPU devices of one process at most
    ``MAX_STEPS_IN_FLIGHT`` calls run at once (see there)."""

    def __init__(self, strategy: "Strategy", jitted: Callable, accum_steps: int, finish: Callable | None = None,
                 *, train: bool):
        self.strategy, self.jitted, self.accum_steps, self._finish = strategy, jitted, accum_steps, finish
        self._train = train
        self._in_flight = collections.deque() if strategy.in_process_collectives else None

    def prepare(self, batch):
        return self.strategy.place_batch(batch, self.accum_steps)

    def __call__(self, state_or_params, batch):
        if self._in_flight is not None:
            while len(self._in_flight) >= MAX_STEPS_IN_FLIGHT:
                jax.block_until_ready(self._in_flight.popleft())
        out = self.jitted(state_or_params, self.prepare(batch))
        out = self._finish(out) if self._finish else out
        if self._in_flight is not None:
            # the metrics finish with the step; the state is donated to the next call, so not it
            self._in_flight.append(out[1] if self._train else out)
        return out

    def lower(self, state_or_params, batch):
        return self.jitted.lower(state_or_params, self.prepare(batch))

    def _cache_size(self) -> int | None:  # as jax.jit's, so jax_internals.compiled_versions reads both
        return compiled_versions(self.jitted)


class Strategy:
    """Base: ``name``, ``devices``, ``num_devices``; see ``make_strategy``."""

    name: str

    def __init__(self, devices: Sequence):
        self.devices = list(devices)
        self.num_devices = len(self.devices)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_devices={self.num_devices})"

    @property
    def in_process_collectives(self) -> bool:
        """Whether several of this process's CPU devices take part (``MAX_STEPS_IN_FLIGHT``)."""
        local = [d for d in self.devices if d.process_index == jax.process_index()]
        return len(local) > 1 and local[0].platform == "cpu"

    # -- batches -------------------------------------------------------------------------
    def check_batch(self, batch, accum_steps: int = 1) -> int:
        """Rows of ``batch``; ValueError unless they divide by ``num_devices * accum_steps``."""
        leaves = jax.tree_util.tree_leaves(batch)
        if not leaves:
            raise ValueError("the batch is empty: it needs at least one array")
        sizes = {int(np.shape(x)[0]) if np.ndim(x) else 0 for x in leaves}
        if len(sizes) != 1:
            raise ValueError(f"every array in the batch needs the same number of rows, got {sorted(sizes)}")
        return self.check_rows(sizes.pop(), accum_steps)

    def check_rows(self, rows: int, accum_steps: int = 1) -> int:
        """ValueError unless a global batch of ``rows`` divides by ``num_devices * accum_steps``."""
        if int(accum_steps) != accum_steps or accum_steps < 1:
            raise ValueError(f"accum_steps must be an integer >= 1, got {accum_steps!r}")
        need = self.num_devices * accum_steps
        if rows < need or rows % need:
            below, above = rows // need * need, (rows // need + 1) * need
            sizes_ok = f"{below} or {above}" if below else f"{above}"
            raise ValueError(
                f"the global batch of {rows} rows does not divide by {self.num_devices} device(s) x "
                f"{accum_steps} accumulation step(s) = {need}; use a batch size that is a multiple of "
                f"{need} (e.g. {sizes_ok})")
        return rows

    def place_batch(self, batch, accum_steps: int = 1):
        """Check ``batch`` and put it where the step expects it."""
        self.check_batch(batch, accum_steps)
        return batch

    # -- steps ---------------------------------------------------------------------------
    def train_step(self, loss_fn: Callable, optimizer: optax.GradientTransformation, *, accum_steps: int = 1):
        """``step(state, batch) -> (state, metrics)``: jitted, state donated (use the returned
        one), ``batch`` the global host batch; metrics are scalars as on one device. The state
        must have been ``place``-d."""
        raise NotImplementedError

    def eval_step(self, loss_fn: Callable):
        """``eval(params, batch) -> metrics`` of the whole batch, params from a placed state."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------
    def place(self, state):
        """Copy ``state`` (any pytree, on host or one device) onto this strategy's devices."""
        raise NotImplementedError

    def gather(self, state):
        """A placed state back on one (local) device: checkpointable and usable by plain jit."""
        device = jax.local_devices()[0]
        return jax.tree_util.tree_map(lambda x: _to_device(x, device), state)


class SingleDevice(Strategy):
    name = "single"

    def train_step(self, loss_fn, optimizer, *, accum_steps: int = 1):
        jitted = make_train_step(loss_fn, optimizer, accum_steps=accum_steps)
        if accum_steps == 1:  # the default path stays exactly make_train_step (benchmarked)
            jitted.strategy = self
            return jitted
        return Step(self, jitted, accum_steps, train=True)

    def eval_step(self, loss_fn):
        return make_eval_step(loss_fn)

    def place(self, state):
        return jax.device_put(state, self.devices[0])


class MeshStrategy(Strategy):
    """``sharded`` (params replicated) or ``fsdp`` (params and optimiser state split too)."""

    def __init__(self, devices, *, shard_params: bool = False):
        super().__init__(devices)
        self.name = "fsdp" if shard_params else "sharded"
        self.shard_params = shard_params
        self.mesh = Mesh(np.array(self.devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))  # rows split over the devices

    def param_sharding(self, shape) -> NamedSharding:
        """fsdp: split the largest dimension that divides by the device count; else replicate."""
        if not self.shard_params:
            return self.replicated
        dims = [d for d, size in enumerate(shape) if size >= self.num_devices and size % self.num_devices == 0]
        if not dims:
            return self.replicated
        dim = max(dims, key=lambda d: shape[d])
        return NamedSharding(self.mesh, P(*([None] * dim), DATA_AXIS))

    def state_shardings(self, state):
        """The sharding of every leaf of a TrainState (``step`` and ``key`` replicated)."""
        by_shape = lambda tree: jax.tree_util.tree_map(lambda x: self.param_sharding(np.shape(x)), tree)
        if hasattr(state, "opt_state") and hasattr(state, "key"):
            return state.replace(params=by_shape(state.params), opt_state=by_shape(state.opt_state),
                                 step=self.replicated, key=self.replicated)
        return by_shape(state)

    def place_batch(self, batch, accum_steps: int = 1):
        self.check_batch(batch, accum_steps)
        return jax.tree_util.tree_map(lambda x: _put(x, self.batch_sharding), batch)

    def place(self, state):
        return jax.tree_util.tree_map(_put, state, self.state_shardings(state))

    def train_step(self, loss_fn, optimizer, *, accum_steps: int = 1):
        body = make_train_step(loss_fn, optimizer, jit=False, accum_steps=accum_steps, shards=self.num_devices)

        def step(state, batch):
            state, metrics = body(state, batch)
            # keep the layout place() chose (XLA could pick another for the outputs)
            return jax.lax.with_sharding_constraint(state, self.state_shardings(state)), metrics

        return Step(self, jax.jit(step, donate_argnums=0), accum_steps, train=True)

    def eval_step(self, loss_fn):
        return Step(self, make_eval_step(loss_fn), 1, train=False)


class ShardMapStrategy(MeshStrategy):
    """Per-device code over the mesh: replicated state, the batch split, an explicit psum."""

    def __init__(self, devices):
        super().__init__(devices)
        self.name = "shard_map"

    def _per_device(self, fn: Callable):
        # check_vma=False: the per-device gradients stay local (with vma checks JAX would insert
        # the cross-device sum itself); the step reduces them explicitly with lax.psum.
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(), check_vma=False)

    def train_step(self, loss_fn, optimizer, *, accum_steps: int = 1):
        body = make_train_step(loss_fn, optimizer, jit=False, accum_steps=accum_steps, axis_name=DATA_AXIS)
        return Step(self, jax.jit(self._per_device(body), donate_argnums=0), accum_steps, train=True)

    def eval_step(self, loss_fn):
        body = make_eval_step(loss_fn, jit=False, axis_name=DATA_AXIS)
        return Step(self, jax.jit(self._per_device(body)), 1, train=False)


class PmapStrategy(Strategy):
    """``jax.pmap``: state with a leading device axis, the batch reshaped to ``[devices, rows/devices, ...]``."""

    name = "pmap"

    def place_batch(self, batch, accum_steps: int = 1):
        self.check_batch(batch, accum_steps)
        n = self.num_devices
        return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(n, -1, *np.shape(x)[1:]), batch)

    def __init__(self, devices):
        super().__init__(devices)
        # In this JAX, pmap runs on shard_map: its outputs carry this sharding. Placing the state
        # with the same one lets the second step reuse the first step's compilation.
        mesh = Mesh(np.array(self.devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))
        self.stacked_sharding = NamedSharding(mesh, P(DATA_AXIS))

    def place(self, state):
        stacked = jax.tree_util.tree_map(
            lambda x: np.broadcast_to(np.asarray(x), (self.num_devices, *np.shape(x))), state)
        return jax.tree_util.tree_map(lambda x: _put(x, self.stacked_sharding), stacked)

    def gather(self, state):
        return super().gather(jax.tree_util.tree_map(lambda x: x[0], state))

    def train_step(self, loss_fn, optimizer, *, accum_steps: int = 1):
        body = make_train_step(loss_fn, optimizer, jit=False, accum_steps=accum_steps, axis_name=DATA_AXIS)
        pmapped = jax.pmap(body, axis_name=DATA_AXIS, devices=self.devices, donate_argnums=0)
        return Step(self, pmapped, accum_steps, finish=lambda out: (out[0], _first(out[1])), train=True)

    def eval_step(self, loss_fn):
        body = make_eval_step(loss_fn, jit=False, axis_name=DATA_AXIS)
        return Step(self, jax.pmap(body, axis_name=DATA_AXIS, devices=self.devices), 1, finish=_first, train=False)


def _first(tree):
    """Device 0's copy of per-device outputs that are identical after the psum."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def _put(x, sharding):
    """``x`` (host or device) as a global array with ``sharding``; works across processes."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)  # several processes: each holds the whole value and places its part
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _to_device(x, device):
    if not isinstance(x, jax.Array):
        return jax.device_put(x, device)
    if x.is_fully_addressable:
        return jax.device_put(x, device)
    if x.sharding.is_fully_replicated:
        return jax.device_put(x.addressable_data(0), device)
    from jax.experimental import multihost_utils
    return jax.device_put(multihost_utils.process_allgather(x, tiled=True), device)
