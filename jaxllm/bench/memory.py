"""How much memory a compiled step needs, and what mixed precision and remat save.

``step_memory(jitted_fn, *args)`` compiles ``jitted_fn`` for ``args`` (nothing runs) and reads
XLA's buffer assignment: argument, output, aliased (donated) and temporary bytes. Temporary
bytes are the activations and workspace a step holds at its peak: what ``--dtype bfloat16`` and
``--remat`` shrink. On a GPU/TPU the allocator's live numbers
(``jax.local_devices()[0].memory_stats()``) are added; the CPU backend has none.

    python -m jaxllm.bench.memory --model gpt2 --d-model 256 --layers 4 --context 256 --batch 8

prints the table (fp32, bf16, remat, bf16 + remat) for one LM train step.

On CPU, XLA's default scheduler orders work for concurrency, not memory, and runs the
recomputation of a remat-ed block early, so remat shows no saving there;
``memory_scheduler_flags()`` (applied by ``main`` before JAX starts) selects the
memory-minimising scheduler that GPU/TPU compilers use anyway. CPUs also have no bf16
arithmetic: XLA computes bf16 elementwise work in float32 and converts, so the bf16 column on
CPU understates what a GPU saves.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

MIB = 2 ** 20
CPU_MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def memory_scheduler_flags(environ=os.environ) -> None:
    """Add ``CPU_MEMORY_SCHEDULER`` to ``XLA_FLAGS`` (read when JAX's backend starts, so call this
    before any computation; it affects only the CPU backend)."""
    flags = environ.get("XLA_FLAGS", "")
    if "concurrency_optimized_scheduler" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {CPU_MEMORY_SCHEDULER}".strip()


def device_memory_stats(device=None) -> dict | None:
    """The allocator's statistics of ``device`` (default: the first local one), or None (CPU)."""
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return dict(stats) if stats else None


def step_memory(jitted_fn: Callable, *args, **kwargs) -> dict:
    """Compiled memory analysis of ``jitted_fn(*args, **kwargs)`` (a ``jax.jit`` function).

    Returns bytes: ``argument``, ``output``, ``alias`` (outputs written into donated arguments),
    ``temp`` (activations and workspace), ``code``, ``total`` (``argument + output - alias +
    temp``: what the step needs at most, counting donated buffers once) and ``device`` (the
    allocator's statistics, or None on CPU).
    """
    if not hasattr(jitted_fn, "lower"):
        raise ValueError("step_memory needs a jax.jit-compiled function (one with .lower)")
    analysis = jitted_fn.lower(*args, **kwargs).compile().memory_analysis()
    if analysis is None:
        raise ValueError("this backend gives no compiled memory analysis")
    out = {
        "argument": int(analysis.argument_size_in_bytes),
        "output": int(analysis.output_size_in_bytes),
        "alias": int(analysis.alias_size_in_bytes),
        "temp": int(analysis.temp_size_in_bytes),
        "code": int(analysis.generated_code_size_in_bytes),
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["device"] = device_memory_stats()
    return out


VARIANTS = {"fp32": ("float32", False), "bf16": ("bfloat16", False), "remat": ("float32", True),
            "bf16+remat": ("bfloat16", True)}


def train_step_memory(config, *, batch: int, context: int, dtype="float32", remat: bool = False) -> dict:
    """``step_memory`` of one AdamW train step of ``config`` on ``int32[batch, context]`` tokens."""
    import optax

    from jaxllm.training.losses import lm_loss
    from jaxllm.training.precision import mixed_precision
    from jaxllm.training.state import TrainState
    from jaxllm.training.step import make_train_step

    config = config.replace(remat=remat)
    optimizer = optax.adamw(1e-3, weight_decay=0.0)
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)), config.param_shapes())
    tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32)
    step = make_train_step(mixed_precision(lm_loss(config), dtype), optimizer)
    return step_memory(step, state, {"inputs": tokens, "targets": tokens})


def memory_table(config, *, batch: int, context: int) -> list[dict]:
    """One row per variant (fp32, bf16, remat, bf16+remat) with its bytes and temp saved vs fp32."""
    rows = []
    for name, (dtype, remat) in VARIANTS.items():
        mem = train_step_memory(config, batch=batch, context=context, dtype=dtype, remat=remat)
        rows.append({"variant": name, **{k: v for k, v in mem.items() if k != "device"}})
    base = rows[0]["temp"]
    for row in rows:
        row["temp_saved"] = 1.0 - row["temp"] / base if base else 0.0
    return rows


def format_table(rows: list[dict], title: str) -> str:
    lines = [title, "", "| variant | arguments (MiB) | temp (MiB) | total (MiB) | temp saved |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['argument'] / MIB:.1f} | {r['temp'] / MIB:.1f} | {r['total'] / MIB:.1f} "
                     f"| {100 * r['temp_saved']:.0f} % |")
    return "\n".join(lines)


def build_config(model: str, *, vocab_size: int, context: int, d_model: int, layers: int, heads: int):
    """``--model`` (a ``LANGUAGE_MODELS`` name) at these sizes, its first preset's layout, no dropout."""
    from jaxllm.models import language_model

    return language_model(model, None, vocab_size, context, d_model=d_model, layers=layers, heads=heads).with_dropout(0.0)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("gpt2", "decoder"), default="gpt2", help="a LANGUAGE_MODELS name")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    memory_scheduler_flags()  # before JAX's backend starts (no effect if it already has)
    if min(args.vocab_size, args.d_model, args.layers, args.heads, args.context, args.batch) < 1:
        raise ValueError("sizes must all be >= 1")
    config = build_config(args.model, vocab_size=args.vocab_size, context=args.context, d_model=args.d_model,
                          layers=args.layers, heads=args.heads)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(config.param_shapes()))
    rows = memory_table(config, batch=args.batch, context=args.context)
    title = (f"{args.model}: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, vocab "
             f"{args.vocab_size}, {n_params / 1e6:.2f}M params; one AdamW step on batch {args.batch} x "
             f"{args.context} tokens; backend {jax.default_backend()}")
    print(format_table(rows, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
