"""``compile`` suite: how long a new process waits for its first training step, cold and warm.

Per case (the ``train`` suite's decoder and GPT-2 at configs A and B), two fresh processes run
the same job one after the other, sharing a new, empty persistent compilation cache (the one
every training job turns on, ``jaxllm.compile_cache``):

* ``cold``: the first process compiles the train step and writes it to the cache;
* ``warm``: the second loads it from the cache.

Each process times its first train step (trace + compile or cache load + one step) and the
median of the next steps; the compile overhead is their difference. It also counts the cache's
entries before and after, so a warm run that compiled anyway shows up as new entries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from jaxllm.bench import common

COLUMNS = [("case", "case"), ("cold_first", "cold 1st step s"), ("cold_overhead", "cold overhead s"),
           ("warm_first", "warm 1st step s"), ("warm_overhead", "warm overhead s"), ("median", "step s"),
           ("warm_new_entries", "warm: new cache entries")]
STEPS_AFTER_FIRST = 3


def run(opts) -> dict[str, Any]:
    rows = []
    for family in opts.families:
        for size in opts.sizes:
            print(f"[compile] {family}/{size}", flush=True)
            rows.append(bench_case(family, size))
    return {"rows": rows, "table": format_rows(rows)}


def bench_case(family: str, size: str) -> dict[str, Any]:
    """Cold then warm process on a new cache directory; the row holds both workers' reports."""
    with tempfile.TemporaryDirectory(prefix="jaxllm-compile-bench-") as cache:
        cold = _worker(family, size, cache)
        warm = _worker(family, size, cache)
    return {"case": f"{family}/{size}", "family": family, "size": size, "cold": cold, "warm": warm}


def _worker(family: str, size: str, cache: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    env["JAXLLM_COMPILATION_CACHE"] = cache
    done = subprocess.run([sys.executable, "-m", "jaxllm.bench.compile", family, size], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"compile worker {family}/{size} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _entries(directory: str) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


def measure(family: str, size: str) -> dict[str, Any]:
    """In this (fresh) process: the first and later train steps of the case, with the cache on."""
    import numpy as np

    from jaxllm import compile_cache
    from jaxllm.bench.models import jax_training, make_case

    directory = compile_cache.enable()
    before = _entries(directory) if directory else 0
    one_step, _ = jax_training(make_case(family, size))
    first = common.first_call(one_step)
    median = float(np.median([common.timed_call(one_step)[0] for _ in range(STEPS_AFTER_FIRST)]))
    return {"first_step_s": first, "median_step_s": median, "overhead_s": first - median,
            "cache": directory, "entries_before": before, "entries_after": _entries(directory) if directory else 0}


def format_rows(rows: list[dict[str, Any]]) -> str:
    table = [{"case": r["case"], "cold_first": r["cold"]["first_step_s"], "cold_overhead": r["cold"]["overhead_s"],
              "warm_first": r["warm"]["first_step_s"], "warm_overhead": r["warm"]["overhead_s"],
              "median": r["warm"]["median_step_s"],
              "warm_new_entries": r["warm"]["entries_after"] - r["warm"]["entries_before"]} for r in rows]
    return common.format_table(table, COLUMNS)


def defaults(quick: bool) -> dict[str, Any]:
    return {"families": ["decoder", "gpt2"], "sizes": ["tiny"] if quick else ["tiny", "small"]}


if __name__ == "__main__":  # the worker: python -m jaxllm.bench.compile FAMILY SIZE
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
