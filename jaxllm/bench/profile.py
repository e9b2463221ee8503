"""``profile`` suite: where a training step's and a decoded token's time goes, by XLA operation.

Per transformer case (``--families decoder,gpt2``, ``--sizes tiny,small``: the ``train`` suite's
configs A and B) it runs, under ``jax.profiler.trace``, a one-device training step and a
``generate`` call per ``--batches`` size (a ``--prompt-tokens`` prompt continued by
``--new-tokens``), each ``--rounds`` times after one untimed call. XLA's CPU runtime records one
event per executed operation (named by the HLO instruction, loop bodies included); the events
are read back from the Perfetto trace and summed by operation kind, the name without its number
(``ynn_fusion.12`` counts as ``ynn_fusion``: YNNPACK's matmuls; ``dot``: XLA's own; ``copy`` and
``transpose`` fusions: layout changes). Rows give ms per step or per new token and the share of
the summed operation time (operations on the two cores can overlap, so the sum may exceed the
wall time). ``top_ops`` lists the costliest single operations with the JAX op each came from
(the HLO's ``op_name``).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any

import numpy as np

COLUMNS = [("case", "case"), ("what", "what"), ("op", "XLA operation kind"), ("ms", "ms per unit"),
           ("share", "share %"), ("calls", "calls per unit")]
TOP_KINDS = 8
TOP_OPS = 5
CONTAINERS = ("while", "conditional", "call")  # their events span the operations inside them


def defaults(quick: bool) -> dict[str, Any]:
    if quick:
        return {"families": ["gpt2"], "sizes": ["tiny"], "batches": [1], "rounds": 2, "warmup": 1}
    return {"families": ["decoder", "gpt2"], "sizes": ["small"], "batches": [1, 8], "rounds": 3, "warmup": 1}


def run(opts) -> dict[str, Any]:
    import jax

    if jax.default_backend() != "cpu":
        raise ValueError("the profile suite reads XLA's CPU operation events; on a GPU use jax.profiler with XProf")
    rows, tops = [], []
    for family in opts.families:
        if family not in ("decoder", "gpt2"):
            raise ValueError(f"profile covers families decoder and gpt2, got {family!r}")
        for size in opts.sizes:
            print(f"[profile] {family}/{size}", flush=True)
            for what, (call, units, hlo) in _workloads(family, size, opts).items():
                kinds, ops = _profile(call, opts.rounds)
                case = f"{family}/{size}"
                rows += _kind_rows(case, what, kinds, units * opts.rounds)
                names = _op_names(hlo())
                tops += [{"case": case, "what": what, "op": name, "source": names.get(name, ""),
                          "ms": t / 1e3 / (units * opts.rounds)} for name, t in ops.most_common(TOP_OPS)]
    from jaxllm.bench import common

    table = common.format_table(rows, COLUMNS)
    table += "\n\ncostliest single operations:\n" + "\n".join(
        f"  {t['case']} {t['what']}: {t['op']} {t['ms']:.3f} ms  {t['source']}" for t in tops)
    return {"rows": rows, "top_ops": tops, "table": table}


def _workloads(family, size, opts):
    """{what: (call, units per call, compiled HLO text)}: one training step (units: 1 step) and
    one generate call per batch size (units: its new tokens)."""
    import jax

    from jaxllm import generate as gen
    from jaxllm.bench.models import config_a, config_b, jax_training, make_case

    train, train_hlo = jax_training(make_case(family, size))
    work = {"train step": (train, 1, train_hlo)}
    config = (config_a if size in ("tiny", "A") else config_b)(family)[0]
    params = config.init(jax.random.PRNGKey(0))
    width = opts.prompt_tokens + opts.new_tokens
    for rows in opts.batches:
        prompts = np.random.default_rng(0).integers(0, config.vocab_size, (rows, opts.prompt_tokens)).tolist()
        kwargs = dict(max_new_tokens=opts.new_tokens, key=jax.random.PRNGKey(0), max_len=width)

        def decode(prompts=prompts, kwargs=kwargs):
            gen.generate(config, params, prompts, **kwargs)

        def hlo(prompts=prompts):
            tokens, lengths, cache, sampling = gen._prepare(config, prompts, opts.new_tokens, 0.0, None, None, None,
                                                            width)
            return gen._generate.lower(config, params, tokens, lengths, cache, jax.random.PRNGKey(0),
                                       max_new_tokens=opts.new_tokens, eos_id=None, **sampling).compile().as_text()

        work[f"decode b{rows}"] = (decode, opts.new_tokens, hlo)
    return work


def _profile(call, rounds: int) -> tuple[collections.Counter, collections.Counter]:
    """Run ``call`` once untimed, then ``rounds`` times traced; -> (µs by operation kind with a
    ``calls`` counter under ``(kind, "calls")``, µs by single operation)."""
    import jax

    call()
    with tempfile.TemporaryDirectory(prefix="jaxllm-profile-") as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(rounds):
                call()
        paths = glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True)
        if not paths:
            raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {directory}")
        with gzip.open(paths[0]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds, ops = collections.Counter(), collections.Counter()
    for event in events:
        op = (event.get("args") or {}).get("hlo_op")
        if event.get("ph") != "X" or not op or op.split(".")[0] in CONTAINERS:
            continue
        kind = re.sub(r"\.\d+$", "", op)
        kinds[kind] += event.get("dur", 0.0)
        kinds[(kind, "calls")] += 1
        ops[op] += event.get("dur", 0.0)
    if not ops:
        raise RuntimeError("the trace holds no XLA operation events: this jaxlib's CPU runtime did not record them")
    return kinds, ops


def _kind_rows(case: str, what: str, kinds: collections.Counter, units: int) -> list[dict[str, Any]]:
    times = {k: t for k, t in kinds.items() if isinstance(k, str)}
    total = sum(times.values())
    ranked = sorted(times, key=times.get, reverse=True)
    rows = [{"case": case, "what": what, "op": k, "ms": times[k] / 1e3 / units, "share": 100 * times[k] / total,
             "calls": kinds[(k, "calls")] / units} for k in ranked[:TOP_KINDS]]
    rest = ranked[TOP_KINDS:]
    if rest:
        rest_time = sum(times[k] for k in rest)
        rows.append({"case": case, "what": what, "op": f"{len(rest)} other kinds", "ms": rest_time / 1e3 / units,
                     "share": 100 * rest_time / total, "calls": sum(kinds[(k, "calls")] for k in rest) / units})
    return rows


def _op_names(hlo: str) -> dict[str, str]:
    """Instruction name -> the ``op_name`` of its metadata (the JAX source op), from compiled HLO."""
    names = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", hlo, re.MULTILINE):
        names[m.group(1)] = m.group(2)
    return names

