"""``rnn`` suite: Burkov's Elman RNN, ``lax.scan`` (JAX) vs the twin's Python time loop (PyTorch).

* training: tokens/s of one AdamW step on a ``[batch, context]`` window -- JAX's jitted step
  (the input projections of all time steps in one matmul, only ``h @ Uh`` inside ``lax.scan``)
  against the book's loop over time steps with the layer loop inside, in eager PyTorch;
* streaming generation: ms per new token, greedy, batch 1 -- JAX's ``sample_recurrent``
  (prompt read once, then every token one step inside one ``lax.scan``) against the twin called
  once per token with its carried hidden state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.bench import common
from jaxllm.bench.models import Case, lm_batch

SIZES = {  # name: (vocab, emb_dim, layers, batch, context)
    "tiny": (64, 16, 2, 8, 32),
    "small": (512, 128, 2, 16, 128),
    "long": (512, 128, 2, 4, 512),
}

COLUMNS = [("case", "case"), ("what", "what"), ("jax", "JAX"), ("torch", "torch loop"), ("unit", "unit"),
           ("speedup", "JAX/torch"), ("jax_first", "JAX 1st s"), ("cpu", "CPU torch/JAX")]


def defaults(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sizes": ["tiny"], "rounds": 3, "warmup": 1}
    return {"sizes": ["tiny", "small", "long"], "rounds": 10, "warmup": 2}


def run(opts) -> dict[str, Any]:
    rows = []
    for size in opts.sizes:
        if size not in SIZES:
            raise ValueError(f"rnn sizes are {tuple(SIZES)}, got {size!r}")
        print(f"[rnn] {size}", flush=True)
        rows.append(bench_training(size, rounds=opts.rounds, warmup=opts.warmup))
        rows.append(bench_streaming(size, rounds=max(2, opts.rounds // 3), warmup=min(opts.warmup, 1),
                                    prompt_len=opts.prompt_tokens, new=opts.new_tokens))
    return {"rows": rows, "table": format_rows(rows)}


def _case(size: str) -> Case:
    from jaxllm.models import rnn
    from jaxllm.torch_ref import rnn as t_rnn

    vocab, emb, layers, batch, context = SIZES[size]
    config = rnn.RNNConfig(vocab, emb_dim=emb, num_layers=layers)
    return Case("rnn", size, f"Elman RNN vocab {vocab}, emb {emb}, {layers} layers, {batch}x{context} tokens",
                config, lambda: t_rnn.from_config(config), "lm", lm_batch(np.random.default_rng(0), vocab, batch, context),
                batch * context, "tokens")


def bench_training(size: str, *, rounds: int, warmup: int) -> dict[str, Any]:
    from jaxllm.bench.train import bench_case

    row = bench_case(_case(size), rounds=rounds, warmup=warmup, torch_compile=False, data_parallel=False)
    row["what"] = "train"
    return row


def bench_streaming(size: str, *, rounds: int, warmup: int, prompt_len: int, new: int) -> dict[str, Any]:
    import jax
    import torch

    from jaxllm import interop
    from jaxllm.generate import sample_recurrent
    from jaxllm.models import rnn
    from jaxllm.torch_ref import rnn as t_rnn

    vocab, emb, layers, _, _ = SIZES[size]
    config = rnn.RNNConfig(vocab, emb_dim=emb, num_layers=layers)
    torch.manual_seed(0)
    twin = t_rnn.from_config(config).eval()
    params = jax.device_put(interop.from_torch(config, twin.state_dict()))
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_len).tolist()
    out: dict[str, list[int]] = {}

    def jax_stream():
        out["jax"] = sample_recurrent(config, params, prompt, max_new_tokens=new, key=jax.random.PRNGKey(0),
                                      temperature=0.0)

    @torch.no_grad()
    def torch_stream():
        logits, hidden = twin(torch.tensor([prompt]))
        tokens = []
        token = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new):
            tokens.append(int(token))
            logits, hidden = twin(token, hidden)
            token = logits[:, -1].argmax(-1, keepdim=True)
        out["torch"] = tokens

    first = common.first_call(jax_stream)
    stats = common.interleaved({"jax": jax_stream, "torch": torch_stream}, rounds=rounds, warmup=warmup)
    row = {"case": f"rnn/{size}", "what": "stream", "unit": "ms/token", "new_tokens": new, "prompt_tokens": prompt_len,
           "jax": {"first_call_s": first, **stats["jax"].summary()}, "torch": stats["torch"].summary(),
           "tokens_differ": sum(a != b for a, b in zip(out["jax"], out["torch"]))}
    for side in ("jax", "torch"):
        row[side]["ms_per_token"] = 1e3 * row[side]["median_s"] / new
    row["ratios"] = {"jax_vs_torch": common.ratio(row["torch"]["median_s"], row["jax"]["median_s"]),
                     "cpu_torch_vs_jax": common.ratio(row["torch"]["cpu_median_s"], row["jax"]["cpu_median_s"])}
    return row


def format_rows(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        if r["what"] == "train":
            table.append({"case": r["case"], "what": "train", "unit": "tokens/s",
                          "jax": r["jax"]["tokens_per_s"], "torch": r["torch_eager"]["tokens_per_s"],
                          "speedup": r["ratios"]["jax_vs_eager"], "jax_first": r["jax"]["first_call_s"],
                          "cpu": r["ratios"]["cpu_eager_vs_jax"]})
        else:
            table.append({"case": r["case"], "what": f"stream {r['new_tokens']}", "unit": "ms/token",
                          "jax": r["jax"]["ms_per_token"], "torch": r["torch"]["ms_per_token"],
                          "speedup": r["ratios"]["jax_vs_torch"], "jax_first": r["jax"]["first_call_s"],
                          "cpu": r["ratios"]["cpu_torch_vs_jax"]})
    return common.format_table(table, COLUMNS)
