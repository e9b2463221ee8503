"""JAX's persistent compilation cache, on by default for every ``jaxllm`` job.

Every new process compiles its jitted functions from scratch (a config-B GPT-2 training step takes
7-8 s on 2 CPU cores); with the cache, a second process running the same job loads the compiled
programs from disk instead (0.4 s for that step). XLA keys each entry by the program, the
compiler options and the device, so a change of model, shapes, flags or JAX version simply
compiles anew.

Where: ``$JAXLLM_COMPILATION_CACHE`` if set, else ``$XDG_CACHE_HOME/jaxllm/xla`` (default
``~/.cache/jaxllm/xla``). A cache directory already chosen for JAX (``JAX_COMPILATION_CACHE_DIR``
or ``jax.config``) is left as it is. ``--no-compile-cache`` (every script) or
``JAXLLM_COMPILATION_CACHE=off`` turns it off; deleting the directory is always safe.
"""

from __future__ import annotations

import os

OFF = ("", "0", "off", "false", "no", "none")
MIN_COMPILE_SECONDS = 0.2  # cache what takes noticeable time to compile, not every tiny helper


def default_directory() -> str | None:
    """The cache directory this process would use (None: turned off by the environment)."""
    chosen = os.environ.get("JAXLLM_COMPILATION_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in OFF else os.path.expanduser(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxllm", "xla")


def enable(enabled: bool = True) -> str | None:
    """Turn the persistent cache on (unless ``enabled`` is False or the environment turns it off);
    returns the directory in use, or None. Safe to call more than once."""
    import jax

    current = jax.config.values.get("jax_compilation_cache_dir")
    if current:  # the user (or the test suite) already chose one
        return current
    directory = default_directory() if enabled else None
    if directory is None:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:  # an unwritable home must not stop a run: it only compiles more
        print(f"note: no compilation cache ({directory}: {exc.strerror or exc})")
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory
