"""``parallel`` suite: the device strategies of ``jaxllm.training.parallel`` on forced host devices.

One training step of the Burkov decoder at config A (and GPT-2 at config A) with the global
batch of 16 x 128 tokens, under every strategy (``single``, ``sharded``, ``fsdp``,
``shard_map``, ``pmap``) over all the process's devices, interleaved in one process. On a
CPU the devices are host devices forced with ``--xla_force_host_platform_device_count``
(``python -m jaxllm.bench`` sets one per core; ``--host-devices N`` for more): they share the
cores, so this measures how each strategy's program uses them, not extra hardware. Every
strategy starts from the same params and batch, so their first losses must agree
(``loss0_diff`` against ``single``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.bench import common
from jaxllm.bench.models import config_a, lm_batch

COLUMNS = [("case", "case"), ("strategy", "strategy"), ("devices", "devices"), ("tps", "tokens/s"),
           ("range", "min-max"), ("vs_single", "vs single"), ("first", "1st s"), ("loss0_diff", "loss0 diff")]


def defaults(quick: bool) -> dict[str, Any]:
    return {"families": ["decoder"] if quick else ["decoder", "gpt2"], "strategies": None,
            "rounds": 3 if quick else 10, "warmup": 1 if quick else 2}


def run(opts) -> dict[str, Any]:
    from jaxllm.training.parallel import STRATEGIES

    strategies = opts.strategies or list(STRATEGIES)
    rows = []
    for family in opts.families:
        print(f"[parallel] {family}/A over {len(strategies)} strategies", flush=True)
        rows.extend(bench_family(family, strategies, rounds=opts.rounds, warmup=opts.warmup))
    return {"rows": rows, "table": format_rows(rows)}


def bench_family(family: str, strategies, *, rounds: int, warmup: int, config=None, rows_: int = 16,
                 context: int = 128) -> list[dict[str, Any]]:
    """Rows (one per strategy) for ``family`` at config A, or at ``config`` with a
    ``rows_ x context`` batch."""
    import jax

    from jaxllm.bench.models import Case, jax_loss_fn
    from jaxllm.training import OptimizerConfig, TrainState, make_optimizer
    from jaxllm.training.parallel import make_strategy

    if config is None:
        config, rows_, context = config_a(family)
    loss_fn = jax_loss_fn(Case(family, "A", "", config, None, "lm", {}, 0, "tokens"))
    optimizer = make_optimizer(OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01))
    host_params = jax.tree_util.tree_map(np.asarray, config.init(jax.random.PRNGKey(0)))
    batch = lm_batch(np.random.default_rng(0), config.vocab_size, rows_, context)
    calls, sides = {}, {}
    for name in strategies:
        try:
            strategy = make_strategy(name)
            state = strategy.place(TrainState.create(jax.tree_util.tree_map(jax.numpy.asarray, host_params),
                                                     optimizer, jax.random.PRNGKey(0)))
            step = strategy.train_step(loss_fn, optimizer)
        except Exception as exc:  # e.g. a strategy that needs more devices: report, go on
            sides[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        box = {"state": state}

        def call(step=step, box=box):  # the host batch: each strategy places it its own way
            box["state"], metrics = step(box["state"], batch)
            return float(jax.block_until_ready(metrics["loss"]))

        loss0 = {}
        try:
            first = common.timed_call(lambda: loss0.__setitem__("v", call()))[0]
        except Exception as exc:
            sides[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        sides[name] = {"first_call_s": first, "loss0": loss0["v"], "devices": strategy.num_devices}
        calls[name] = call
    stats = common.interleaved(calls, rounds=rounds, warmup=warmup) if calls else {}
    single = stats.get("single")
    out = []
    for name, side in sides.items():
        row = {"case": f"{family}/A", "strategy": name, "tokens_per_step": rows_ * context, **side}
        if name in stats:
            row.update(stats[name].summary(rows_ * context, "tokens"))
            row["vs_single"] = common.ratio(single.median, stats[name].median) if single else None
            if "single" in sides and "loss0" in sides["single"]:
                row["loss0_diff"] = abs(side["loss0"] - sides["single"]["loss0"])
        out.append(row)
    return out


def format_rows(rows: list[dict[str, Any]]) -> str:
    table = [{"case": r["case"], "strategy": r["strategy"], "devices": r.get("devices"),
              "tps": r.get("tokens_per_s"), "range": common.fmt_range(r.get("tokens_per_s_min"), r.get("tokens_per_s_max")),
              "vs_single": r.get("vs_single"), "first": r.get("first_call_s"), "loss0_diff": r.get("loss0_diff")}
             if "error" not in r else {"case": r["case"], "strategy": r["strategy"], "tps": r["error"][:60]}
             for r in rows]
    return common.format_table(table, COLUMNS)
