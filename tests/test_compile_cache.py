"""The persistent compilation cache every script turns on (jaxllm.compile_cache): where it lives,
that a run writes compiled programs there and a second run reads them, and that
--no-compile-cache / JAXLLM_COMPILATION_CACHE=off keep it out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jaxllm import compile_cache

ROOT = Path(__file__).resolve().parents[1]


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXLLM_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_directory() == str(tmp_path / "jaxllm" / "xla")
    monkeypatch.setenv("JAXLLM_COMPILATION_CACHE", str(tmp_path / "mine"))
    assert compile_cache.default_directory() == str(tmp_path / "mine")
    for off in ("off", "0", "", "None"):
        monkeypatch.setenv("JAXLLM_COMPILATION_CACHE", off)
        assert compile_cache.default_directory() is None


def _linreg(out: Path, cache: Path, *flags: str) -> subprocess.CompletedProcess:
    """train/linreg.py in a fresh process with only our cache setting (not the suite's own cache)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAXLLM_COMPILATION_CACHE=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run([sys.executable, str(ROOT / "train" / "linreg.py"), "--epochs", "3", "--no-progress",
                           "--out", str(out), *flags], env=env, capture_output=True, text=True, timeout=300)


def entries(cache: Path) -> set[str]:
    return {p.name for p in cache.rglob("*") if p.is_file()} if cache.exists() else set()


def test_a_run_fills_the_cache_and_a_second_run_reuses_it(tmp_path):
    cache = tmp_path / "cache"
    first = _linreg(tmp_path / "a", cache)
    assert first.returncode == 0, first.stderr
    written = entries(cache)
    assert written, "the first run wrote no compiled program"
    second = _linreg(tmp_path / "b", cache)
    assert second.returncode == 0, second.stderr
    assert entries(cache) == written  # the same programs: read back, nothing compiled anew


def test_no_compile_cache_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    run = _linreg(tmp_path / "a", cache, "--no-compile-cache")
    assert run.returncode == 0, run.stderr
    assert entries(cache) == set()
