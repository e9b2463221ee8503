"""``generate`` suite: greedy decoding, ms per new token, JAX vs the PyTorch twin, cache vs none.

Per model (the Burkov decoder and GPT-2 at the benchmark's configs A and B, built with a context of
512) and batch size (1 and 8), a 16-token prompt continued by 256 tokens:

* ``jax_cache``: ``jaxllm.generate.generate`` -- one prefill, then the whole decode in one jitted
  ``lax.while_loop`` carrying a KV cache of prompt + new slots (each step attends over all of
  them, masked: fixed shapes, so the cost per token does not depend on the position); ``first_call_s`` is its compile + first run and
  ``compiles`` how many executables the calls built (1 = no recompilation);
* ``torch_cache``: the twin's weights under an imperative KV cache (``torch_decode.greedy_cached``);
* ``torch_no_cache``: the books' loop, a full forward of the growing prefix per token;
* ``jax_past_context`` (batch 1): the same 256 tokens through a context of 16 + 64, the window
  sliding (``generate_past_context``: a half-context prefill each time the context is full);
* ``jax_no_cache``: the same in JAX -- a jitted full forward of a fixed ``[batch, 16 + 256]``
  buffer per token inside one ``lax.fori_loop`` (fixed shapes: each step costs what the last,
  256-token step of a growing-prefix loop costs).

The full no-cache loops cost 256 forwards of up to 272 tokens, so they run by default at
config A only; ``*_no_cache_at_256`` (one forward of the 272-token window, what a no-cache
loop pays per token at the end) runs everywhere and is the "recompute the prefix" reference.
Growth with position: 32 tokens decoded (each framework's cached step) from a cache filled to
position 16 and from one filled to position 240, each its own call (``late/early`` ratio).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.bench import common
from jaxllm.jax_internals import compiled_versions
from jaxllm.bench.models import config_a, config_b, param_count

COLUMNS = [("case", "case"), ("jax_cache", "JAX cache"), ("torch_cache", "torch cache"),
           ("vs_torch", "JAX/torch"), ("jax_past", "JAX past ctx"), ("jax_nc", "JAX no cache"), ("torch_nc", "torch no cache"),
           ("jax_at256", "JAX @256"), ("torch_at256", "torch @256"), ("cache_gain", "@256/cache"),
           ("jax_growth", "JAX late/early"), ("torch_growth", "torch late/early"), ("compile", "JAX 1st s"),
           ("compiles", "compiles")]


def defaults(quick: bool) -> dict[str, Any]:
    if quick:
        return {"families": ["decoder"], "sizes": ["tiny"], "batches": [1], "rounds": 2, "warmup": 0,
                "full_no_cache": ["tiny"]}
    return {"families": ["decoder", "gpt2"], "sizes": ["tiny", "small"], "batches": [1, 8], "rounds": 3,
            "warmup": 1, "full_no_cache": ["tiny"]}


def run(opts) -> dict[str, Any]:
    if getattr(opts, "gpu_preset", False):
        from jaxllm.bench import gpu

        return gpu.run_generate(opts)
    rows = []
    prompt_len, new = opts.prompt_tokens, opts.new_tokens
    for family in opts.families:
        if family not in ("decoder", "gpt2"):
            raise ValueError(f"generate benchmarks families decoder and gpt2, got {family!r}")
        for size in opts.sizes:
            config, _, _ = (config_a if size in ("tiny", "A") else config_b)(family)
            for batch in opts.batches:
                name = f"{family}/{size}/b{batch}"
                print(f"[generate] {name}", flush=True)
                rows.append(bench_case(name, family, config, batch=batch, prompt_len=prompt_len, new=new,
                                       rounds=opts.rounds, warmup=opts.warmup,
                                       full_no_cache=size in opts.full_no_cache))
    return {"rows": rows, "table": format_rows(rows)}


def bench_case(name, family, config, *, batch, prompt_len, new, rounds, warmup, full_no_cache=True,
               growth_tokens: int = 32, growth_late: int = 240) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import torch

    from jaxllm import generate as gen
    from jaxllm import interop
    from jaxllm.bench import torch_decode

    from jaxllm.torch_ref import twin_of

    if prompt_len + new > config.context_limit:
        raise ValueError(f"prompt {prompt_len} + {new} new tokens exceed the model's context {config.context_limit}")
    torch.manual_seed(0)
    twin = twin_of(config).eval()
    params = jax.device_put(interop.from_torch(config, dict(twin.named_parameters())))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    tprompts = torch.from_numpy(prompts).long()
    key = jax.random.PRNGKey(0)
    sides: dict[str, Any] = {}
    calls: dict[str, Any] = {}
    outputs: dict[str, np.ndarray] = {}

    # JAX past the context (batch 1): the same tokens through a context of the prompt and a quarter of them, the
    # window sliding (generate_past_context): what each token costs once the context is full; first,
    # so that the compiles counted below are jax_cache's
    if batch == 1:
        past_limit = prompt_len + new // 4

        def jax_past_context():
            gen.generate_past_context(config, params, prompts[0].tolist(), max_new_tokens=new, key=key,
                                      limit=past_limit)

        sides["jax_past_context"] = {"first_call_s": common.first_call(jax_past_context), "context": past_limit}
        calls["jax_past_context"] = jax_past_context

    # JAX, KV cache: the library's generate(), the cache exactly prompt + new long (as jaxllm train lm)
    width = prompt_len + new
    compiled_before = compiled_versions(gen._generate)

    def jax_cache():
        out = gen.generate(config, params, prompts.tolist(), max_new_tokens=new, key=key, max_len=width)
        outputs["jax_cache"] = np.asarray(out)

    sides["jax_cache"] = {"first_call_s": common.first_call(jax_cache)}
    calls["jax_cache"] = jax_cache

    # JAX, no cache: a fixed [batch, prompt + new] window, recomputed per token, in one jit
    forward = jax.jit(config.logits)

    @jax.jit
    def jax_loop(p, buf):
        def body(i, buf):
            logits = config.logits(p, buf)
            token = jnp.argmax(logits[:, prompt_len + i - 1], -1).astype(jnp.int32)
            return buf.at[:, prompt_len + i].set(token)
        return jax.lax.fori_loop(0, new, body, buf)

    window = jnp.asarray(np.pad(prompts, ((0, 0), (0, new))))
    calls["jax_no_cache_at_256"] = lambda: jax.block_until_ready(forward(params, window))
    sides["jax_no_cache_at_256"] = {"first_call_s": common.first_call(calls["jax_no_cache_at_256"]), "calls": 1}
    if full_no_cache:
        def jax_no_cache():
            outputs["jax_no_cache"] = np.asarray(jax_loop(params, window))[:, prompt_len:]

        sides["jax_no_cache"] = {"first_call_s": common.first_call(jax_no_cache)}
        calls["jax_no_cache"] = jax_no_cache

    # PyTorch twin
    def torch_cache():
        outputs["torch_cache"] = torch_decode.greedy_cached(twin, tprompts, new).numpy()

    calls["torch_cache"] = torch_cache
    sides["torch_cache"] = {"first_call_s": common.first_call(torch_cache)}
    twindow = torch.from_numpy(np.array(window)).long()

    def torch_at_256():
        with torch.no_grad():
            out = twin(twindow)
        return out

    calls["torch_no_cache_at_256"] = torch_at_256
    sides["torch_no_cache_at_256"] = {"calls": 1}
    if full_no_cache:
        def torch_no_cache():
            outputs["torch_no_cache"] = torch_decode.greedy_no_cache(twin, tprompts, new).numpy()

        calls["torch_no_cache"] = torch_no_cache
        sides["torch_no_cache"] = {}

    stats = common.interleaved(calls, rounds=rounds, warmup=warmup)
    for side, s in stats.items():
        per_call = 1 if side.endswith("_at_256") else new
        sides[side].update(s.summary())
        sides[side]["ms_per_token"] = 1e3 * s.median / per_call
        sides[side]["ms_per_token_min"] = 1e3 * s.min / per_call
        sides[side]["ms_per_token_max"] = 1e3 * s.max / per_call
    sides["jax_cache"]["compiles"] = compiled_versions(gen._generate) - compiled_before

    row = {"case": name, "family": family, "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new,
           "config": config.to_dict(), "params": param_count(params), **sides}
    row["growth"] = _growth(config, params, twin, prompts, tprompts, tokens=growth_tokens, late=growth_late,
                            rounds=max(rounds, 3))
    # every method must produce the same greedy tokens (differences would mean a bug, or a near-tie
    # in fp32 argmax; the count is recorded rather than asserted)
    ref = outputs.get("torch_no_cache", outputs["torch_cache"])
    row["tokens_differ"] = {k: int((v != ref).sum()) for k, v in outputs.items()}
    ms = lambda side: row.get(side, {}).get("ms_per_token")
    row["ratios"] = {"jax_vs_torch_cache": common.ratio(ms("torch_cache"), ms("jax_cache")),
                     "cache_vs_no_cache_at_256": common.ratio(ms("jax_no_cache_at_256"), ms("jax_cache")),
                     "jax_cache_vs_torch_no_cache": common.ratio(ms("torch_no_cache"), ms("jax_cache")),
                     "past_context_vs_cache": common.ratio(ms("jax_past_context"), ms("jax_cache"))}
    return row


def _growth(config, params, twin, prompts, tprompts, *, tokens, late, rounds) -> dict[str, Any]:
    """ms/token of ``tokens`` cached greedy steps starting at position len(prompt) and at ``late``."""
    import jax
    import jax.numpy as jnp
    import torch

    from jaxllm.bench import torch_decode

    batch, early = prompts.shape
    max_len = late + tokens

    @jax.jit
    def prefill(p, tokens_, cache):  # the empty cache an argument: XLA spent 8 s folding a constant one
        logits, cache = config.forward(p, tokens_, cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    @jax.jit
    def decode(p, token, cache):
        def body(carry, _):
            token, cache = carry
            logits, cache = config.forward(p, token[:, None], cache)
            token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            return (token, cache), token
        return jax.lax.scan(body, (token, cache), None, length=tokens)[1]

    rng = np.random.default_rng(1)
    long_prompt = rng.integers(0, config.vocab_size, (batch, late)).astype(np.int32)
    starts = {name: prefill(params, jnp.asarray(p), config.init_cache(batch, max_len))
              for name, p in (("early", prompts), ("late", long_prompt))}
    calls = {f"jax_{k}": (lambda s=s: jax.block_until_ready(decode(params, *s))) for k, s in starts.items()}
    first = common.first_call(calls["jax_early"])

    def torch_from(prompt):
        def call():
            filled.length = prompt.shape[1]  # rewind: the prompt's slots stay, later ones are overwritten
            token = logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(tokens):
                token = filled.step(token)[:, -1].argmax(-1, keepdim=True)

        filled = torch_decode.CachedDecoder(twin, batch, max_len)
        logits = filled.step(prompt)
        return call

    calls["torch_early"] = torch_from(tprompts)
    calls["torch_late"] = torch_from(torch.from_numpy(long_prompt).long())
    stats = common.interleaved(calls, rounds=rounds, warmup=1)
    ms = {k: 1e3 * s.median / tokens for k, s in stats.items()}
    return {"tokens": tokens, "early_position": early, "late_position": late, "jax_first_call_s": first,
            **{f"{k}_ms_per_token": v for k, v in ms.items()},
            "jax_late_vs_early": ms["jax_late"] / ms["jax_early"],
            "torch_late_vs_early": ms["torch_late"] / ms["torch_early"]}


def format_rows(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        ms = lambda side: r.get(side, {}).get("ms_per_token")
        table.append({"case": r["case"], "jax_cache": ms("jax_cache"), "torch_cache": ms("torch_cache"),
                      "vs_torch": r["ratios"]["jax_vs_torch_cache"], "jax_past": ms("jax_past_context"),
                      "jax_nc": ms("jax_no_cache"),
                      "torch_nc": ms("torch_no_cache"), "jax_at256": ms("jax_no_cache_at_256"),
                      "torch_at256": ms("torch_no_cache_at_256"),
                      "cache_gain": r["ratios"]["cache_vs_no_cache_at_256"],
                      "jax_growth": r["growth"]["jax_late_vs_early"], "torch_growth": r["growth"]["torch_late_vs_early"],
                      "compile": r["jax_cache"]["first_call_s"], "compiles": r["jax_cache"]["compiles"]})
    return "ms per new token (median)\n" + common.format_table(table, COLUMNS)
