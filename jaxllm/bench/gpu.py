"""``--gpu-preset``: GPT-2 124M in bfloat16 on one accelerator.

* ``train``: tokens/s of the AdamW training step (``make_train_step`` on ``mixed_precision(lm_loss)``:
  bf16 activations and matmuls, fp32 master weights and optimiser state, state donated), batch
  ``--gpu-batch`` rows of 1,024 tokens, dropout 0 (as nanoGPT's benchmark), and model-FLOPs
  utilisation counted as nanoGPT's ``estimate_mfu``: ``6 N + 12 L d T`` FLOPs per token, ``N``
  every parameter but the position table (the output head counts), ``T`` the context, against
  ``--peak-tflops`` (default: the device's known bf16 dense peak, ``PEAK_BF16_TFLOPS``);
* ``generate``: ms/token of cached greedy decoding (``jaxllm.generate``) at ``--batches``.

On a CPU the preset refuses to run (124M parameters in bf16 on a CPU measure nothing a user
wants); ``measure_train`` / ``measure_generate`` take any GPT-2 config, so the CPU smoke test runs
the same code on a tiny one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.bench import common

# bf16 dense tensor-core peaks (TFLOP/s) by device-kind substring, from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0, "TPU v4": 275.0}
CONTEXT = 1024
COLUMNS_TRAIN = [("case", "case"), ("tokens_per_s", "tokens/s"), ("step_ms", "step ms"), ("mfu", "MFU"),
                 ("peak", "peak TFLOP/s"), ("first", "1st step s")]
COLUMNS_GENERATE = [("case", "case"), ("ms_per_token", "ms/token"), ("first", "1st call s")]


def preset_config():
    from jaxllm.models.gpt2 import gpt2_124m

    return gpt2_124m().with_dropout(0.0)


def flops_per_token(config, params) -> float:
    """nanoGPT's count: ``6 N + 12 L d T`` with N all parameters except the position table."""
    import jax

    n = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    n -= config.max_positions * config.width  # the learned position table does no matmul work
    return 6.0 * n + 12.0 * config.num_blocks * config.width * config.context_limit


def device_peak_tflops(device_kind: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name.lower() in device_kind.lower()), None)


def _require_accelerator():
    import jax

    if jax.default_backend() == "cpu":
        raise ValueError("--gpu-preset benchmarks GPT-2 124M on a GPU or TPU; JAX sees only the CPU here "
                         "(install jax[cuda12] on a GPU machine, or drop --gpu-preset)")


def measure_train(config, rows: int, *, rounds: int, warmup: int, dtype: str = "bfloat16",
                  peak_tflops: float | None = None) -> dict[str, Any]:
    """One row: the training step of ``config`` on ``rows`` x ``context_limit`` random tokens."""
    import jax

    from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step
    from jaxllm.training.losses import lm_loss
    from jaxllm.training.precision import mixed_precision

    context = config.context_limit
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (rows, context + 1)).astype(np.int32)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    optimizer = make_optimizer(OptimizerConfig("adamw", lr=6e-4, weight_decay=0.1))
    params = config.init(jax.random.PRNGKey(0))
    fpt = flops_per_token(config, params)
    box = {"state": TrainState.create(params, optimizer, jax.random.PRNGKey(0))}
    step = make_train_step(mixed_precision(lm_loss(config), dtype), optimizer)

    def one_step():
        box["state"], metrics = step(box["state"], batch)
        return jax.block_until_ready(metrics["loss"])

    first = common.first_call(one_step)
    stats = common.interleaved({"step": one_step}, rounds=rounds, warmup=warmup)["step"]
    tokens_per_s = rows * context / stats.median
    device = jax.devices()[0]
    peak = device_peak_tflops(getattr(device, "device_kind", ""), peak_tflops)
    return {"case": f"gpt2 d{config.width} L{config.num_blocks} {dtype} {rows}x{context}",
            "device": getattr(device, "device_kind", str(device)), "tokens_per_s": tokens_per_s,
            "step_ms": stats.median * 1e3, "first": first, "flops_per_token": fpt, "peak": peak,
            "mfu": None if peak is None else fpt * tokens_per_s / (peak * 1e12),
            "loss": float(one_step()), **{f"step_{k}": v for k, v in stats.summary().items()}}


def measure_generate(config, batch: int, *, new_tokens: int, prompt_tokens: int, dtype: str = "bfloat16") -> dict[str, Any]:
    """One row: greedy cached decoding of ``new_tokens`` after a ``prompt_tokens`` prompt, ms per token."""
    import jax

    from jaxllm.generate import generate
    from jaxllm.training.precision import cast_floats, compute_dtype

    params = cast_floats(config.init(jax.random.PRNGKey(0)), compute_dtype(dtype))
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_tokens)).tolist()

    def decode():
        return jax.block_until_ready(generate(config, params, prompts, max_new_tokens=new_tokens,
                                              key=jax.random.PRNGKey(0)))

    first = common.first_call(decode)
    stats = common.interleaved({"decode": decode}, rounds=3, warmup=1)["decode"]
    return {"case": f"gpt2 d{config.width} L{config.num_blocks} {dtype} batch {batch}",
            "ms_per_token": stats.median / new_tokens * 1e3, "first": first}


def run_train(opts) -> dict[str, Any]:
    _require_accelerator()
    row = measure_train(preset_config(), opts.gpu_batch, rounds=opts.rounds, warmup=opts.warmup,
                        peak_tflops=opts.peak_tflops)
    return {"rows": [row], "table": common.format_table([row], COLUMNS_TRAIN)}


def run_generate(opts) -> dict[str, Any]:
    _require_accelerator()
    rows = [measure_generate(preset_config(), b, new_tokens=opts.new_tokens, prompt_tokens=opts.prompt_tokens)
            for b in opts.batches]
    return {"rows": rows, "table": common.format_table(rows, COLUMNS_GENERATE)}
