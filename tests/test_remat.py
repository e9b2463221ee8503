"""``remat=True`` recomputes each transformer block in the backward pass: same params, same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import gpt2, transformer
from jaxllm.training.losses import lm_loss
from parity import GRAD, OUTPUT, assert_close

CONFIGS = {
    "gpt2": gpt2.tiny(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1),
    "decoder": transformer.tiny(97),
}


def batch(vocab: int, rows: int = 3, time: int = 12):
    ids = np.random.default_rng(0).integers(0, vocab, (rows, time + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:]}


def shapes(tree):
    return {jax.tree_util.keystr(path): x.shape for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("name", CONFIGS)
def test_remat_keeps_params_and_gives_same_loss_and_grads(name):
    plain = CONFIGS[name]
    remat = plain.replace(remat=True)
    key = jax.random.PRNGKey(1)
    params = plain.build().init(key, plain.example_input())["params"]
    params_remat = remat.build().init(key, remat.example_input())["params"]
    assert shapes(params_remat) == shapes(params)  # same names and shapes: checkpoints interchange
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_remat)):
        np.testing.assert_array_equal(a, b)  # and the same init

    data = batch(plain.vocab_size)
    dropout_key = jax.random.PRNGKey(7)  # GPT-2 runs dropout: remat must redraw the same masks

    def compiled(cfg):
        return jax.jit(jax.value_and_grad(lambda p: lm_loss(cfg)(p, data, dropout_key)[0])).lower(params).compile()

    grad, grad_remat = compiled(plain), compiled(remat)
    # remat really recomputes: the compiled gradient holds more work (the blocks' forward runs twice)
    assert grad_remat.cost_analysis()["flops"] > grad.cost_analysis()["flops"]
    loss, grads = grad(params)
    loss_remat, grads_remat = grad_remat(params)
    assert_close(loss_remat, loss, OUTPUT, err_msg="remat vs plain loss")
    flat, flat_remat = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_remat)
    assert any(float(jnp.abs(g).max()) > 0 for g in flat)
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
    for name, g, g_remat in zip(names, flat, flat_remat):
        assert_close(g_remat, g, GRAD, err_msg=f"remat vs plain gradient {name}")


def test_remat_is_saved_with_the_config():
    from jaxllm.config import config_from_dict

    cfg = CONFIGS["gpt2"].replace(remat=True)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_step_memory_counts_the_train_state_and_batch():
    """The compiled step's arguments are exactly the train state (params, Adam moments, step, key)
    plus the token batch; outputs written into the donated state are aliased."""
    import optax

    from jaxllm.training import TrainState
    from jaxllm.bench.memory import train_step_memory

    cfg = CONFIGS["decoder"]
    params = cfg.param_shapes()
    state = jax.eval_shape(lambda p: TrainState.create(p, optax.adamw(1e-3, weight_decay=0.0), jax.random.PRNGKey(0)),
                           params)
    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
    mem = train_step_memory(cfg, batch=2, context=8)
    assert mem["argument"] == state_bytes + 2 * (2 * 8 * 4)  # inputs and targets, int32[2, 8]
    assert mem["alias"] > 0 and mem["temp"] > 0
    assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
