"""Raschka's ch. 4 GPT twin: the book's state-dict layout, parameter count, initial weights (the
book's seed-123 greedy tokens), dropout behaviour and its hand-written LayerNorm / GELU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jaxllm.data.tokenizer import gpt2_encoding
from jaxllm.torch_ref import gpt2
from parity import OUTPUT, assert_close

pytestmark = pytest.mark.optimized  # parity: compiled as users run it (see conftest.py)

TINY = {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.1, "qkv_bias": False}


def expected_shapes(cfg):
    """docs/models.md's table, 'GPT model (Raschka ch. 4)'."""
    V, C, D = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"]
    shapes = {"tok_emb.weight": (V, D), "pos_emb.weight": (C, D)}
    for i in range(cfg["n_layers"]):
        p = f"trf_blocks.{i}."
        for name in ("W_query", "W_key", "W_value"):
            shapes[p + f"att.{name}.weight"] = (D, D)
            if cfg["qkv_bias"]:
                shapes[p + f"att.{name}.bias"] = (D,)
        shapes[p + "att.out_proj.weight"] = (D, D)
        shapes[p + "att.out_proj.bias"] = (D,)
        shapes[p + "att.mask"] = (C, C)
        shapes[p + "ff.layers.0.weight"] = (4 * D, D)
        shapes[p + "ff.layers.0.bias"] = (4 * D,)
        shapes[p + "ff.layers.2.weight"] = (D, 4 * D)
        shapes[p + "ff.layers.2.bias"] = (D,)
        for norm in ("norm1", "norm2"):
            shapes[p + f"{norm}.scale"] = (D,)
            shapes[p + f"{norm}.shift"] = (D,)
    shapes["final_norm.scale"] = (D,)
    shapes["final_norm.shift"] = (D,)
    shapes["out_head.weight"] = (V, D)
    return shapes


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_state_dict_layout(qkv_bias):
    cfg = {**TINY, "qkv_bias": qkv_bias}
    sd = gpt2.GPTModel(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(cfg)
    mask = sd["trf_blocks.0.att.mask"]
    assert torch.equal(mask, torch.triu(torch.ones(16, 16), diagonal=1))


def test_book_state_dict_loads_strictly_and_masks_are_optional():
    torch.manual_seed(0)
    src = gpt2.GPTModel(TINY)
    dst = gpt2.GPTModel(TINY)
    dst.load_state_dict(src.state_dict(), strict=True)  # masks included, as the book saves them
    x = torch.randint(0, TINY["vocab_size"], (2, 9))
    src.eval(), dst.eval()
    assert torch.equal(src(x), dst(x))

    no_masks = gpt2.drop_masks(src.state_dict())
    assert not any(k.endswith(".att.mask") for k in no_masks)
    assert len(no_masks) == len(src.state_dict()) - TINY["n_layers"]
    with pytest.raises(RuntimeError):
        gpt2.GPTModel(TINY).load_state_dict(no_masks, strict=True)
    other = gpt2.load_without_masks(gpt2.GPTModel(TINY), no_masks).eval()
    assert torch.equal(other(x), src(x))
    del no_masks["out_head.weight"]
    with pytest.raises(RuntimeError, match="out_head.weight"):
        gpt2.load_without_masks(gpt2.GPTModel(TINY), no_masks)


@pytest.fixture(scope="module")
def gpt_124m():
    """The book's seed-123 124M model in eval mode (built once: ~1 s, ~650 MB)."""
    torch.manual_seed(123)
    model = gpt2.GPTModel(gpt2.GPT_CONFIG_124M)
    model.eval()
    return model


def test_124m_parameter_count(gpt_124m):
    total = sum(p.numel() for p in gpt_124m.parameters())
    assert total == 163_009_536
    assert total - gpt_124m.out_head.weight.numel() == 124_412_160


def test_book_seed_123_generates_the_books_tokens(gpt_124m):
    """Ch. 4: seed 123, GPT_CONFIG_124M, eval mode, "Hello, I am", 6 greedy tokens. Depends on
    every parameter being created in the book's order with PyTorch's default init."""
    ids = gpt2_encoding().encode("Hello, I am")
    assert ids == [15496, 11, 314, 716]
    out = gpt2.generate_text_simple(gpt_124m, torch.tensor([ids]), max_new_tokens=6,
                                    context_size=gpt2.GPT_CONFIG_124M["context_length"])
    assert out[0, :4].tolist() == ids
    assert out[0, 4:].tolist() == [27018, 24086, 47843, 30961, 42348, 7267]


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_construction_order_draws_rng_as_the_book(qkv_bias):
    """Only the embeddings and Linears consume the RNG; replaying the book's order by hand must
    give identical tensors. (The seed-123 tokens are a weak order check on their own: swapping
    W_query and W_key still reproduces the first four of the six book tokens.)"""
    cfg = {**TINY, "qkv_bias": qkv_bias}
    V, C, D = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"]
    torch.manual_seed(7)
    sd = gpt2.GPTModel(cfg).state_dict()
    torch.manual_seed(7)
    expected = {"tok_emb.weight": torch.nn.Embedding(V, D).weight,
                "pos_emb.weight": torch.nn.Embedding(C, D).weight}
    for i in range(cfg["n_layers"]):
        p = f"trf_blocks.{i}."
        for name in ("W_query", "W_key", "W_value"):
            lin = torch.nn.Linear(D, D, bias=qkv_bias)
            expected[p + f"att.{name}.weight"] = lin.weight
            if qkv_bias:
                expected[p + f"att.{name}.bias"] = lin.bias
        for name, lin in (("att.out_proj", torch.nn.Linear(D, D)),
                          ("ff.layers.0", torch.nn.Linear(D, 4 * D)),
                          ("ff.layers.2", torch.nn.Linear(4 * D, D))):
            expected[p + f"{name}.weight"], expected[p + f"{name}.bias"] = lin.weight, lin.bias
    expected["out_head.weight"] = torch.nn.Linear(D, V, bias=False).weight
    for key, value in expected.items():
        assert torch.equal(sd[key], value), key
    for key in set(sd) - set(expected):  # masks and LayerNorms: deterministic
        assert key.endswith((".mask", ".scale", ".shift")), key


def test_ch3_multihead_attention_example():
    """Ch. 3's printed result: seed 123, d_in 3, d_out 2, 2 heads, no dropout, the six-word input."""
    inputs = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                           [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])
    batch = torch.stack((inputs, inputs), dim=0)
    torch.manual_seed(123)
    mha = gpt2.MultiHeadAttention(3, 2, batch.shape[1], 0.0, num_heads=2)
    expected = torch.tensor([[0.3190, 0.4858], [0.2943, 0.3897], [0.2856, 0.3593],
                             [0.2693, 0.3873], [0.2639, 0.3928], [0.2575, 0.4028]])
    out = mha(batch)
    assert out.shape == (2, 6, 2)
    torch.testing.assert_close(out, expected.expand(2, 6, 2), atol=6e-5, rtol=0)


def test_dropout_only_in_train_mode():
    torch.manual_seed(1)
    model = gpt2.GPTModel(TINY)
    x = torch.randint(0, TINY["vocab_size"], (2, 12))
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    no_drop = gpt2.GPTModel({**TINY, "drop_rate": 0.0})
    no_drop.load_state_dict(model.state_dict())
    no_drop.train()
    assert torch.equal(no_drop(x), no_drop(x))


def test_causal_and_generation_crops_context():
    torch.manual_seed(2)
    model = gpt2.GPTModel(TINY).eval()
    x = torch.randint(0, TINY["vocab_size"], (3, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :6], model(y)[:, :6], atol=0, rtol=0)
        assert not torch.allclose(model(x)[:, 6:], model(y)[:, 6:])

    # longer than context_length: only works because each step sees the last context_size tokens
    C = TINY["context_length"]
    start = torch.randint(0, TINY["vocab_size"], (2, C - 2))
    out = gpt2.generate_text_simple(model, start, max_new_tokens=5, context_size=C)
    assert out.shape == (2, C + 3)
    assert torch.equal(out[:, : C - 2], start)
    with torch.no_grad():
        for t in range(C - 2, C + 3):  # each new token is the argmax given the cropped prefix
            assert torch.equal(out[:, t], model(out[:, max(0, t - C):t])[:, -1].argmax(-1))


def test_layer_norm_matches_torch():
    torch.manual_seed(3)
    ln = gpt2.LayerNorm(24)
    with torch.no_grad():
        ln.scale.normal_()
        ln.shift.normal_()
    x = 3 * torch.randn(4, 5, 24) + 1
    ref = F.layer_norm(x, (24,), ln.scale, ln.shift, eps=1e-5)
    assert_close(ln(x).detach().numpy(), ref.detach().numpy(), OUTPUT, err_msg="book LayerNorm vs F.layer_norm")
    assert ln.eps == 1e-5
    # biased variance: a fresh LayerNorm gives zero mean and (biased) unit variance rows
    y = gpt2.LayerNorm(24)(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(4, 5), atol=1e-4, rtol=0)


def test_gelu_is_tanh_approximation():
    x = torch.linspace(-8, 8, 1001)
    assert_close(gpt2.GELU()(x).numpy(), torch.nn.GELU(approximate="tanh")(x).numpy(), OUTPUT,
                 err_msg="book GELU vs torch's tanh GELU")
    assert not torch.allclose(gpt2.GELU()(x), torch.nn.GELU()(x), atol=1e-5, rtol=0)


def test_feed_forward_and_configs():
    ff = gpt2.FeedForward(TINY)
    assert isinstance(ff.layers[1], gpt2.GELU)
    assert ff(torch.randn(2, 3, 32)).shape == (2, 3, 32)
    assert gpt2.GPT_CONFIG_124M == {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768,
                                    "n_heads": 12, "n_layers": 12, "drop_rate": 0.1,
                                    "qkv_bias": False}
    medium = gpt2.GPT_CONFIG_MEDIUM
    assert (medium["emb_dim"], medium["n_layers"], medium["n_heads"]) == (1024, 24, 16)
    tiny = gpt2.GPT_CONFIG_TINY
    assert tiny["vocab_size"] == 50257 and tiny["emb_dim"] % tiny["n_heads"] == 0
    torch.manual_seed(0)
    model = gpt2.GPTModel(tiny).eval()
    ids = gpt2.text_to_token_ids("Hello, I am", gpt2_encoding())
    out = gpt2.generate_text_simple(model, ids, 3, tiny["context_length"])
    assert out.shape == (1, 7)
    assert gpt2.token_ids_to_text(out[:, :4], gpt2_encoding()) == "Hello, I am"
