"""State dicts move between the twins by rule, and anything that does not fit is named."""

import jax
import numpy as np
import pytest
import torch

from jaxllm import interop
from jaxllm.models import cnn, linear, mlp
from jaxllm.torch_ref import cnn as t_cnn, linear as t_linear, mlp as t_mlp

CASES = [
    (linear.LinearConfig(3, 2), lambda: t_linear.linear_regression(3, 2)),
    (linear.LogisticConfig(2), lambda: t_linear.logistic_regression(2)),
    (mlp.raschka_appendix_a(4, 3), lambda: t_mlp.NeuralNetwork(4, 3)),
    (mlp.burkov_two_layer(2), lambda: t_mlp.two_layer_sigmoid_net(2)),
    (cnn.mnist(), lambda: t_cnn.ConvNet()),
]


@pytest.mark.parametrize("config,make_twin", CASES, ids=lambda c: getattr(c, "family", ""))
def test_flax_params_load_strictly_into_the_twin_and_back(config, make_twin):
    params = config.init(jax.random.PRNGKey(0))
    twin = make_twin()
    twin.load_state_dict(interop.to_torch(config, params), strict=True)
    back = interop.from_torch(config, twin.state_dict())
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_book_state_dict_names():
    assert set(t_linear.logistic_regression(2).state_dict()) == {"0.weight", "0.bias"}
    assert set(t_mlp.NeuralNetwork(2, 2).state_dict()) == {f"layers.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert set(t_mlp.two_layer_sigmoid_net().state_dict()) == {f"{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}


def test_key_rule():
    assert interop.torch_key(("trf_blocks_0", "att", "W_query", "kernel")) == "trf_blocks.0.att.W_query.weight"
    assert interop.torch_key(("rnn", "rnn_units_1", "Wh")) == "rnn.rnn_units.1.Wh"
    assert interop.torch_key(("tok_emb", "embedding")) == "tok_emb.weight"
    assert interop.torch_key(("0", "bias")) == "0.bias"


def test_conv_kernel_layout():
    config = cnn.digits8x8()
    twin = t_cnn.from_config(config)
    params = interop.from_torch(config, twin.state_dict())
    w = twin.conv1.weight.detach().numpy()  # (out, in, kh, kw)
    np.testing.assert_array_equal(np.asarray(params["conv1"]["kernel"])[1, 2, 0, 3], w[3, 0, 1, 2])


def test_missing_unexpected_and_misshaped_tensors_are_named():
    config = mlp.raschka_appendix_a(4, 3)
    state = t_mlp.NeuralNetwork(4, 3).state_dict()
    missing = {k: v for k, v in state.items() if k != "layers.2.bias"}
    with pytest.raises(ValueError, match=r"missing \['layers.2.bias'\]"):
        interop.from_torch(config, missing)
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        interop.from_torch(config, {**state, "extra.weight": torch.zeros(1)})
    assert interop.from_torch(config, {**state, "extra.weight": torch.zeros(1)}, strict=False)
    with pytest.raises(ValueError, match=r"layers.4.weight: expected .* Flax shape \(20, 3\), got torch shape \(5, 20\)"):
        interop.from_torch(config, {**state, "layers.4.weight": torch.zeros(5, 20)})


def test_flax_init_follows_torch_defaults():
    """Kernels and biases are U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear / nn.Conv2d draw them."""
    params = cnn.mnist().init(jax.random.PRNGKey(0))
    for name, fan_in in (("conv1", 9), ("conv2", 16 * 9), ("fc1", 32 * 49), ("fc2", 64)):
        for leaf in ("kernel", "bias"):
            values = np.asarray(params[name][leaf])
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(values).max() <= bound
            if values.size >= 500:  # uniform: std = bound / sqrt(3)
                np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.1, err_msg=f"{name}.{leaf}")
