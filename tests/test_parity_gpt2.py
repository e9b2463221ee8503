"""GPT-2 (Raschka ch. 4): the Flax model and the book's PyTorch twin agree on logits (with and
without Q/K/V biases), gradients and 10-step AdamW and Muon trajectories; the twin's state dict (with its
mask buffers) loads through interop; cached decoding equals the full forward; the book's seed-123
greedy generation reproduces in JAX; the 124M parameter counts are the book's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxllm.models.gpt2 as g
from jaxllm import interop
from jaxllm.config import config_from_dict
from jaxllm.torch_ref import gpt2 as t_gpt2
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step
from jaxllm.training.losses import lm_cross_entropy
from parity import run_both_trajectories
from parity import GRAD, OUTPUT, TRAJECTORY, assert_close, assert_same_tensors, to_numpy_state, torch_grads

pytestmark = pytest.mark.optimized  # parity: compiled as users run it (see conftest.py)

CONFIG = g.GPT2Config(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                      qkv_bias=False)


def twin_and_params(seed=0, config=CONFIG):
    torch.manual_seed(seed)
    twin = t_gpt2.GPTModel(config.to_twin_dict()).eval()
    return twin, interop.from_torch(config, twin.state_dict(), strict=False)


def apply_logits(config):
    model = config.build()
    return lambda params, tokens: model.apply({"params": params}, tokens)[0]


def make_batch(rng, batch=3, time=12, config=CONFIG):
    seqs = rng.integers(0, config.vocab_size, (batch, time + 1)).astype(np.int32)
    return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}


def torch_loss(twin, batch):
    logits = twin(torch.from_numpy(batch["inputs"]).long())
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch["targets"]).long().flatten())


def test_names_and_mask_buffers():
    twin, params = twin_and_params()
    sd = twin.state_dict()
    masks = sorted(k for k in sd if k.endswith(".att.mask"))
    assert masks == ["trf_blocks.0.att.mask", "trf_blocks.1.att.mask"]
    with pytest.raises(ValueError, match=r"unexpected \['trf_blocks.0.att.mask', 'trf_blocks.1.att.mask'\]"):
        interop.from_torch(CONFIG, sd)
    strict = interop.from_torch(CONFIG, t_gpt2.drop_masks(sd))  # strict about everything else
    jax.tree_util.tree_map(np.testing.assert_array_equal, strict, params)
    assert set(interop.to_torch_numpy(params)) == set(sd) - set(masks)
    assert set(params["trf_blocks_0"]["ff"]) == {"layers_0", "layers_2"}
    assert "bias" not in params["out_head"] and "bias" not in params["trf_blocks_0"]["att"]["W_query"]
    # and back: the twin loads the converted params (its own masks kept)
    fresh = t_gpt2.load_without_masks(t_gpt2.GPTModel(CONFIG.to_twin_dict()), interop.to_torch(CONFIG, params))
    for name, value in sd.items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)
    assert config_from_dict(CONFIG.to_dict()) == CONFIG


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_logits_match(qkv_bias):
    config = CONFIG.replace(qkv_bias=qkv_bias)
    twin, params = twin_and_params(1, config)
    assert ("bias" in params["trf_blocks_1"]["att"]["W_key"]) == qkv_bias
    x = make_batch(np.random.default_rng(1), time=16)["inputs"]
    logits, cache = config.build().apply({"params": params}, jnp.asarray(x))
    assert logits.shape == (3, 16, 97) and cache is None
    with torch.no_grad():
        expected = twin(torch.from_numpy(x).long()).numpy()
    assert_close(logits, expected, OUTPUT, err_msg="gpt2 logits")
    assert_close(jax.jit(config.logits)(params, jnp.asarray(x)), expected, OUTPUT, err_msg="gpt2 jitted logits")


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_gradients_match(qkv_bias):
    config = CONFIG.replace(qkv_bias=qkv_bias)
    twin, params = twin_and_params(2, config)
    batch = make_batch(np.random.default_rng(2))
    (loss, _), grads = jax.value_and_grad(lm_cross_entropy(apply_logits(config)), has_aux=True)(params, batch, None)
    t_loss = torch_loss(twin, batch)
    t_loss.backward()
    assert_close(float(loss), t_loss.item(), OUTPUT, err_msg="gpt2 loss")
    assert_same_tensors(grads, torch_grads(twin), GRAD, what="gpt2 grads")


def test_ten_step_adamw_trajectory_matches():
    twin, params = twin_and_params(seed=3)
    twin.train()  # drop_rate 0: train mode changes nothing
    rng = np.random.default_rng(4)
    batches = [make_batch(rng) for _ in range(10)]

    optimizer = make_optimizer(OptimizerConfig("adamw", lr=4e-4, weight_decay=0.1))
    step = make_train_step(lm_cross_entropy(apply_logits(CONFIG)), optimizer)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(0))
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=4e-4, weight_decay=0.1)
    state, jax_losses, torch_losses = run_both_trajectories(step, state, twin, torch_opt, torch_loss, batches)

    assert_close(jax_losses, torch_losses, TRAJECTORY, err_msg="gpt2 losses over 10 AdamW steps")
    assert jax_losses[-1] < jax_losses[0]
    assert_same_tensors(state.params, t_gpt2.drop_masks(to_numpy_state(twin)), TRAJECTORY,
                        what="gpt2 params after 10 AdamW steps")


def fp32_newton_schulz(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's ``_zeropower_via_newtonschulz`` without its cast to bf16 (ours runs in
    the params' fp32): the same quintic iteration on the wide orientation."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.T if tall else grad
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class BothOptimizers:
    """torch.optim.Muon for the blocks' matrices and AdamW for the rest, stepped together."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad()

    def step(self):
        for opt in self.optimizers:
            opt.step()


def test_ten_step_muon_trajectory_matches(monkeypatch):
    """``--optimizer muon``: torch.optim.Muon on every 2-D weight of the blocks (nn.Linear, so
    torch's [out, in] is our kernel transposed), AdamW on embeddings, head, norms and biases."""
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", fp32_newton_schulz)
    twin, params = twin_and_params(seed=3)
    twin.train()
    rng = np.random.default_rng(4)
    batches = [make_batch(rng) for _ in range(10)]

    optimizer = make_optimizer(OptimizerConfig("muon", lr=4e-4, muon_lr=0.02, weight_decay=0.1,
                                               muon_blocks=CONFIG.block_names))
    step = make_train_step(lm_cross_entropy(apply_logits(CONFIG)), optimizer)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(0))
    named = list(twin.named_parameters())
    matrices = [p for n, p in named if n.startswith("trf_blocks.") and p.ndim == 2]
    rest = [p for n, p in named if not (n.startswith("trf_blocks.") and p.ndim == 2)]
    assert len(matrices) == 2 * 6 and rest  # Q, K, V, out_proj and the two MLP weights per block
    torch_opt = BothOptimizers(torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1),
                               torch.optim.AdamW(rest, lr=4e-4, weight_decay=0.1))
    state, jax_losses, torch_losses = run_both_trajectories(step, state, twin, torch_opt, torch_loss, batches)

    assert_close(jax_losses, torch_losses, TRAJECTORY, err_msg="gpt2 losses over 10 Muon steps")
    assert jax_losses[-1] < jax_losses[0]
    assert_same_tensors(state.params, t_gpt2.drop_masks(to_numpy_state(twin)), TRAJECTORY,
                        what="gpt2 params after 10 Muon steps")


def test_cached_decoding_equals_full_forward():
    config = CONFIG.replace(qkv_bias=True)
    params = twin_and_params(5, config)[1]
    x = jnp.asarray(np.random.default_rng(5).integers(0, 97, (2, 16)).astype(np.int32))
    full, _ = config.build().apply({"params": params}, x)
    forward = jax.jit(config.forward)

    logits, cache = forward(params, x[:, :4], config.init_cache(2))
    pieces = [logits]
    for t in range(4, 16):
        logits, cache = forward(params, x[:, t:t + 1], cache)
        pieces.append(logits)
    assert_close(np.concatenate(pieces, 1), full, OUTPUT, err_msg="prompt + one token at a time vs full")
    assert len(cache.keys) == 2 and {a.shape for a in cache.keys} == {(2, 4, 16, 8)}
    assert {a.shape for a in cache.values} == {(2, 4, 8, 16)}  # slots last
    np.testing.assert_array_equal(np.asarray(cache.lengths), [16, 16])
    with pytest.raises(ValueError, match="overflow"):
        cache.check_room(1)

    cache, pieces = config.init_cache(2), []
    for lo, hi in [(0, 1), (1, 5), (5, 6), (6, 10), (10, 14), (14, 15), (15, 16)]:
        logits, cache = forward(params, x[:, lo:hi], cache)
        pieces.append(logits)
    assert_close(np.concatenate(pieces, 1), full, OUTPUT, err_msg="uneven chunks vs full")


def test_bad_inputs_and_configs_are_refused():
    assert CONFIG.validate_input(np.zeros((2, 16), np.int64)).dtype == np.int32
    with pytest.raises(ValueError, match="context_length of 16"):
        CONFIG.validate_input(np.zeros((1, 17), np.int32))
    with pytest.raises(ValueError, match=r"\[0, 96\]"):
        CONFIG.validate_input([[0, 97]])
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        CONFIG.validate_input([1, 2, 3])
    with pytest.raises(ValueError, match="max_len"):
        CONFIG.init_cache(1, max_len=17)
    with pytest.raises(ValueError, match="divisible"):
        CONFIG.replace(n_heads=5)


def test_dropout_only_with_rng_and_not_deterministic():
    config = CONFIG.replace(drop_rate=0.5)
    params = twin_and_params(6)[1]
    model = config.build()
    x = jnp.asarray(np.random.default_rng(6).integers(0, 97, (2, 8)).astype(np.int32))
    ref = model.apply({"params": params}, x)[0]
    np.testing.assert_array_equal(model.apply({"params": params}, x, deterministic=False)[0], ref)  # no rng
    np.testing.assert_array_equal(
        model.apply({"params": params}, x, rngs={"dropout": jax.random.PRNGKey(0)})[0], ref)  # deterministic
    noisy = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})[0]
    assert np.abs(np.asarray(noisy - ref)).max() > 1e-3


def test_parameter_counts_are_the_books():
    def count(config):
        return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(interop.param_shapes(config)))

    assert count(g.gpt2_124m()) == 163_009_536
    assert count(g.gpt2_124m(tie_embeddings=True)) == 124_412_160
    assert g.gpt2_124m().to_twin_dict() == t_gpt2.GPT_CONFIG_124M
    assert g.gpt2_medium().to_twin_dict() == t_gpt2.GPT_CONFIG_MEDIUM
    assert g.tiny().to_twin_dict() == t_gpt2.GPT_CONFIG_TINY


def test_book_seed_123_generation_in_jax():
    """torch.manual_seed(123) + GPTModel(GPT_CONFIG_124M), converted to JAX: greedy 6 tokens after
    "Hello, I am" are the book's. Prompt in one cached call, then 5 single-token calls."""
    from jaxllm.data.tokenizer import gpt2_encoding

    prompt = gpt2_encoding().encode("Hello, I am")
    assert prompt == [15496, 11, 314, 716]
    config = g.gpt2_124m()
    torch.manual_seed(123)
    twin = t_gpt2.GPTModel(t_gpt2.GPT_CONFIG_124M)
    params = interop.from_torch(config, twin.state_dict(), strict=False)
    del twin

    forward = jax.jit(config.forward)
    ids = config.validate_input([prompt])
    cache = config.init_cache(1, max_len=16)
    logits, cache = forward(params, jnp.asarray(ids), cache)
    out = []
    for _ in range(6):
        nxt = int(jnp.argmax(logits[0, -1]))
        out.append(nxt)
        if len(out) < 6:
            logits, cache = forward(params, jnp.asarray([[nxt]], jnp.int32), cache)
    assert out == [27018, 24086, 47843, 30961, 42348, 7267]
