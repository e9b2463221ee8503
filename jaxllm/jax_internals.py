"""The three things jaxllm needs from JAX that JAX has no public API for, each behind one function.

``tests/test_jax_internals.py`` checks every private name used here, so a JAX release that moves
one fails that test by name instead of silently changing what these functions answer.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping


def backends_started() -> bool:
    """Whether JAX has started its backends in this process (after which the CPU device count is fixed)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def detected_cluster_processes(environ: Mapping[str, str] = os.environ) -> int | None:
    """The process count of the cluster job JAX's own auto-detection finds (Cloud TPU, SLURM, Open
    MPI, Kubernetes), or None outside any. Only consulted when the caller has seen a sign of one:
    some detections query a metadata server or the Kubernetes API."""
    from jax._src.clusters import ClusterEnv

    env = next((e for e in ClusterEnv._cluster_types if not e.opt_in_only_method and e.is_env_present()), None)
    return int(env.get_process_count()) if env is not None else None


def running_in_cloud_tpu_vm() -> bool:
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm as running

    return bool(running)


def compiled_versions(fn: Callable) -> int | None:
    """How many compiled versions a ``jax.jit`` function holds (None for anything else, e.g. pmap)."""
    size = getattr(fn, "_cache_size", None)
    return size() if callable(size) else None
