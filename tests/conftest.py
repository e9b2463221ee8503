import importlib
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests/parity.py helpers
from processes import CHEAP_XLA_FLAGS  # noqa: E402

# Most tests check behaviour on tiny models, where XLA's optimising compile costs far more than
# running the program: they compile cheaply. Modules and tests marked `optimized` -- the parity
# tests, whose tolerances are about the rounding of the code users run, and the tests that train
# for real -- compile as users do. Cheap compiles take two settings:
# * jax_disable_most_optimizations (LLVM at -O0, no expensive passes): a JAX option, switched per
#   module and test (``_compile_optimized``);
# * XLA's older CPU fusion emitters (CHEAP_XLA_FLAGS, about 1.5x faster compiles of the same
#   programs): an XLA flag, read once when a process starts its backend, so it is chosen per
#   process (see USERS_COMPILER below).
# Both reach the subprocesses (scripts, notebooks, forced-device workers) through the environment.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# The training scripts split each batch over one CPU device per core by default (jaxllm.cpu_devices);
# here two xdist workers already share the cores, and a script called in-process must not change
# the device count of the worker's later tests: every test process gets one device unless a test
# asks (tests/test_flags.py checks the default in a subprocess without this variable).
os.environ.setdefault("JAXLLM_CPU_DEVICES", "1")

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


# `make test` runs pytest-xdist with --dist loadgroup --no-loadscope-reorder: groups go to workers
# whole, in collection order. Each file is a group (its module fixtures computed once), except the
# tests marked `optimized`, which form one group handed out first: the worker whose first test is
# optimized compiles as users do all session; every other worker takes the cheap XLA flags and
# never meets an optimized test. Without that grouping (one process, another --dist), a process
# takes the cheap flags only when none of the tests it collected is optimized. After the users'
# group, the longest files go first, so both workers stay busy to the end; test_accumulation reads
# the multidevice runs that test_parallel starts, so it goes last rather than wait on their lock.
USERS_COMPILER = "users-compiler"
RUN_FIRST = ("test_notebooks.py", "test_multihost_jobs.py", "test_parallel.py", "test_bench.py",
             "test_faults.py", "test_scaling.py", "test_scripts.py", "test_lm_main.py", "test_chat.py")
RUN_LAST = ("test_accumulation.py",)


def _optimized(item) -> bool:
    return item.get_closest_marker("optimized") is not None


def _grouped(config) -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ and config.getoption("dist", None) == "loadgroup"


def _take_cheap_flags() -> None:
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise pytest.UsageError("JAX's backend started before the first test: compile flags come too late")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_XLA_FLAGS}".strip()


@pytest.hookimpl(tryfirst=True)  # before xdist names each test's group in its node id
def pytest_collection_modifyitems(config, items):
    def rank(item):
        if _optimized(item):
            return -1
        name = item.path.name
        if name in RUN_FIRST:
            return RUN_FIRST.index(name)
        return len(RUN_FIRST) + (1 if name in RUN_LAST else 0)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
    for item in items:
        item.add_marker(pytest.mark.xdist_group(USERS_COMPILER if _optimized(item) else item.path.name))


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_finish(session):
    if not _grouped(session.config) and session.items and not any(map(_optimized, session.items)):
        _take_cheap_flags()


_worker_compiler = None  # "users" or "cheap", fixed by a grouped worker's first test


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _worker_compiler
    if not _grouped(item.config):
        return
    if _worker_compiler is None:
        _worker_compiler = "users" if _optimized(item) else "cheap"
        if _worker_compiler == "cheap":
            _take_cheap_flags()
    elif _worker_compiler == "cheap" and _optimized(item):
        pytest.fail("an optimized test reached a worker that compiles cheaply: run with "
                    "--dist loadgroup --no-loadscope-reorder, as make test does", pytrace=False)


def pytest_unconfigure(config):
    if _SESSION_DIR is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


def _compile_optimized(optimized: bool) -> None:
    """Switch the compiler mode; a switch clears JAX's caches, so no function compiled in one mode
    is reused in the other (the mode is not part of jit's cache key)."""
    import jax

    disable = not optimized
    if jax.config.values["jax_disable_most_optimizations"] != disable:
        jax.config.update("jax_disable_most_optimizations", disable)
        jax.clear_caches()
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1" if disable else "0"


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
