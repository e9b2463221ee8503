"""Burkov's Elman RNN language model: the Flax model and the book's PyTorch twin agree on logits,
gradients (pad row included), a 10-step AdamW trajectory, streaming decode, weight round trips
and initialisation; bad token arrays are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxllm.models.rnn as rnn
from jaxllm import interop
from jaxllm.config import config_from_dict
from jaxllm.torch_ref import rnn as t_rnn
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step
from jaxllm.training.losses import lm_cross_entropy
from parity import run_both_trajectories
from parity import GRAD, OUTPUT, TRAJECTORY, assert_close, assert_same_tensors, to_numpy_state, torch_grads

pytestmark = pytest.mark.optimized  # parity: compiled as users run it (see conftest.py)

PAD = 1
CONFIG = rnn.RNNConfig(vocab_size=13, emb_dim=8, num_layers=2, pad_index=PAD)


def apply_logits(config):
    model = config.build()
    return lambda params, tokens: model.apply({"params": params}, tokens)[0]


def twin_and_params(seed=0, config=CONFIG):
    torch.manual_seed(seed)
    twin = t_rnn.from_config(config)
    return twin, interop.from_torch(config, twin.state_dict())


def make_batch(rng, batch=4, time=7, config=CONFIG):
    """Ragged token sequences padded with PAD: right-padded as the book's collate_fn does, except
    that the last row is left-padded. Right padding alone never gives the pad row a gradient (a
    pad input only feeds later, also ignored, targets), so the left-padded row is what checks it."""
    seqs = rng.integers(2, config.vocab_size, (batch, time + 1))
    lengths = rng.integers(3, time, batch)
    lengths[0] = time + 1  # one full row
    for row, n in enumerate(lengths[:-1]):
        seqs[row, n:] = PAD
    seqs[-1, : time + 1 - lengths[-1]] = PAD
    seqs = seqs.astype(np.int32)
    return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}


def torch_loss(twin, batch):
    logits, _ = twin(torch.from_numpy(batch["inputs"]).long())
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.from_numpy(batch["targets"]).long().reshape(-1), ignore_index=PAD)


def test_state_dict_keys_are_the_books():
    twin, _ = twin_and_params()
    assert set(twin.state_dict()) == {
        "embedding.weight", "fc.weight", "fc.bias",
        *(f"rnn.rnn_units.{l}.{n}" for l in range(2) for n in ("Wh", "Uh", "b"))}
    assert config_from_dict(CONFIG.to_dict()) == CONFIG


def test_logits_and_hidden_match():
    twin, params = twin_and_params()
    x = make_batch(np.random.default_rng(1))["inputs"]
    logits, hidden = CONFIG.build().apply({"params": params}, jnp.asarray(x))
    t_logits, t_hidden = twin(torch.from_numpy(x).long())
    assert logits.shape == (4, 7, CONFIG.vocab_size) and hidden.shape == (2, 4, CONFIG.emb_dim)
    assert_close(logits, t_logits.detach().numpy(), OUTPUT, err_msg="rnn logits")
    assert_close(hidden, t_hidden.detach().numpy(), OUTPUT, err_msg="rnn hidden state")


def test_gradients_match_and_pad_row_gets_none():
    twin, params = twin_and_params()
    batch = make_batch(np.random.default_rng(2))
    assert (batch["inputs"] == PAD).any() and (batch["targets"] == PAD).any()

    loss_fn = lm_cross_entropy(apply_logits(CONFIG), PAD)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
    t_loss = torch_loss(twin, batch)
    t_loss.backward()
    assert_close(float(loss), t_loss.item(), OUTPUT, err_msg="rnn loss")
    assert_same_tensors(grads, torch_grads(twin), GRAD, what="rnn gradients")

    emb_grad = np.asarray(grads["embedding"]["embedding"])
    assert np.all(emb_grad[PAD] == 0) and np.all(twin.embedding.weight.grad[PAD].numpy() == 0)
    # ... which is the masking's doing: without it this batch does push on the pad row.
    unmasked = rnn.RNNConfig(CONFIG.vocab_size, CONFIG.emb_dim, CONFIG.num_layers, pad_index=None)
    raw = jax.grad(lambda p: lm_cross_entropy(apply_logits(unmasked), PAD)(p, batch, None)[0])(params)
    assert np.abs(np.asarray(raw["embedding"]["embedding"])[PAD]).max() > 1e-4
    assert np.abs(emb_grad).sum() > 0
    assert np.any(np.asarray(params["embedding"]["embedding"])[PAD] != 0)  # the book re-inits the pad row


def test_ten_step_adamw_trajectory_matches():
    twin, params = twin_and_params(seed=3)
    rng = np.random.default_rng(4)
    batches = [make_batch(rng) for _ in range(10)]

    optimizer = make_optimizer(OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01))
    step = make_train_step(lm_cross_entropy(apply_logits(CONFIG), PAD), optimizer)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(0))
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.01)
    state, jax_losses, torch_losses = run_both_trajectories(step, state, twin, torch_opt, torch_loss, batches)

    assert_close(jax_losses, torch_losses, TRAJECTORY, err_msg="rnn losses over 10 AdamW steps")
    assert_same_tensors(state.params, to_numpy_state(twin), TRAJECTORY, what="rnn params after 10 AdamW steps")


def test_streaming_equals_full_sequence():
    _, params = twin_and_params()
    model = CONFIG.build()
    x = jnp.asarray(make_batch(np.random.default_rng(5), time=9)["inputs"])
    full, full_hidden = model.apply({"params": params}, x)
    assert_close(jax.jit(CONFIG.logits)(params, x), full, OUTPUT, err_msg="jitted vs eager logits")

    step = jax.jit(CONFIG.forward)  # one token at a time with the carried hidden state
    hidden, per_token = CONFIG.init_cache(x.shape[0]), []
    for t in range(x.shape[1]):
        logits, hidden = step(params, x[:, t:t + 1], hidden)
        per_token.append(logits[:, 0])
    assert_close(np.stack(per_token, 1), full, OUTPUT, err_msg="per-token vs full logits")
    assert_close(hidden, full_hidden, OUTPUT, err_msg="per-token vs full hidden state")

    hidden, chunks = None, []
    for lo, hi in [(0, 4), (4, 5), (5, 9)]:
        logits, hidden = model.apply({"params": params}, x[:, lo:hi], cache=hidden)
        chunks.append(logits)
    assert_close(np.concatenate(chunks, 1), full, OUTPUT, err_msg="chunked vs full logits")

    with pytest.raises(ValueError, match="num_layers, batch, emb_dim"):
        model.apply({"params": params}, x, cache=jnp.zeros((1, 4, CONFIG.emb_dim)))


def test_to_torch_round_trip_loads_strictly():
    twin, params = twin_and_params(seed=6)
    fresh = t_rnn.RecurrentLanguageModel(CONFIG.vocab_size, CONFIG.emb_dim, CONFIG.num_layers, PAD)
    fresh.load_state_dict(interop.to_torch(CONFIG, params), strict=True)
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)


def test_flax_init_follows_the_book():
    config = rnn.RNNConfig(vocab_size=50, emb_dim=32, num_layers=2)
    params = config.build().init(jax.random.PRNGKey(0), config.example_input())["params"]
    V, D = config.vocab_size, config.emb_dim
    matrices = {"embedding": (params["embedding"]["embedding"], V, D),
                "fc": (params["fc"]["kernel"], D, V)}
    vectors = {"fc.bias": params["fc"]["bias"]}
    for l in range(config.num_layers):
        unit = params["rnn"][f"rnn_units_{l}"]
        matrices |= {f"{l}.Wh": (unit["Wh"], D, D), f"{l}.Uh": (unit["Uh"], D, D)}
        vectors[f"{l}.b"] = unit["b"]
    for name, (value, fan_in, fan_out) in matrices.items():
        bound, biggest = rnn.xavier_bound(fan_in, fan_out), float(jnp.abs(value).max())
        assert 0.9 * bound < biggest <= bound, f"{name}: max |w| {biggest} vs xavier bound {bound}"
    for name, value in vectors.items():
        assert float(value.min()) >= 0 and float(value.max()) < 1, name
        assert float(value.max()) > 0.5, f"{name} looks not U(0, 1)"


@pytest.mark.parametrize("tokens,match", [
    (np.array([[0, 13]]), r"\[0, 12\].*vocabulary of 13"),
    (np.array([[-1, 2]]), r"\[0, 12\].*vocabulary of 13"),
    (np.array([0, 1, 2]), r"\[batch, time\]"),
    (np.zeros((1, 3), np.float32), "integers"),
])
def test_bad_tokens_are_refused(tokens, match):
    with pytest.raises(ValueError, match=match):
        CONFIG.validate_input(tokens)


def test_good_tokens_pass_and_bad_configs_are_refused():
    assert CONFIG.validate_input([[0, 12]]).dtype == np.int32
    with pytest.raises(ValueError, match="pad_index"):
        rnn.RNNConfig(vocab_size=5, pad_index=5)
    assert rnn.burkov(100).emb_dim == 128 and rnn.burkov(100).num_layers == 2
