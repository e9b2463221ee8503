"""``train`` suite: training throughput, JAX vs the PyTorch twin, every family at two sizes.

Per case, in one process and interleaved round by round (``common.interleaved``):

* ``jax``: ``jaxllm.training.make_train_step`` (jitted, state donated), batch already on device;
* ``jax_dp``: the same step data-parallel over the process's host devices
  (``jaxllm.training.parallel.make_strategy("sharded")``: ``NamedSharding`` over a 1-D mesh),
  when the process has several devices (``python -m jaxllm.bench`` forces one host device per
  core unless told otherwise);
* ``torch_eager``: the twin's five-step loop (``zero_grad``, forward, loss, ``backward``,
  ``step``);
* ``torch_compile``: that same function under ``torch.compile`` (model, backward and
  optimiser step), on its own copy of the twin.

All sides start from the same weights and minimise the same loss with AdamW (lr 1e-3,
weight decay 0.01, passed explicitly to both); the first losses are compared (``loss0_diff``).
The first call of each compiled side is timed on its own (``first_call_s``: trace + compile +
one step). Throughput is units (tokens or examples) per second from the median step time.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from jaxllm.bench import common
from jaxllm.bench.models import FAMILIES, SIZES, Case, jax_loss_fn, make_case, param_count, torch_batch, \
    torch_loss_fn, twin_and_params

LR, WEIGHT_DECAY = 1e-3, 0.01

COLUMNS = [("case", "case"), ("unit", "unit/s"), ("jax", "JAX"), ("jax_range", "JAX min-max"),
           ("eager", "torch eager"), ("compiled", "torch.compile"), ("vs_eager", "JAX/eager"),
           ("vs_compile", "JAX/compile"), ("jax_dp", "JAX dp"), ("dp_gain", "dp/JAX"),
           ("jax_first", "JAX 1st s"), ("compile_first", "compile 1st s"), ("cpu_vs_eager", "CPU eager/JAX")]


def run(opts) -> dict[str, Any]:
    """Run every (family, size) in ``opts``; returns the JSON payload (rows + table text)."""
    if getattr(opts, "gpu_preset", False):
        from jaxllm.bench import gpu

        return gpu.run_train(opts)
    rows = []
    for family in opts.families:
        for size in opts.sizes:
            case = make_case(family, size)
            compile_torch = opts.torch_compile == "all" or family in opts.torch_compile.split(",")
            print(f"[train] {case.name}: {case.label}", flush=True)
            rows.append(bench_case(case, rounds=opts.rounds, warmup=opts.warmup, torch_compile=compile_torch,
                                   data_parallel=opts.data_parallel))
    return {"rows": rows, "table": format_rows(rows)}


def bench_case(case: Case, *, rounds: int, warmup: int, torch_compile: bool = True,
               data_parallel: bool = True) -> dict[str, Any]:
    """Time one case; returns its JSON row (per side: ``common.Stats.summary`` plus
    ``first_call_s`` and ``loss0``)."""
    import jax
    import torch

    from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step

    twin, params = twin_and_params(case)
    twin.train()
    compiled_twin = copy.deepcopy(twin) if torch_compile else None
    host_params = jax.tree_util.tree_map(np.asarray, params)  # each JAX side gets its own (donated) copy
    optimizer = make_optimizer(OptimizerConfig("adamw", lr=LR, weight_decay=WEIGHT_DECAY))
    loss_fn = jax_loss_fn(case)
    sides: dict[str, Any] = {}
    calls: dict[str, Any] = {}

    # JAX, one device: the default every script uses
    step = make_train_step(loss_fn, optimizer)
    box = {"state": TrainState.create(jax.tree_util.tree_map(jax.numpy.asarray, host_params), optimizer,
                                      jax.random.PRNGKey(0))}
    batch = jax.device_put(case.batch)

    def jax_step():
        box["state"], metrics = step(box["state"], batch)
        return jax.block_until_ready(metrics["loss"])

    loss0 = {}
    first = common.timed_call(lambda: loss0.__setitem__("jax", float(jax_step())))[0]
    sides["jax"] = {"first_call_s": first, "loss0": loss0["jax"]}
    calls["jax"] = jax_step

    # JAX, data parallel over the host devices
    devices = jax.devices()
    rows = next(iter(case.batch.values())).shape[0]
    if data_parallel and len(devices) > 1 and rows % len(devices) == 0:
        try:
            calls["jax_dp"], sides["jax_dp"] = _data_parallel(loss_fn, optimizer, host_params, case.batch)
        except Exception as exc:  # another helper's module: report, never abort the suite
            sides["jax_dp"] = {"error": f"{type(exc).__name__}: {exc}"}

    # PyTorch eager and compiled
    tbatch = torch_batch(case)
    tloss = torch_loss_fn(case)

    def five_steps(model, opt):
        def step_fn():
            opt.zero_grad(set_to_none=True)
            loss = tloss(model, tbatch)
            loss.backward()
            opt.step()
            return loss.detach()
        return step_fn

    eager = five_steps(twin, torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=WEIGHT_DECAY))
    first = common.timed_call(lambda: loss0.__setitem__("torch_eager", float(eager())))[0]
    sides["torch_eager"] = {"first_call_s": first, "loss0": loss0["torch_eager"]}
    calls["torch_eager"] = lambda: eager().item()
    if compiled_twin is not None:
        compiled = torch.compile(five_steps(
            compiled_twin, torch.optim.AdamW(compiled_twin.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)))
        try:
            first = common.timed_call(lambda: loss0.__setitem__("torch_compile", float(compiled())))[0]
            sides["torch_compile"] = {"first_call_s": first, "loss0": loss0["torch_compile"]}
            calls["torch_compile"] = lambda: compiled().item()
        except Exception as exc:  # no C++ compiler, unsupported op...: report and go on
            sides["torch_compile"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    stats = common.interleaved(calls, rounds=rounds, warmup=warmup)
    for name, s in stats.items():
        sides[name].update(s.summary(case.units, case.unit))
    row = {"case": case.name, "label": case.label, "family": case.family, "size": case.size,
           "unit": case.unit, "units_per_step": case.units, "params": param_count(params), **sides}
    row["loss0_diff"] = abs(loss0["jax"] - loss0["torch_eager"])
    row["ratios"] = _ratios(row)
    return row


def _data_parallel(loss_fn, optimizer, host_params, host_batch):
    """(timed call, side dict) of the ``sharded`` strategy over every device of the process."""
    import jax

    from jaxllm.training import TrainState
    from jaxllm.training.parallel import make_strategy

    strategy = make_strategy("sharded")
    state = strategy.place(TrainState.create(jax.tree_util.tree_map(jax.numpy.asarray, host_params), optimizer,
                                             jax.random.PRNGKey(0)))
    step = strategy.train_step(loss_fn, optimizer)
    batch = strategy.place_batch(host_batch)
    box = {"state": state}

    def dp_step():
        box["state"], metrics = step(box["state"], batch)
        return jax.block_until_ready(metrics["loss"])

    first = common.timed_call(dp_step)[0]
    return dp_step, {"first_call_s": first, "devices": strategy.num_devices, "strategy": strategy.name}


def _ratios(row) -> dict[str, float | None]:
    """Speed ratios (> 1: the first named side is faster), from median step times."""
    med = lambda side: row.get(side, {}).get("median_s")
    cpu = lambda side: row.get(side, {}).get("cpu_median_s")
    return {"jax_vs_eager": common.ratio(med("torch_eager"), med("jax")),
            "jax_vs_compile": common.ratio(med("torch_compile"), med("jax")),
            "dp_vs_jax": common.ratio(med("jax"), med("jax_dp")),
            "best_jax_vs_eager": common.ratio(med("torch_eager"), min(filter(None, [med("jax"), med("jax_dp")]))),
            "cpu_eager_vs_jax": common.ratio(cpu("torch_eager"), cpu("jax"))}


def format_rows(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        per_s = lambda side: r.get(side, {}).get(f"{r['unit']}_per_s")
        jax_side = r["jax"]
        table.append({
            "case": r["case"], "unit": r["unit"], "jax": per_s("jax"),
            "jax_range": common.fmt_range(jax_side.get(f"{r['unit']}_per_s_min"), jax_side.get(f"{r['unit']}_per_s_max")),
            "eager": per_s("torch_eager"), "compiled": per_s("torch_compile"),
            "vs_eager": r["ratios"]["jax_vs_eager"], "vs_compile": r["ratios"]["jax_vs_compile"],
            "jax_dp": per_s("jax_dp"), "dp_gain": r["ratios"]["dp_vs_jax"],
            "jax_first": jax_side.get("first_call_s"), "compile_first": r.get("torch_compile", {}).get("first_call_s"),
            "cpu_vs_eager": r["ratios"]["cpu_eager_vs_jax"]})
    return common.format_table(table, COLUMNS)


def defaults(quick: bool) -> dict[str, Any]:
    """The suite's default families, sizes and rounds (``--quick``: tiny sizes, few rounds, no
    ``torch.compile``; otherwise ``torch.compile`` for every family but the RNN)."""
    if quick:
        return {"families": list(FAMILIES), "sizes": ["tiny"], "rounds": 3, "warmup": 1, "torch_compile": "none"}
    # torch.compile unrolls the RNN twin's Python time loop (minutes of compiling): ask for it by name
    return {"families": list(FAMILIES), "sizes": list(SIZES), "rounds": 10, "warmup": 2,
            "torch_compile": ",".join(f for f in FAMILIES if f != "rnn")}
