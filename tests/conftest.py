import importlib
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests/parity.py helpers
import processes  # noqa: E402

# Most tests check behaviour on tiny models, where XLA's optimising compile costs far more than
# running the program: they compile with jax_disable_most_optimizations (LLVM at -O0, no expensive
# passes; about 1.6x less CPU for the suite). Modules and tests marked `optimized` -- the parity
# tests, whose tolerances are about the rounding of the code users run, and the few tests that train
# for real -- compile as users do. The mode reaches the subprocesses (scripts, notebooks,
# forced-device workers) through the environment; there a cheap mode also takes XLA's older CPU
# fusion emitters (processes.CHEAP_XLA_FLAGS, see _compile_optimized).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# The training scripts split each batch over one CPU device per core by default (jaxllm.cpu_devices);
# here two xdist workers already share the cores, and a script called in-process must not change
# the device count of the worker's later tests: every test process gets one device unless a test
# asks (tests/test_flags.py checks the default in a subprocess without this variable).
os.environ.setdefault("JAXLLM_CPU_DEVICES", "1")

# PyTorch's OpenMP threads spin while they wait for work: with one xdist worker per core, each
# worker's spare thread burns the other worker's core (one thread: about 12% less CPU for the
# torch-heavy files). Set before any test imports torch; the children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# One directory per test session, shared by the xdist workers and every process they start
# (created by the first process to import this file -- pytest itself, before the workers -- and
# removed by it at the end):
# * a persistent XLA compilation cache: a test that builds the same tiny model as another (or a
#   notebook kernel, a script run in a subprocess) loads the compiled program instead of
#   compiling it again;
# * results computed once per session for several test files (tests/multidevice.py).
_SESSION_DIR = None
if "JAXLLM_TEST_SESSION_DIR" not in os.environ:
    _SESSION_DIR = tempfile.mkdtemp(prefix="jaxllm-tests-")
    os.environ["JAXLLM_TEST_SESSION_DIR"] = _SESSION_DIR
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_SESSION_DIR, "xla-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "optimized: compile with XLA's default optimisations (parity tests, real training)")


# Under --dist loadfile --no-loadscope-reorder, xdist hands out whole files in collection order
# (without the flag it sorts them by test count): the longest first keeps both workers busy to the
# end; test_accumulation reads the multidevice runs that test_parallel starts, so it goes last
# rather than wait on their lock.
RUN_FIRST = ("test_notebooks.py", "test_multihost_jobs.py", "test_parallel.py", "test_scripts.py", "test_bench.py",
             "test_generate_cache.py", "test_lm_main.py", "test_faults.py", "test_chat.py", "test_classify.py",
             "test_scaling.py")
RUN_LAST = ("test_accumulation.py",)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        if name in RUN_FIRST:
            return RUN_FIRST.index(name)
        return len(RUN_FIRST) + (1 if name in RUN_LAST else 0)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept


def pytest_unconfigure(config):
    if _SESSION_DIR is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


def _compile_optimized(optimized: bool) -> None:
    """Switch the compiler mode; a switch clears JAX's caches, so no function compiled in one mode
    is reused in the other (the mode is not part of jit's cache key). The children a test starts
    (scripts, notebooks, forced-device workers) get its mode through the environment; a cheap child
    also gets ``processes.CHEAP_XLA_FLAGS``, which this process must never read: XLA reads its
    flags once, so this process's backend is started first, with the flags it was given."""
    import jax

    jax.devices()
    disable = not optimized
    if jax.config.values["jax_disable_most_optimizations"] != disable:
        jax.config.update("jax_disable_most_optimizations", disable)
        jax.clear_caches()
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1" if disable else "0"
    os.environ["XLA_FLAGS"] = processes.compile_flags(os.environ.get("XLA_FLAGS", ""), cheap=disable)


@pytest.fixture(scope="module", autouse=True)
def module_compiler_mode(request):
    """The module's mode, set before its other (module-scoped) fixtures run."""
    _compile_optimized(request.node.get_closest_marker("optimized") is not None)


@pytest.fixture(autouse=True)
def test_compiler_mode(request, module_compiler_mode):
    """A test marked on its own (one that trains for real in a module that does not) gets its mode."""
    _compile_optimized(request.node.get_closest_marker("optimized") is not None)


@pytest.fixture(scope="session")
def multidevice_results():
    """The 4-forced-device runs of tests/multidevice.py (test_parallel.py and test_accumulation.py
    share them: computed once per session, whichever worker asks first)."""
    import multidevice

    return multidevice.results(4)


@pytest.fixture
def load_script():
    """The job module ``jaxllm.jobs.<name>``, so tests call its ``main(argv)`` in-process."""

    def load(name: str):
        return importlib.import_module(f"jaxllm.jobs.{name}")

    return load
