"""``python -m jaxllm.bench``: every suite runs at the tiniest sizes and writes well-formed JSON
with positive timings (speed is never asserted); the timing harness interleaves and summarises
as documented; the PyTorch cached decoder the generate suite uses returns the twin's own greedy
tokens; and the training-path attention (``causal_attention``, hand-written backward) equals
the einsum reference in values and gradients."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxllm.bench import common, generate as gen_suite, parallel as par_suite, train as train_suite
from jaxllm.bench.__main__ import main, parse
from jaxllm.bench.models import Case, lm_batch, make_case
from jaxllm.bench import torch_decode
from jaxllm.models import gpt2, transformer
from jaxllm.nn import attention
from parity import GRAD, OUTPUT, assert_close

TINY_DECODER = transformer.TransformerConfig(61, d_model=16, num_heads=2, num_layers=1, max_len=40)
TINY_GPT2 = gpt2.GPT2Config(vocab_size=61, context_length=40, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


# -- the timing harness ------------------------------------------------------------------------

def test_interleaved_runs_every_case_each_round_in_rotating_order():
    order = []
    cases = {name: (lambda name=name: order.append(name)) for name in "abc"}
    stats = common.interleaved(cases, rounds=3, warmup=1)
    assert order[:3] == ["a", "b", "c"]  # warm-up, then rounds starting at a rotating case
    assert order[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    for s in stats.values():
        assert len(s.times) == len(s.cpu) == 3
        assert s.min <= s.median <= s.max
    summary = stats["a"].summary(units_per_call=10, unit="tokens")
    assert summary["tokens_per_s"] == pytest.approx(10 / summary["median_s"])
    assert summary["tokens_per_s_min"] <= summary["tokens_per_s"] <= summary["tokens_per_s_max"]


def test_stats_and_table_and_bad_arguments():
    s = common.Stats([3.0, 1.0, 2.0], [0.5, 0.5, 0.5])
    assert (s.median, s.min, s.max, s.cpu_median) == (2.0, 1.0, 3.0, 0.5)
    table = common.format_table([{"a": "x", "b": 1234.5}, {"a": "yy", "b": None}], [("a", "A"), ("b", "B")])
    assert table.splitlines()[2].split() == ["x", "1,234"] and table.splitlines()[3].split() == ["yy", "-"]
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        common.interleaved({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="unknown suite"):
        parse(["trian"])
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        parse(["train", "--rounds", "0"])
    with pytest.raises(ValueError, match="family must be one of"):
        make_case("lstm", "tiny")
    with pytest.raises(ValueError, match="size must be one of"):
        make_case("mlp", "huge")


def test_machine_info_names_what_matters():
    info = common.machine_info()
    for key in ("cpu", "cores", "load_average", "jax", "jaxlib", "jax_devices", "torch", "torch_threads",
                "jax_default_matmul_precision"):
        assert key in info, key
    assert "XLA_FLAGS" in info["env"] and info["torch_threads"] >= 1


# -- the suites --------------------------------------------------------------------------------

def test_train_suite_via_the_command_line(tmp_path):
    out = main(["train", "--families", "linear,mlp", "--sizes", "tiny", "--rounds", "2", "--warmup", "0",
                "--torch-compile", "none", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["suite"] == "train" and saved["machine"]["cores"] >= 1 and "table" in saved
    assert [r["case"] for r in saved["rows"]] == ["linear/tiny", "mlp/tiny"] == [r["case"] for r in out["train"]["rows"]]
    for row in saved["rows"]:
        for side in ("jax", "torch_eager"):
            assert row[side]["n"] == 2
            assert positive(row[side]["examples_per_s"]) and positive(row[side]["median_s"])
            assert positive(row[side]["first_call_s"]) if side == "jax" else True
        assert "loss0_diff" in row  # same weights, same batch, same loss
        assert_close(row["jax"]["loss0"], row["torch_eager"]["loss0"], OUTPUT, err_msg=f"{row['case']} first loss")
        assert positive(row["ratios"]["jax_vs_eager"])
    assert "linear/tiny" in saved["table"]


def test_compile_suite_fills_a_new_cache_cold_and_reuses_it_warm(tmp_path):
    """Two fresh processes per case on one new cache: the first writes compiled programs, the
    second finds every one it needs (no new entries)."""
    out = main(["compile", "--families", "gpt2", "--sizes", "tiny", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "compile.json").read_text())["rows"]
    assert row["case"] == "gpt2/tiny" == out["compile"]["rows"][0]["case"]
    cold, warm = row["cold"], row["warm"]
    assert cold["cache"] == warm["cache"] and not os.path.exists(cold["cache"])  # a temporary directory
    assert cold["entries_before"] == 0 and cold["entries_after"] > 0
    assert warm["entries_before"] == warm["entries_after"] == cold["entries_after"]
    for side in (cold, warm):
        assert positive(side["first_step_s"]) and positive(side["median_step_s"])
    assert "gpt2/tiny" in out["compile"]["table"]


def test_profile_suite_sums_xla_operations_of_a_step_and_a_token(tmp_path):
    """The rows of each workload are XLA operation kinds whose shares add up to 100 %, costliest
    first, and the top single operations of the train step name their JAX source op."""
    out = main(["profile", "--quick", "--new-tokens", "8", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["rows"] == out["profile"]["rows"]
    assert {(r["case"], r["what"]) for r in saved["rows"]} == {("gpt2/tiny", "train step"), ("gpt2/tiny", "decode b1")}
    for what in ("train step", "decode b1"):
        rows = [r for r in saved["rows"] if r["what"] == what]
        assert sum(r["share"] for r in rows) == pytest.approx(100.0)
        kinds = [r for r in rows if not r["op"].endswith("other kinds")]
        assert [r["ms"] for r in kinds] == sorted((r["ms"] for r in kinds), reverse=True)
        assert all(positive(r["ms"]) and r["calls"] > 0 for r in rows)
    assert any("dot" in r["op"] or "ynn" in r["op"] for r in saved["rows"])  # the matmuls are there
    assert any("train_step" in t["source"] for t in saved["top_ops"] if t["what"] == "train step")


def test_train_case_of_a_language_model():
    from jaxllm.torch_ref import transformer as t_transformer

    decoder = Case("decoder", "tiny", "tiny decoder", TINY_DECODER, lambda: t_transformer.from_config(TINY_DECODER),
                   "lm", lm_batch(np.random.default_rng(0), 61, 2, 8), 16, "tokens")
    row = train_suite.bench_case(decoder, rounds=1, warmup=0, torch_compile=False, data_parallel=True)
    sides = ["jax", "torch_eager"] + (["jax_dp"] if jax.device_count() > 1 else [])
    for side in sides:
        assert positive(row[side]["tokens_per_s"])
    assert_close(row["jax"]["loss0"], row["torch_eager"]["loss0"], OUTPUT, err_msg="first loss")
    assert "torch_compile" not in row and row["ratios"]["jax_vs_compile"] is None


def test_train_case_with_torch_compile():
    row = train_suite.bench_case(make_case("linear", "tiny"), rounds=1, warmup=0, torch_compile=True,
                                 data_parallel=False)
    assert "error" not in row["torch_compile"], row["torch_compile"]
    assert positive(row["torch_compile"]["examples_per_s"]) and positive(row["torch_compile"]["first_call_s"])
    assert_close(row["jax"]["loss0"], row["torch_compile"]["loss0"], OUTPUT, err_msg="first loss")


def test_generate_suite_case_on_a_tiny_decoder_and_gpt2():
    for family, config, batch in (("decoder", TINY_DECODER, 1), ("gpt2", TINY_GPT2, 2)):
        row = gen_suite.bench_case(f"{family}/test", family, config, batch=batch, prompt_len=4, new=6, rounds=1,
                                   warmup=0, growth_tokens=3, growth_late=30)
        for side in ("jax_cache", "torch_cache", "jax_no_cache", "torch_no_cache", "jax_no_cache_at_256",
                     "torch_no_cache_at_256", *(("jax_past_context",) if batch == 1 else ())):
            assert positive(row[side]["ms_per_token"]), side
        assert ("jax_past_context" in row) == (batch == 1)  # one row slides past a context of 4 + 6 // 4
        assert row["jax_cache"]["compiles"] <= 1  # 0 if an earlier test compiled the same shapes
        assert set(row["tokens_differ"]) == {"jax_cache", "jax_no_cache", "torch_cache", "torch_no_cache"}
        assert all(v == 0 for v in row["tokens_differ"].values()), row["tokens_differ"]
        growth = row["growth"]
        assert positive(growth["jax_late_vs_early"]) and positive(growth["torch_late_vs_early"])
    assert "ms per new token" in gen_suite.format_rows([row])
    with pytest.raises(ValueError, match="exceed the model's context"):
        gen_suite.bench_case("x", "decoder", TINY_DECODER, batch=1, prompt_len=30, new=20, rounds=1, warmup=0)


def test_rnn_suite_via_the_command_line(tmp_path):
    main(["rnn", "--sizes", "tiny", "--rounds", "1", "--warmup", "0", "--new-tokens", "8", "--prompt-tokens", "4",
          "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "rnn.json").read_text())["rows"]
    assert [r["what"] for r in rows] == ["train", "stream"]
    assert positive(rows[0]["jax"]["tokens_per_s"]) and positive(rows[0]["torch_eager"]["tokens_per_s"])
    assert positive(rows[1]["jax"]["ms_per_token"]) and positive(rows[1]["torch"]["ms_per_token"])
    assert rows[1]["tokens_differ"] == 0  # greedy: the scan and the twin's loop agree


def test_parallel_suite_rows_agree_on_the_first_loss():
    rows = par_suite.bench_family("decoder", ["single", "sharded"], rounds=1, warmup=0, config=TINY_DECODER,
                                  rows_=2, context=8)
    assert [r["strategy"] for r in rows] == ["single", "sharded"]
    for r in rows:
        assert "error" not in r, r
        assert positive(r["tokens_per_s"]) and "loss0_diff" in r
        assert_close(r["loss0"], rows[0]["loss0"], OUTPUT, err_msg=f"{r['strategy']} first loss")
    assert "sharded" in par_suite.format_rows(rows)


# -- correctness of what the benchmarks rely on ------------------------------------------------

@pytest.mark.parametrize("family", ["decoder", "gpt2"])
def test_torch_cached_decoder_equals_the_twins_full_forward(family):
    from jaxllm.torch_ref import gpt2 as t_gpt2, transformer as t_transformer

    torch.manual_seed(0)
    twin = (t_transformer.from_config(TINY_DECODER) if family == "decoder"
            else t_gpt2.GPTModel(TINY_GPT2.to_twin_dict())).eval()
    prompt = torch.from_numpy(np.random.default_rng(1).integers(0, 61, (2, 5))).long()
    cached, full = torch_decode.greedy_cached(twin, prompt, 9), torch_decode.greedy_no_cache(twin, prompt, 9)
    assert cached.shape == (2, 9) and torch.equal(cached, full)
    decoder = torch_decode.CachedDecoder(twin, 2, 14)
    logits = torch.cat([decoder.step(prompt[:, :3]), decoder.step(prompt[:, 3:4]), decoder.step(prompt[:, 4:])], 1)
    with torch.no_grad():
        assert_close(logits.numpy(), twin(prompt).numpy(), OUTPUT, err_msg="cached vs full logits")
    with pytest.raises(ValueError, match="overflow the cache"):
        decoder.step(torch.zeros(2, 10, dtype=torch.long))


def einsum_attention(q, k, v, mask, keep=None):
    """The plain formulation autodiff differentiates: q float[B, T, H, dh], k, v float[B, S, KV, dh],
    mask bool[B, T, S], keep (dropout's scaled mask) float[B, H, T, S] | None -> float[B, T, H * dh]."""
    b, t, h, dh = q.shape
    group = h // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(dh))
    weights = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
    if keep is not None:
        weights = weights * keep
    return jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, h * dh)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_attention_dropout_has_the_same_gradient_as_autodiff(heads, kv_heads):
    """The fast path's hand-written backward with dropout on the weights equals autodiff of the
    plain formulation with the same keep-mask; a rate of 0.5 drops about half the weights."""
    rng = np.random.default_rng(1)
    b, t, dh, rate = 2, 6, 8, 0.5
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, dh)), jnp.float32) for n in (heads, kv_heads, kv_heads))
    cotangent = jnp.asarray(rng.standard_normal((b, t, heads * dh)), jnp.float32)
    key = jax.random.PRNGKey(3)
    keep = jax.random.bernoulli(key, 1.0 - rate, (b, heads, t, t)).astype(jnp.float32) / (1.0 - rate)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    assert 0.3 < float(jnp.mean(keep > 0)) < 0.7

    fast = lambda q, k, v: attention.causal_attention(q, k, v, dropout_rate=rate, dropout_key=key)  # noqa: E731
    reference = lambda q, k, v: einsum_attention(q, k, v, causal, keep)  # noqa: E731
    assert_close(fast(q, k, v), reference(q, k, v), OUTPUT, err_msg="attention with dropout")
    assert np.abs(np.asarray(fast(q, k, v) - attention.causal_attention(q, k, v))).max() > 1e-3  # it drops
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)  # noqa: E731
    for g, r in zip(jax.grad(loss(fast), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)):
        assert_close(g, r, GRAD, err_msg="attention gradient with dropout")


@pytest.mark.parametrize("heads,kv_heads,dtype,tol", [(4, 4, jnp.float32, None), (4, 2, jnp.float32, None),
                                                      (2, 2, jnp.bfloat16, 3e-2)])
def test_causal_attention_matches_the_einsum_reference(heads, kv_heads, dtype, tol):
    rng = np.random.default_rng(0)
    b, t, dh = 2, 7, 8
    q = jnp.asarray(rng.standard_normal((b, t, heads, dh)), dtype)
    k = jnp.asarray(rng.standard_normal((b, t, kv_heads, dh)), dtype)
    v = jnp.asarray(rng.standard_normal((b, t, kv_heads, dh)), dtype)
    cotangent = jnp.asarray(rng.standard_normal((b, t, heads * dh)), jnp.float32)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)

    reference = lambda q, k, v: einsum_attention(q.astype(jnp.float32), k.astype(jnp.float32),  # noqa: E731
                                                 v.astype(jnp.float32), causal)
    got = attention.causal_attention(q, k, v)
    assert got.shape == (b, t, heads * dh) and got.dtype == dtype
    if tol is None:  # float32: the policy of tests/parity.py
        assert_close(got, reference(q, k, v), OUTPUT, err_msg="attention values")
    else:  # bfloat16: its own tolerance
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(reference(q, k, v)), atol=tol, rtol=tol)
    grads = jax.grad(loss(attention.causal_attention), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        if tol is None:
            assert_close(g, r, GRAD, err_msg="attention gradient")
        else:
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=tol * 10, rtol=tol)


def test_gpu_preset_refuses_a_cpu_and_its_code_runs_on_a_tiny_gpt2():
    """The GPU preset's measuring code, run on CPU at a tiny size (the preset itself needs a GPU)."""
    from jaxllm.bench import gpu
    from jaxllm.models.gpt2 import GPT2Config

    with pytest.raises(ValueError, match="JAX sees only the CPU"):
        main(["train", "--gpu-preset", "--rounds", "1"])
    config = GPT2Config(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0)
    row = gpu.measure_train(config, 2, rounds=2, warmup=0, peak_tflops=1.0)
    # by hand: tok_emb 64*32 + block (Q, K, V 3*32*32; out_proj 32*32+32; ff 32*128+128 + 128*32+32;
    # two norms 2*64) + final norm 64 + out_head 32*64; the 16*32 position table is left out
    n = 2048 + (3072 + 1056 + 8352 + 128) + 64 + 2048
    assert row["flops_per_token"] == 6 * n + 12 * 1 * 32 * 16
    assert positive(row["tokens_per_s"]) and np.isfinite(row["loss"])
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 1e12)
    assert gpu.device_peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0 and gpu.device_peak_tflops("cpu", None) is None
    decode = gpu.measure_generate(config, 2, new_tokens=4, prompt_tokens=3)
    assert positive(decode["ms_per_token"])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_the_gpu_fused_attention_call_matches_the_einsum_reference(heads, kv_heads):
    """The call causal_attention makes on a GPU in bf16 (jax.nn.dot_product_attention), run here with
    its XLA implementation: same layout, causal mask, scale and grouped-query heads as ours."""
    rng = np.random.default_rng(1)
    b, t, dh = 2, 6, 8
    q = jnp.asarray(rng.standard_normal((b, t, heads, dh)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, kv_heads, dh)), jnp.float32) for _ in range(2))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    got = attention.fused_causal_attention(q, k, v, implementation="xla").reshape(b, t, heads * dh)
    assert_close(got, einsum_attention(q, k, v, causal), OUTPUT, err_msg="fused attention values")
