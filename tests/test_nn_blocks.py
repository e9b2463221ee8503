"""RoPE, norms and the linear layers' matmul against direct PyTorch transcriptions of the books' / Hugging Face's code."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxllm.nn.norms import LayerNorm, RMSNorm
from jaxllm.nn.ops import dense_dot_general, matmul, rope_tables
from jaxllm.nn.rope import interleaved_to_half, rope_angles, rope_interleaved, rope_rotate_half
from parity import GRAD, OUTPUT, assert_close

pytestmark = pytest.mark.optimized  # parity: compiled as users run it (see conftest.py)


def burkov_rope(x, base=10000.0):
    """Burkov ch. 4's rope(), transcribed: x (batch, seq, dim), positions 0..seq-1."""
    _, seq_len, dim = x.shape
    pos = torch.arange(seq_len, dtype=torch.float32).unsqueeze(1)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = pos * freqs
    even, odd = x[:, :, 0::2], x[:, :, 1::2]
    out = torch.empty_like(x)
    out[:, :, 0::2] = even * torch.cos(angles) - odd * torch.sin(angles)
    out[:, :, 1::2] = even * torch.sin(angles) + odd * torch.cos(angles)
    return out


def hf_rope(x, positions, base=10000.0):
    """Hugging Face Llama's rotate_half convention: x (batch, heads, seq, dim)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = positions[:, :, None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_interleaved_matches_burkov():
    x = np.random.default_rng(0).standard_normal((2, 7, 8)).astype(np.float32)
    cos, sin = rope_angles(jnp.broadcast_to(jnp.arange(7), (2, 7)), 8)
    ours = rope_interleaved(jnp.asarray(x)[:, :, None, :], cos, sin)[:, :, 0]
    assert_close(ours, burkov_rope(torch.from_numpy(x)).numpy(), OUTPUT, err_msg="interleaved RoPE vs Burkov's")


def test_rotate_half_matches_hugging_face_with_per_row_positions():
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 16)).astype(np.float32)  # b, h, t, d
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])  # the second row continues a cache
    cos, sin = rope_angles(positions, 16, base=500000.0)
    ours = rope_rotate_half(jnp.asarray(x).transpose(0, 2, 1, 3), cos, sin).transpose(0, 2, 1, 3)
    ref = hf_rope(torch.from_numpy(x), torch.from_numpy(positions), base=500000.0)
    assert_close(ours, ref.numpy(), OUTPUT, err_msg="rotate-half RoPE vs Hugging Face's")


def test_interleaved_is_rotate_half_on_permuted_lanes():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 6, 2, 12)).astype(np.float32))
    cos, sin = rope_angles(jnp.arange(6)[None], 12)
    p = interleaved_to_half(12)
    # the same multiplications and additions on permuted lanes: bit-identical here, so tighter than OUTPUT
    np.testing.assert_allclose(np.asarray(rope_interleaved(x, cos, sin)[..., p]),
                               np.asarray(rope_rotate_half(x[..., p], cos, sin)), atol=1e-6)


def test_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 8)).astype(np.float32)) for _ in range(2))
    def score(m, n):
        cq, sq = rope_angles(jnp.array([[m]]), 8)
        ck, sk = rope_angles(jnp.array([[n]]), 8)
        return float(jnp.sum(rope_interleaved(q, cq, sq) * rope_interleaved(k, ck, sk)))
    assert_close(score(13, 10), score(5, 2), OUTPUT, err_msg="scores at the same offset")
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="even head_dim"):
        rope_angles(jnp.zeros((1, 2), jnp.int32), 7)


def test_rmsnorm_matches_burkov_formula():
    x = np.random.default_rng(4).standard_normal((3, 10)).astype(np.float32)
    params = RMSNorm(eps=1e-8).init(jax.random.PRNGKey(0), x)
    params = jax.tree_util.tree_map(lambda s: s * 1.5, params)
    t = torch.from_numpy(x)
    ref = t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-8) * 1.5
    assert_close(RMSNorm(eps=1e-8).apply(params, x), ref.numpy(), OUTPUT, err_msg="RMSNorm vs Burkov's formula")


def test_layernorm_matches_raschka_formula():
    x = np.random.default_rng(5).standard_normal((3, 10)).astype(np.float32) * 3 + 1
    params = LayerNorm().init(jax.random.PRNGKey(0), x)
    assert set(params["params"]) == {"scale", "shift"}
    t = torch.from_numpy(x)
    ref = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True, unbiased=False) + 1e-5)
    assert_close(LayerNorm().apply(params, x), ref.numpy(), OUTPUT, err_msg="LayerNorm vs Raschka's formula")


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_gradients_match_torch_autograd_of_the_formula(kind):
    """The norms' hand-written backward against PyTorch's autograd of the books' formulas, with a
    non-trivial scale/shift and an upstream gradient that is not all ones (3-D input: the parameter
    gradients sum over batch and time)."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 5, 12)) * 2 + 0.5).astype(np.float32)
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    scale = (1 + 0.3 * rng.standard_normal(12)).astype(np.float32)
    shift = (0.3 * rng.standard_normal(12)).astype(np.float32)
    if kind == "layernorm":
        module, params = LayerNorm(), {"params": {"scale": scale, "shift": shift}}
    else:
        module, params = RMSNorm(eps=1e-6), {"params": {"scale": scale}}

    grads = jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * upstream), argnums=(0, 1))(params, jnp.asarray(x))

    tx, tscale, tshift = (torch.tensor(a, requires_grad=True) for a in (x, scale, shift))
    if kind == "layernorm":
        centred = tx - tx.mean(-1, keepdim=True)
        y = centred / torch.sqrt(tx.var(-1, keepdim=True, unbiased=False) + 1e-5) * tscale + tshift
    else:
        y = tx / torch.sqrt(tx.pow(2).mean(-1, keepdim=True) + 1e-6) * tscale
    (y * torch.from_numpy(upstream)).sum().backward()
    assert_close(grads[1], tx.grad.numpy(), GRAD, err_msg=f"{kind} input gradient")
    assert_close(grads[0]["params"]["scale"], tscale.grad.numpy(), GRAD, err_msg=f"{kind} scale gradient")
    if kind == "layernorm":
        assert_close(grads[0]["params"]["shift"], tshift.grad.numpy(), GRAD, err_msg="layernorm shift gradient")


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
def test_matmul_gradients_match_torch(shape):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((*shape[:-1], 5)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    upstream = rng.standard_normal((*shape[:-1], 4)).astype(np.float32)
    out, pullback = jax.vjp(matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = pullback(jnp.asarray(upstream))
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    ty = tx @ tw
    ty.backward(torch.from_numpy(upstream))
    assert_close(out, ty.detach().numpy(), OUTPUT, err_msg="x @ w")
    assert_close(dx, tx.grad.numpy(), GRAD, err_msg="input gradient")
    assert_close(dw, tw.grad.numpy(), GRAD, err_msg="weight gradient")


def test_weight_gradient_is_not_preceded_by_a_transposed_copy():
    """JAX's own derivative of ``x[b, t, in] @ w`` made XLA's CPU compile copy the output gradient
    transposed before the weight gradient's product (9 % of a GPT-2 training step); ``matmul``'s
    backward must leave no copy or transpose of it."""
    x, w, up = jnp.ones((4, 32, 16)), jnp.ones((16, 64)), jnp.ones((4, 32, 64))

    def moved(product) -> list[str]:
        hlo = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(product(x, w)) * up))).lower(w, x).compile().as_text()
        return re.findall(r"= (f32\[[\d,]+\])\{[\d,]+\} (?:copy|transpose)\(", hlo)

    if not moved(jnp.matmul):
        pytest.skip("this XLA compiles JAX's own derivative without the copy too: nothing to compare")
    assert moved(matmul) == []


def test_dense_dot_general_takes_other_contractions_to_lax():
    a, b = jnp.arange(6.0).reshape(2, 3), jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(dense_dot_general(a, b, (((1,), (0,)), ((), ()))), a @ b)
    np.testing.assert_array_equal(dense_dot_general(b, a, (((0,), (1,)), ((), ()))), b.T @ a.T)


def test_rope_tables_from_numpy_positions_match_the_traced_ones():
    positions = np.arange(40, dtype=np.int32)[None, :]
    tables, traced = rope_tables(positions, 16), rope_angles(jnp.asarray(positions), 16)
    assert all(isinstance(a, np.ndarray) for a in tables)
    for a, b in zip(tables, traced):
        assert_close(a, b, OUTPUT, err_msg="numpy vs XLA cos/sin")


def test_a_training_step_computes_no_rope_cos_or_sin():
    """Without a cache the decoder's RoPE tables are numpy constants: XLA fused a traced cos/sin
    into every use (each head, Q and K, forward and backward): RoPE took 74 ms of a config-B
    step's operations on 2 Xeon cores, 20 ms with the tables."""
    from jaxllm.models.transformer import TransformerConfig

    config = TransformerConfig(vocab_size=32, d_model=32, num_heads=4, num_layers=2)
    params = config.init(jax.random.PRNGKey(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    loss = lambda p: jnp.sum(config.logits(p, tokens))
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert not re.findall(r" (?:cosine|sine)\(", hlo)
