"""jaxllm.jax_internals reads JAX's private names: each is checked here, so a JAX release that
moves one fails this test by name (the functions that use them would otherwise fall back quietly)."""

import importlib

import jax
import pytest

from jaxllm import jax_internals

PRIVATE_NAMES = [("jax._src.xla_bridge", "backends_are_initialized"), ("jax._src.clusters", "ClusterEnv"),
                 ("jax._src.cloud_tpu_init", "running_in_cloud_tpu_vm")]


@pytest.mark.parametrize("module,name", PRIVATE_NAMES)
def test_the_private_names_exist(module, name):
    assert hasattr(importlib.import_module(module), name), f"JAX moved {module}.{name}: update jaxllm/jax_internals.py"


def test_cluster_detection_reads_what_it_needs():
    from jax._src.clusters import ClusterEnv

    assert ClusterEnv._cluster_types, "JAX moved ClusterEnv._cluster_types"
    for env in ClusterEnv._cluster_types:
        assert hasattr(env, "opt_in_only_method") and callable(env.is_env_present) and callable(env.get_process_count)
    assert jax_internals.running_in_cloud_tpu_vm() is False


def test_backends_started_and_compiled_versions():
    jax.devices()
    assert jax_internals.backends_started() is True
    f = jax.jit(lambda x: x * 2)
    assert jax_internals.compiled_versions(f) == 0
    f(1.0)
    f(jax.numpy.ones(3))
    assert jax_internals.compiled_versions(f) == 2
    assert jax_internals.compiled_versions(lambda x: x) is None
