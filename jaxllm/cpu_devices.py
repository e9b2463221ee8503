"""One JAX CPU device per core for the training jobs.

On a CPU the data-parallel split of a batch over one host device per core trains the
transformers 1.13-1.42x and the CNN 2.4x faster than one device using every core (2-core EPYC), so
those training scripts ask for it by default (the tiny logistic regression, MLP and Elman RNN run
faster on one device and keep it): ``--cpu-devices N`` or ``$JAXLLM_CPU_DEVICES`` choose
another count (1 = one device). It must be set before JAX starts its backends (``jax_num_cpu_devices``);
a count already chosen -- ``XLA_FLAGS=--xla_force_host_platform_device_count``, the config option,
or a backend already running in this process -- is left alone. It only concerns JAX's CPU
devices: on a GPU or TPU machine the accelerators are the devices and nothing changes.
"""

from __future__ import annotations

import os

ENV = "JAXLLM_CPU_DEVICES"


def request(count: int | None = None, *, per_core: bool = True) -> int | None:
    """Ask for ``count`` CPU devices (default ``$JAXLLM_CPU_DEVICES``, else one per core, or one
    with ``per_core=False``); returns the count asked for, or None when the count was already fixed
    and is left alone."""
    import jax

    from jaxllm.jax_internals import backends_started

    if count is None and os.environ.get(ENV):
        try:
            count = int(os.environ[ENV])
        except ValueError:
            raise ValueError(f"${ENV} must be a whole number of devices >= 1, got {os.environ[ENV]!r}") from None
    if count is not None and count < 1:
        raise ValueError(f"the CPU device count must be >= 1, got {count}")
    if backends_started() or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") \
            or jax.config.values.get("jax_num_cpu_devices", -1) not in (-1, None):
        return None
    count = count or (os.cpu_count() or 1 if per_core else 1)
    jax.config.update("jax_num_cpu_devices", count)
    return count
