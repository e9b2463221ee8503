"""Child processes for the tests that need several JAX devices or processes: one way to start
them, their environment, and their logs when they fail.

A JAX process fixes its device count when its backend starts, so a test that needs 4 CPU devices
(or 2 processes of 2) runs its work in children started here: ``XLA_FLAGS`` sets their device
count before JAX is imported, and nothing multi-host leaks in from the parent. No retry: the one
XLA abort that used to need one (the CPU all-reduce deadlock) is fixed in the library
(``jaxllm.training.parallel.MAX_STEPS_IN_FLIGHT``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Sequence

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTIHOST = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
DEVICE_COUNT = "--xla_force_host_platform_device_count"
# the cheap mode's XLA flag for children (tests/conftest.py): XLA's older CPU fusion emitters
# compile the suite's tiny programs about 1.5x faster
CHEAP_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def environment(devices: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for a child on the CPU: the package importable, no multi-host
    settings and no device count of the parent's, ``devices`` CPU devices when given."""
    env = {k: v for k, v in os.environ.items() if k not in MULTIHOST}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT)]  # compile flags stay
    if devices is not None:
        flags.append(f"{DEVICE_COUNT}={devices}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.update(extra)
    return env


def compile_flags(xla_flags: str, *, cheap: bool) -> str:
    """``xla_flags`` with or without CHEAP_XLA_FLAGS."""
    flags = [f for f in xla_flags.split() if f not in CHEAP_XLA_FLAGS.split()]
    return " ".join(flags + (CHEAP_XLA_FLAGS.split() if cheap else []))


def users_compiler(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the suite's cheap-compile settings: a child that compiles as users' processes do."""
    env = {k: v for k, v in env.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
    return {**env, "XLA_FLAGS": compile_flags(env.get("XLA_FLAGS", ""), cheap=False)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multihost(process_id: int, processes: int, address: str) -> dict[str, str]:
    """The ``JAX_*`` variables that make a child process ``process_id`` of ``processes``."""
    return {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(process_id)}


def start(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python ARGS`` in the repository, its output captured."""
    return subprocess.Popen([sys.executable, *args], env=env if env is not None else environment(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: Sequence[subprocess.Popen], timeout_s: float, *, returncode: int = 0) -> list[str]:
    """Each process's stdout once all have ended with ``returncode``; a test failure with the
    stderr tail of the first that did not, or that ran past ``timeout_s`` (all are killed then)."""
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for i, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"process {i} ran past {timeout_s:.0f} s:\n{err[-3000:]}")
            if proc.returncode != returncode:
                pytest.fail(f"process {i} exited {proc.returncode}, expected {returncode}:\n{err[-3000:]}")
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def last_json(stdout: str) -> dict:
    """The JSON object a worker prints as its last line."""
    return json.loads(stdout.strip().splitlines()[-1])
