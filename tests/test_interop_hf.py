"""Hugging Face GPT-2 / Llama checkpoints load into the Flax models (built from configs: nothing
downloads), Llama params go back strictly, and interleaved-RoPE weights move to rotate-half."""

import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from jaxllm import interop  # noqa: E402
from jaxllm.models import gpt2, transformer  # noqa: E402
from parity import OUTPUT, assert_close  # noqa: E402

pytestmark = pytest.mark.optimized  # parity: compiled as users run it (see conftest.py)

TOKENS = np.array([[1, 5, 96, 0, 42, 7, 7, 13, 2, 60, 31, 8],
                   [3, 3, 90, 11, 4, 17, 58, 0, 1, 95, 20, 64]], np.int32)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped scale/shift would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_llama():
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=97,
                                   rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                                   tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norm weights away from 1
    return model


def gpt2_config(**changes):
    return gpt2.GPT2Config(**{"vocab_size": 97, "context_length": 32, "emb_dim": 32, "n_heads": 4,
                              "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True, **changes})


def llama_config(**changes):
    return dataclasses.replace(transformer.llama(97, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2,
                                                 mlp_hidden=48, max_len=64), **changes)


@pytest.mark.parametrize("tie", [False, True])
def test_gpt2_from_safetensors_dir(hf_gpt2, tmp_path, tie):
    hf_gpt2.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    config = gpt2_config(tie_embeddings=tie)
    params = interop.from_hf(config, tmp_path)
    ours = jax.jit(config.logits)(params, TOKENS)
    assert_close(ours, hf_logits(hf_gpt2, TOKENS), OUTPUT, err_msg="ours vs Hugging Face logits")


def test_gpt2_from_pytorch_bin_with_weights_only(hf_gpt2, tmp_path, monkeypatch):
    torch.save(hf_gpt2.state_dict(), tmp_path / "pytorch_model.bin")
    seen = []
    real_load = torch.load

    def load(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    config = gpt2_config()
    params = interop.from_hf(config, tmp_path)
    assert seen == [True]
    ours = jax.jit(config.logits)(params, TOKENS)
    assert_close(ours, hf_logits(hf_gpt2, TOKENS), OUTPUT, err_msg="ours vs Hugging Face logits")


def test_gpt2_state_dict_with_or_without_prefix_and_buffers(hf_gpt2):
    state = hf_gpt2.state_dict()
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)  # old checkpoints' mask buffers are ignored
    bare["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    config = gpt2_config()
    a, b = interop.from_hf(config, state), interop.from_hf(config, bare)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    w = state["transformer.h.1.attn.c_attn.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(a["trf_blocks_1"]["att"]["W_key"]["kernel"]), w[:, 32:64])


def test_llama_from_hf_matches_logits(hf_llama, tmp_path):
    hf_llama.save_pretrained(tmp_path, safe_serialization=True)
    config = llama_config()
    params = interop.from_hf(config, tmp_path)  # config.json is checked too
    ours = jax.jit(config.logits)(params, TOKENS)
    assert_close(ours, hf_logits(hf_llama, TOKENS), OUTPUT, err_msg="ours vs Hugging Face logits")


def test_llama_to_hf_round_trip_is_strict_and_exact(hf_llama):
    config = llama_config()
    params = config.init(jax.random.PRNGKey(3))
    state = interop.to_hf(config, params)
    fresh = transformers.LlamaForCausalLM(hf_llama.config).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    back = interop.from_hf(config, fresh.state_dict(), hf_config=fresh.config)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ours = jax.jit(config.logits)(params, TOKENS)
    assert_close(ours, hf_logits(fresh, TOKENS), OUTPUT, err_msg="ours vs Hugging Face logits")


def test_tied_llama(hf_llama):
    cfg = hf_llama.config.to_dict()
    cfg.update(tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    config = llama_config(tie_embeddings=True)
    params = interop.from_hf(config, model.state_dict(), hf_config=model.config)
    assert "output" not in params
    state = interop.to_hf(config, params)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    ours = jax.jit(config.logits)(params, TOKENS)
    assert_close(ours, hf_logits(model, TOKENS), OUTPUT, err_msg="ours vs Hugging Face logits")


@pytest.mark.parametrize("layout", ["per_head", "fused"])
def test_interleaved_to_rotate_half_keeps_logits(layout):
    config = transformer.TransformerConfig(61, d_model=32, num_heads=4, num_layers=2, qkv_layout=layout)
    params = config.init(jax.random.PRNGKey(0))
    half = dataclasses.replace(config, rope="rotate_half")
    moved = interop.interleaved_to_rotate_half_params(config, params)
    tokens = TOKENS % 61
    a = jax.jit(config.logits)(params, tokens)
    b = jax.jit(half.logits)(moved, tokens)
    assert_close(b, a, OUTPUT, err_msg="rotate_half on permuted weights vs interleaved")
    c = jax.jit(half.logits)(params, tokens)  # without the permutation they differ
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3


def test_rope_scores_agree_after_permutation():
    from jaxllm.nn import rope

    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 2, 7, 3, 16)).astype(np.float32)
    cos, sin = rope.rope_angles(np.arange(7)[None].repeat(2, 0), 16)
    p = rope.interleaved_to_half(16)
    ref = np.einsum("bthd,bshd->bhts", rope.rope_interleaved(q, cos, sin), rope.rope_interleaved(k, cos, sin))
    got = np.einsum("bthd,bshd->bhts", rope.rope_rotate_half(q[..., p], cos, sin),
                    rope.rope_rotate_half(k[..., p], cos, sin))
    assert_close(got, ref, OUTPUT, err_msg="rope scores after permutation")


def test_bad_inputs_are_named(hf_gpt2, hf_llama):
    state = dict(hf_gpt2.state_dict())
    with pytest.raises(ValueError, match="qkv_bias"):
        interop.from_hf(gpt2_config(qkv_bias=False), state)
    with pytest.raises(ValueError, match=r"n_layers \(n_layer\): ours 3, HF 2"):
        interop.from_hf(gpt2_config(n_layers=3), state, hf_config=hf_gpt2.config)
    missing = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.bias'\]"):
        interop.from_hf(gpt2_config(), missing)
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        interop.from_hf(gpt2_config(), {**state, "extra.weight": torch.zeros(1)})
    assert interop.from_hf(gpt2_config(), {**state, "extra.weight": torch.zeros(1)}, strict=False)
    with pytest.raises(ValueError, match=r"h.0.mlp.c_fc.weight: expected .* \(32, 128\), got HF shape \(32, 100\)"):
        interop.from_hf(gpt2_config(), {**state, "transformer.h.0.mlp.c_fc.weight": torch.zeros(32, 100)})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        interop.from_hf(gpt2_config(tie_embeddings=True), {**state, "lm_head.weight": torch.zeros(97, 32)})

    lstate = hf_llama.state_dict()
    with pytest.raises(ValueError, match=r"norm_eps \(rms_norm_eps\).*rope_base \(rope_theta\)"):
        interop.from_hf(llama_config(norm_eps=1e-5, rope_base=500000.0), lstate, hf_config=hf_llama.config)
    with pytest.raises(ValueError, match=r"kv_heads \(num_key_value_heads\): ours 4, HF 2"):
        interop.from_hf(llama_config(num_kv_heads=4), lstate, hf_config=hf_llama.config)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.weight: expected"):
        interop.from_hf(llama_config(num_kv_heads=4), lstate)  # no HF config: the shapes catch it
    with pytest.raises(ValueError, match="rope: the Llama layout needs 'rotate_half'"):
        interop.from_hf(llama_config(rope="interleaved"), lstate)
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        interop.from_hf(llama_config(), {k: v for k, v in lstate.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match="rope must be 'interleaved'"):
        interop.interleaved_to_rotate_half_params(llama_config(), llama_config().init(jax.random.PRNGKey(0)))


def test_core_import_does_not_need_torch():
    import subprocess
    import sys

    code = "import sys, jaxllm.interop; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
