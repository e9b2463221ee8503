"""Burkov's decoder language model: the Flax model and the book's PyTorch twin agree on logits,
gradients (pad row included), a 10-step AdamW trajectory, weight round trips and initialisation;
the llama preset and its Llama-style twin (grouped-query, tied or not) agree on logits, gradients
and 10-step AdamW and Muon trajectories, and a sign error in its RoPE is caught;
cached decoding (token by token and in chunks) equals the full forward for the burkov layout and
a Llama-style GQA config; bad token arrays and configs are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxllm.models.transformer as tr
from jaxllm import interop
from jaxllm.config import config_from_dict
from jaxllm.torch_ref import transformer as t_tr
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step
from jaxllm.training.losses import lm_cross_entropy
from parity import run_both_trajectories
from parity import GRAD, OUTPUT, TRAJECTORY, assert_close, assert_same_tensors, to_numpy_state, torch_grads

pytestmark = pytest.mark.optimized  # parity: compiled as users run it (see conftest.py)

PAD = 1
CONFIG = tr.TransformerConfig(vocab_size=13, d_model=16, num_heads=2, num_layers=2, pad_index=PAD, max_len=32)
LLAMA_GQA = tr.llama(13, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, mlp_hidden=48, max_len=32,
                     pad_index=PAD)


def apply_logits(config):
    model = config.build()
    return lambda params, tokens: model.apply({"params": params}, tokens)[0]


def twin_and_params(seed=0, config=CONFIG):
    torch.manual_seed(seed)
    twin = t_tr.from_config(config)
    return twin, interop.from_torch(config, twin.state_dict())


def make_batch(rng, batch=4, time=7, config=CONFIG):
    """Right-padded ragged rows as the book's collate_fn makes, plus one left-padded last row: with
    right padding alone the pad row gets no gradient, so the left-padded row is what checks it."""
    seqs = rng.integers(2, config.vocab_size, (batch, time + 1))
    lengths = rng.integers(3, time, batch)
    lengths[0] = time + 1
    for row, n in enumerate(lengths[:-1]):
        seqs[row, n:] = PAD
    seqs[-1, : time + 1 - lengths[-1]] = PAD
    seqs = seqs.astype(np.int32)
    return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}


def torch_loss(twin, batch):
    logits = twin(torch.from_numpy(batch["inputs"]).long())
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.from_numpy(batch["targets"]).long().reshape(-1), ignore_index=PAD)


def test_state_dict_keys_are_the_books():
    twin, params = twin_and_params()
    D, dh, V = 16, 8, 13
    expected = {"embedding.weight": (V, D), "output": (D, V)}
    for i in range(2):
        expected |= {f"layers.{i}.norm1.scale": (D,), f"layers.{i}.norm2.scale": (D,),
                     f"layers.{i}.attn.W_O": (D, D), f"layers.{i}.mlp.W_1": (D, 4 * D),
                     f"layers.{i}.mlp.B_1": (4 * D,), f"layers.{i}.mlp.W_2": (4 * D, D), f"layers.{i}.mlp.B_2": (D,)}
        expected |= {f"layers.{i}.attn.heads.{h}.{w}": (D, dh) for h in range(2) for w in ("W_Q", "W_K", "W_V")}
    assert {k: tuple(v.shape) for k, v in twin.state_dict().items()} == expected
    assert params["layers_0"]["attn"]["heads_1"]["W_Q"].shape == (D, dh)
    assert config_from_dict(CONFIG.to_dict()) == CONFIG
    assert config_from_dict(LLAMA_GQA.to_dict()) == LLAMA_GQA


def test_logits_match():
    twin, params = twin_and_params()
    x = make_batch(np.random.default_rng(1))["inputs"]
    logits, cache = CONFIG.build().apply({"params": params}, jnp.asarray(x))
    assert logits.shape == (4, 7, CONFIG.vocab_size) and cache is None
    assert_close(logits, twin(torch.from_numpy(x).long()).detach().numpy(), OUTPUT, err_msg="transformer logits")
    assert_close(jax.jit(CONFIG.logits)(params, jnp.asarray(x)), logits, OUTPUT, err_msg="jitted vs eager logits")


def test_gradients_match_and_pad_row_gets_none():
    twin, params = twin_and_params()
    batch = make_batch(np.random.default_rng(2))
    assert (batch["inputs"][-1] == PAD).any() and (batch["targets"] == PAD).any()

    loss_fn = lm_cross_entropy(apply_logits(CONFIG), PAD)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
    t_loss = torch_loss(twin, batch)
    t_loss.backward()
    assert_close(float(loss), t_loss.item(), OUTPUT, err_msg="transformer loss")
    # the embedding's gradient is ~50x the others (the first RMSNorm divides by the rms of
    # N(0, 0.02) rows); the policy's atol follows each tensor's own scale, so it needs no special case
    assert_same_tensors(grads, torch_grads(twin), GRAD, what="transformer gradients")

    emb_grad = np.asarray(grads["embedding"]["embedding"])
    assert np.all(emb_grad[PAD] == 0) and np.all(twin.embedding.weight.grad[PAD].numpy() == 0)
    assert np.abs(emb_grad).sum() > 0
    # ... which is the masking's doing: without it the left-padded row pushes on the pad row.
    unmasked = CONFIG.replace(pad_index=None)
    raw = jax.grad(lambda p: lm_cross_entropy(apply_logits(unmasked), PAD)(p, batch, None)[0])(params)
    assert np.abs(np.asarray(raw["embedding"]["embedding"])[PAD]).max() > 1e-6


def test_ten_step_adamw_trajectory_matches():
    twin, params = twin_and_params(seed=3)
    rng = np.random.default_rng(4)
    batches = [make_batch(rng) for _ in range(10)]

    optimizer = make_optimizer(OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01))
    step = make_train_step(lm_cross_entropy(apply_logits(CONFIG), PAD), optimizer)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(0))
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.01)
    state, jax_losses, torch_losses = run_both_trajectories(step, state, twin, torch_opt, torch_loss, batches)

    assert_close(jax_losses, torch_losses, TRAJECTORY, err_msg="transformer losses over 10 AdamW steps")
    assert_same_tensors(state.params, to_numpy_state(twin), TRAJECTORY, what="transformer params after 10 AdamW steps")
    # the pad row starts at 0 and, with no gradient, stays 0 on both sides
    assert np.all(np.asarray(state.params["embedding"]["embedding"])[PAD] == 0)
    assert np.all(twin.embedding.weight[PAD].detach().numpy() == 0)


def test_to_torch_round_trip_loads_strictly():
    twin, params = twin_and_params(seed=6)
    fresh = t_tr.DecoderLanguageModel(CONFIG.vocab_size, CONFIG.d_model, CONFIG.num_heads, CONFIG.num_layers, PAD)
    fresh.load_state_dict(interop.to_torch(CONFIG, params), strict=True)
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)


def matrices(params, config):
    """name -> (value, fan_in, fan_out) of every matrix in a per_head-layout param tree."""
    D, dh, V = config.d_model, config.head_dim, config.vocab_size
    out = {"output": (params["output"], D, V)}
    for i in range(config.num_layers):
        layer = params[f"layers_{i}"]
        out[f"{i}.W_O"] = (layer["attn"]["W_O"], D, D)
        out[f"{i}.W_1"] = (layer["mlp"]["W_1"], D, 4 * D)
        out[f"{i}.W_2"] = (layer["mlp"]["W_2"], 4 * D, D)
        for h in range(config.num_heads):
            for w in ("W_Q", "W_K", "W_V"):
                out[f"{i}.{h}.{w}"] = (layer["attn"][f"heads_{h}"][w], D, dh)
    return out


@pytest.mark.parametrize("side", ["flax", "torch"])
def test_init_follows_the_book(side):
    config = tr.burkov(vocab_size=300, pad_index=PAD)
    if side == "flax":
        params = config.build().init(jax.random.PRNGKey(0), config.example_input())["params"]
    else:
        params = twin_and_params(seed=7, config=config)[1]
    table = np.asarray(params["embedding"]["embedding"])
    assert np.all(table[PAD] == 0)
    assert abs(np.delete(table, PAD, axis=0).std() - 0.02) < 0.001
    for name, (value, fan_in, fan_out) in matrices(params, config).items():
        bound, biggest = tr.xavier_bound(fan_in, fan_out), float(jnp.abs(value).max())
        assert 0.9 * bound < biggest <= bound, f"{name}: max |w| {biggest} vs xavier bound {bound}"
    for i in range(config.num_layers):
        layer = params[f"layers_{i}"]
        assert np.all(np.asarray(layer["mlp"]["B_1"]) == 0) and np.all(np.asarray(layer["mlp"]["B_2"]) == 0)
        assert np.all(np.asarray(layer["norm1"]["scale"]) == 1) and np.all(np.asarray(layer["norm2"]["scale"]) == 1)


def init_params(config, seed=0):
    return config.build().init(jax.random.PRNGKey(seed), config.example_input())["params"]


@pytest.mark.parametrize("config", [CONFIG, LLAMA_GQA], ids=["burkov", "llama_gqa"])
def test_cached_decoding_equals_full_forward(config):
    """Every call below reuses two compiled shapes (T = 4 and T = 1) to keep the test fast."""
    params = twin_and_params()[1] if config is CONFIG else init_params(config)
    model = config.build()
    x = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (3, 11)).astype(np.int32))
    full, _ = model.apply({"params": params}, x)  # the unjitted model, no cache
    forward = jax.jit(config.forward)

    # prompt of 4, then one token at a time
    logits, cache = forward(params, x[:, :4], config.init_cache(3))
    pieces = [logits]
    for t in range(4, x.shape[1]):
        logits, cache = forward(params, x[:, t:t + 1], cache)
        pieces.append(logits)
    assert_close(np.concatenate(pieces, 1), full, OUTPUT, err_msg="prompt + one token at a time vs full")
    assert len(cache.keys) == len(cache.values) == config.num_layers  # one array per layer, heads first
    assert {a.shape for a in cache.keys} == {(3, config.kv_heads, config.max_len, config.head_dim)}
    assert {a.shape for a in cache.values} == {(3, config.kv_heads, config.head_dim, config.max_len)}  # slots last
    np.testing.assert_array_equal(np.asarray(cache.lengths), [11, 11, 11])

    # uneven chunks
    cache, pieces = config.init_cache(3), []
    for lo, hi in [(0, 1), (1, 5), (5, 6), (6, 10), (10, 11)]:
        logits, cache = forward(params, x[:, lo:hi], cache)
        pieces.append(logits)
    assert_close(np.concatenate(pieces, 1), full, OUTPUT, err_msg="uneven chunks vs full")

    # rows at different lengths continue independently (a ragged cache): rows 1 and 2 "forget"
    # the tail of the prompt, then all rows take x[:, 4]. Reference: row r of y is x[r, :n_r],
    # then x[r, 4], then junk; causality makes the junk irrelevant to y's logits at n_r.
    _, cache = forward(params, x[:, :4], config.init_cache(3))
    ns = [4, 2, 3]
    logits, cache = forward(params, x[:, 4:5], cache.replace(lengths=jnp.array(ns, jnp.int32)))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [n + 1 for n in ns])
    y = np.asarray(x).copy()
    for row, n in enumerate(ns):
        y[row, n] = x[row, 4]
    ref, _ = model.apply({"params": params}, jnp.asarray(y))
    for row, n in enumerate(ns):
        assert_close(logits[row, 0], ref[row, n], OUTPUT, err_msg=f"ragged cache, row {row}")


def test_gqa_is_multi_head_with_repeated_kv_heads():
    """Query head h reads KV head h // (H / KV) (Hugging Face's repeat_kv): repeating each KV
    head's W_K/W_V columns gives a plain multi-head model with the same logits."""
    params = init_params(LLAMA_GQA)
    mha = LLAMA_GQA.replace(num_kv_heads=None)
    dh, group = LLAMA_GQA.head_dim, LLAMA_GQA.num_heads // LLAMA_GQA.kv_heads
    mha_params = jax.tree_util.tree_map(lambda a: a, params)
    for i in range(LLAMA_GQA.num_layers):
        attn = dict(mha_params[f"layers_{i}"]["attn"])
        for w in ("W_K", "W_V"):
            cols = attn[w].reshape(LLAMA_GQA.d_model, LLAMA_GQA.kv_heads, dh)
            attn[w] = jnp.repeat(cols, group, axis=1).reshape(LLAMA_GQA.d_model, -1)
        mha_params[f"layers_{i}"] = {**mha_params[f"layers_{i}"], "attn": attn}
    x = jnp.asarray(np.random.default_rng(8).integers(0, 13, (2, 6)).astype(np.int32))
    assert_close(jax.jit(mha.logits)(mha_params, x), jax.jit(LLAMA_GQA.logits)(params, x), OUTPUT,
                 err_msg="multi-head with repeated KV vs GQA")


def test_cache_misuse_is_refused():
    params = init_params(CONFIG)
    model = CONFIG.build()
    x = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="cache must have"):
        model.apply({"params": params}, x, cache=CONFIG.init_cache(3))
    with pytest.raises(ValueError, match="do not fit"):
        model.apply({"params": params}, x, cache=CONFIG.init_cache(2, max_len=4))
    cache = CONFIG.init_cache(2, max_len=8).replace(lengths=jnp.array([2, 6], jnp.int32))
    cache.check_room(2)
    with pytest.raises(ValueError, match="overflow"):
        cache.check_room(3)


def test_llama_preset_shapes_and_tying():
    names = set(LLAMA_GQA.build().init(jax.random.PRNGKey(0), LLAMA_GQA.example_input())["params"]["layers_0"]["attn"])
    assert names == {"W_Q", "W_K", "W_V", "W_O"}
    params = init_params(LLAMA_GQA)
    assert params["layers_0"]["attn"]["W_K"].shape == (32, 2 * 8) and "final_norm" in params
    assert set(params["layers_0"]["mlp"]) == {"W_1", "W_2", "W_3"}
    tied = LLAMA_GQA.replace(tie_embeddings=True)
    tied_params = init_params(tied)
    assert "output" not in tied_params
    x = jnp.asarray([[2, 1, 3, 4]], jnp.int32)  # the pad row still trains through the tied head
    grads = jax.grad(lambda p: tied.build().apply({"params": p}, x)[0][0, -1, PAD])(tied_params)
    assert np.abs(np.asarray(grads["embedding"]["embedding"])[PAD]).max() > 0
    with pytest.raises(ValueError):
        t_tr.from_config(LLAMA_GQA)


@pytest.mark.parametrize("tokens,match", [
    (np.array([[0, 13]]), r"\[0, 12\].*vocabulary of 13"),
    (np.array([[-1, 2]]), r"\[0, 12\].*vocabulary of 13"),
    (np.array([0, 1, 2]), r"\[batch, time\]"),
    (np.zeros((1, 3), np.float32), "integers"),
])
def test_bad_tokens_are_refused(tokens, match):
    with pytest.raises(ValueError, match=match):
        CONFIG.validate_input(tokens)


@pytest.mark.parametrize("changes,match", [
    (dict(pad_index=13), "pad_index"),
    (dict(num_heads=3), "divisible"),
    (dict(num_kv_heads=1), "qkv_layout='fused'"),
    (dict(num_kv_heads=3, qkv_layout="fused", num_heads=4), "num_kv_heads"),
    (dict(rope="alibi"), "rope"),
    (dict(mlp="gelu"), "mlp"),
])
def test_good_tokens_pass_and_bad_configs_are_refused(changes, match):
    assert CONFIG.validate_input([[0, 12]]).dtype == np.int32
    with pytest.raises(ValueError, match=match):
        CONFIG.replace(**changes)
    book = tr.burkov(100)
    assert (book.d_model, book.num_heads, book.num_layers, book.final_norm) == (128, 8, 2, False)


# -- the Llama-style twin (jaxllm.torch_ref.llama) -----------------------------------------------

LLAMA_TIED = tr.llama(13, d_model=32, num_heads=4, num_layers=2, max_len=32, tie_embeddings=True)


def llama_twin_and_params(config, seed=0):
    from jaxllm.torch_ref import twin_of

    torch.manual_seed(seed)
    twin = twin_of(config)
    return twin, interop.from_torch(config, dict(twin.named_parameters()))


@pytest.mark.parametrize("config", [LLAMA_GQA, LLAMA_TIED], ids=["gqa_untied", "tied"])
def test_llama_twin_logits_and_gradients_match(config):
    twin, params = llama_twin_and_params(config)
    assert {type(twin).__name__, twin.layers[0].attn.group_size} == {"LlamaModel", config.num_heads // config.kv_heads}
    batch = make_batch(np.random.default_rng(2), config=config)
    logits = config.logits(params, jnp.asarray(batch["inputs"]))
    assert_close(logits, twin(torch.from_numpy(batch["inputs"]).long()).detach().numpy(), OUTPUT,
                 err_msg="llama logits")
    (loss, _), grads = jax.value_and_grad(lm_cross_entropy(apply_logits(config), PAD), has_aux=True)(
        params, batch, None)
    t_loss = torch_loss(twin, batch)
    t_loss.backward()
    assert_close(float(loss), t_loss.item(), OUTPUT, err_msg="llama loss")
    assert_same_tensors(grads, {n: p.grad.numpy() for n, p in twin.named_parameters()}, GRAD, what="llama gradients")


def test_a_sign_error_in_rotate_half_rope_is_caught():
    """The test the twin exists for: the Flax model with its RoPE rotated the other way (one sign)
    differs from the twin beyond the tolerance."""
    import jaxllm.nn.attention as attention

    twin, params = llama_twin_and_params(LLAMA_GQA)
    x = make_batch(np.random.default_rng(3), config=LLAMA_GQA)["inputs"]
    expected = twin(torch.from_numpy(x).long()).detach().numpy()
    rotate_half = attention.ROPE["rotate_half"]
    logits = apply_logits(LLAMA_GQA)  # traced at each call (not jitted): the patch takes effect
    assert_close(logits(params, jnp.asarray(x)), expected, OUTPUT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(attention.ROPE, "rotate_half", lambda q, cos, sin: rotate_half(q, cos, -sin))
        wrong = np.asarray(logits(params, jnp.asarray(x)))
    with pytest.raises(AssertionError):
        assert_close(wrong, expected, OUTPUT)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_llama_ten_step_trajectory_matches(optimizer, monkeypatch):
    """AdamW, and Muon on the blocks' matrices beside AdamW. For Muon, torch's Newton-Schulz runs
    in fp32 as ours does (the GPT-2 test's patch), and its step scale reads the twin's x@W matrices
    [fan_in, fan_out] the way ours does, sqrt(max(1, fan_out / fan_in)) (torch assumes [out, in])."""
    from test_parity_gpt2 import BothOptimizers, fp32_newton_schulz

    config = LLAMA_GQA
    twin, params = llama_twin_and_params(config, seed=3)
    rng = np.random.default_rng(4)
    batches = [make_batch(rng, config=config) for _ in range(10)]
    if optimizer == "adamw":
        opt_config = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)
        torch_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.01)
    else:
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", fp32_newton_schulz)
        monkeypatch.setattr(torch.optim._muon, "_adjust_lr",
                            lambda lr, fn, shape: lr * np.sqrt(max(1.0, shape[1] / shape[0])))
        opt_config = OptimizerConfig("muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1, muon_blocks=config.block_names)
        named = list(twin.named_parameters())
        matrices = [p for n, p in named if n.startswith("layers.") and p.ndim == 2]
        rest = [p for n, p in named if not (n.startswith("layers.") and p.ndim == 2)]
        assert len(matrices) == 7 * config.num_layers
        torch_opt = BothOptimizers(torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1),
                                   torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.1))
    optax_opt = make_optimizer(opt_config)
    step = make_train_step(lm_cross_entropy(apply_logits(config), PAD), optax_opt)
    state = TrainState.create(params, optax_opt, jax.random.PRNGKey(0))
    state, jax_losses, torch_losses = run_both_trajectories(step, state, twin, torch_opt, torch_loss, batches)
    assert_close(jax_losses, torch_losses, TRAJECTORY, err_msg=f"llama losses over 10 {optimizer} steps")
    assert_same_tensors(state.params, {n: p.detach().numpy() for n, p in twin.named_parameters()}, TRAJECTORY,
                        what=f"llama params after 10 {optimizer} steps")
