"""Several processes (hosts), one training run: ``jax.distributed`` and per-process data.

Every process runs the same script. ``initialize()`` connects them (coordinator address,
process count, this process's id -- from arguments or the environment variables
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); afterwards
``jax.devices()`` lists every process's devices and a ``jaxllm.training.parallel`` strategy
built on them spans all hosts. Each process reads only its own rows of every global batch
(``process_rows`` / ``local_rows``) and ``global_batch`` assembles the global array from the
per-process pieces, so no device receives another process's rows; ``ProcessBatches`` does both
for a batch source given to ``fit()``.

    distributed.initialize()                    # before any other JAX call
    strategy = make_strategy("sharded")         # over every process's devices
    data = ProcessBatches(ArrayBatches(windows, global_batch_size, seed=0), strategy.batch_sharding)

On CPU the processes exchange data with gloo (``jax_cpu_collectives_implementation``), which
is how the tests run two processes on one machine; GPUs use NCCL and TPUs their interconnect,
with no change to the code.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def settings(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
             environ: Mapping[str, str] = os.environ) -> tuple[str | None, int, int]:
    """``(coordinator, num_processes, process_id)`` from the arguments, else the environment.

    One process (the default) needs no coordinator. Several need all three, with
    ``0 <= process_id < num_processes``; anything else is a ``ValueError`` naming the problem.
    """
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    num_processes = _as_int(num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES),
                            "num_processes", ENV_NUM_PROCESSES)
    process_id = _as_int(process_id if process_id is not None else environ.get(ENV_PROCESS_ID),
                         "process_id", ENV_PROCESS_ID)
    if num_processes is None:
        num_processes = 1
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"process_id must be 0 for a single process, got {process_id}")
        return coordinator, 1, 0
    if not coordinator:
        raise ValueError(f"{num_processes} processes need a coordinator address (host:port): pass it or set "
                         f"{ENV_COORDINATOR}")
    if process_id is None:
        raise ValueError(f"{num_processes} processes need this process's id: pass it or set {ENV_PROCESS_ID}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must lie in [0, {num_processes - 1}], got {process_id}")
    if ":" not in coordinator:
        raise ValueError(f"the coordinator address must be host:port, got {coordinator!r}")
    return coordinator, num_processes, process_id


def _as_int(value, name: str, env: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} (or {env}) must be an integer, got {value!r}") from None


# what each scheduler JAX detects sets in a process's environment: without one of them, JAX's
# detection (which may query the Kubernetes API or a metadata server) is not consulted at all
SCHEDULER_VARIABLES = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES")


def cluster_processes(environ: Mapping[str, str] = os.environ) -> int:
    """Processes of the cluster job this process was started in, as JAX's own auto-detection sees
    it (SLURM, Open MPI, Cloud TPU, Kubernetes); 1 outside any. The detection is JAX-internal, so
    anything unexpected from it counts as "no cluster" rather than stopping a one-process run."""
    from jaxllm import jax_internals

    try:
        if not jax_internals.running_in_cloud_tpu_vm() and not any(name in environ for name in SCHEDULER_VARIABLES):
            return 1
        return jax_internals.detected_cluster_processes(environ) or 1
    except Exception:  # noqa: BLE001
        return 1


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, local_device_ids=None, timeout_s: int = 300, environ: Mapping[str, str] = os.environ
               ) -> tuple[int, int]:
    """Join the run's processes; returns ``(process_id, num_processes)``.

    Several processes named by the arguments or the ``JAX_*`` variables: ``jax.distributed.initialize``
    with them. Nothing named and a cluster job of several processes detected (``cluster_processes``):
    ``jax.distributed.initialize()`` lets JAX read the cluster's own settings. Otherwise -- one process,
    which ``num_processes=1`` also forces -- a no-op: a bare ``jax.distributed.initialize()`` raises on
    a plain machine. CPU collectives are set to gloo, so forced host devices work across processes
    too. Must run before any JAX computation; idempotent.
    """
    named = num_processes is not None or bool(environ.get(ENV_NUM_PROCESSES))
    coordinator, num_processes, process_id = settings(coordinator, num_processes, process_id, environ)
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    if num_processes == 1 and (named or cluster_processes() == 1):
        return 0, 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes == 1:  # a detected cluster job: JAX reads its coordinator, count and id
        jax.distributed.initialize(local_device_ids=local_device_ids, initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s)
    return jax.process_index(), jax.process_count()


FLAGS = ("--coordinator", "--num-processes", "--process-id")


def add_flags(parser, group=None) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id`` (defaults: the environment), in
    ``group`` (default: a new "multi-host" section of ``parser``'s help)."""
    g = group if group is not None else parser.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", default=None,
                   help=f"host:port of process 0, the same on every process (default ${ENV_COORDINATOR}; "
                        "none for one process)")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"processes in the run (default ${ENV_NUM_PROCESSES}, else what a SLURM / Open MPI / "
                        "Cloud TPU / Kubernetes job says, else 1; 1 forces one process)")
    g.add_argument("--process-id", type=int, default=None, help=f"this process's id (default ${ENV_PROCESS_ID} or 0)")


def initialize_from_args(args) -> tuple[int, int]:
    return initialize(args.coordinator, args.num_processes, args.process_id)


def process_count() -> int:
    """Processes in this run: ``jax.process_count()`` once ``jax.distributed`` has started, else 1
    (without starting a JAX backend)."""
    return jax.process_count() if jax.distributed.is_initialized() else 1


def barrier(name: str) -> None:
    """Wait until every process of the run reaches ``barrier(name)``; nothing for one process."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_rows(global_rows: int, process_id: int | None = None, num_processes: int | None = None) -> slice:
    """The rows of a global batch that process ``process_id`` reads: a contiguous block of
    ``global_rows / num_processes`` (defaults: this process, all processes). With a batch-sharded
    mesh over ``jax.devices()`` (process-major order) these are the rows its devices hold."""
    process_id = jax.process_index() if process_id is None else process_id
    num_processes = jax.process_count() if num_processes is None else num_processes
    if global_rows % num_processes:
        raise ValueError(f"the global batch of {global_rows} rows does not divide by {num_processes} processes")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must lie in [0, {num_processes - 1}], got {process_id}")
    per = global_rows // num_processes
    return slice(process_id * per, (process_id + 1) * per)


def sharding_rows(sharding, global_rows: int) -> slice:
    """The rows of a ``[global_rows, ...]`` array that ``sharding`` puts on this process's devices;
    ValueError unless they form one contiguous block (what ``global_batch`` needs)."""
    blocks = sorted({(rows.start or 0, global_rows if rows.stop is None else rows.stop)
                     for rows, *_ in sharding.addressable_devices_indices_map((global_rows,)).values()})
    for (_, stop), (start, _) in zip(blocks, blocks[1:]):
        if start != stop:
            raise ValueError(f"this process's devices hold rows {blocks} of the batch: not one contiguous block")
    return slice(blocks[0][0], blocks[-1][1])


def local_rows(batch, process_id: int | None = None, num_processes: int | None = None, *, sharding=None):
    """This process's rows of a global host ``batch`` (pytree of arrays ``[rows, ...]``): those
    its devices hold under ``sharding`` when given, else ``process_rows``' block."""
    rows = {int(np.shape(x)[0]) for x in jax.tree_util.tree_leaves(batch)}
    if len(rows) != 1:
        raise ValueError(f"every array in the batch needs the same number of rows, got {sorted(rows)}")
    global_rows = rows.pop()
    take = (sharding_rows(sharding, global_rows) if sharding is not None
            else process_rows(global_rows, process_id, num_processes))
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[take], batch)


def global_batch(local_batch, sharding):
    """Per-process rows ``local_batch`` (pytree, leaves ``[rows / processes, ...]``) -> global
    ``jax.Array``s ``[rows, ...]`` laid out by ``sharding`` (e.g. a strategy's ``batch_sharding``),
    via ``jax.make_array_from_process_local_data``. A strategy's step takes these as they are."""
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                  local_batch)


class ProcessBatches:
    """Wrap a batch source (``ArrayBatches``, ``TokenWindows``: ``next_rows(rows)``,
    ``steps_per_epoch``, ``batch_size``, ``state_dict``) so each ``next()`` reads only this
    process's rows of the global batch (``next_rows``: a memory-mapped source reads no other row
    from disk) and returns them as global arrays laid out by ``sharding`` -- what ``fit()`` feeds a
    strategy's step on several hosts. Every process draws the same global batches (same seed);
    only its own rows are ever read or sent to its devices. The data position is the wrapped source's."""

    def __init__(self, batches, sharding):
        self.batches, self.sharding = batches, sharding
        self.rows = sharding_rows(sharding, batches.batch_size)  # this process's block, the same every step

    @property
    def batch_size(self) -> int:
        return self.batches.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    def next(self):
        return global_batch(self.batches.next_rows(self.rows), self.sharding)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
