"""Burkov ch. 4 decoder twin: the same ``torch.manual_seed`` gives the same initial ``state_dict``
as the book's procedure.

The book builds ``DecoderLanguageModel`` with every raw matrix and bias created by
``nn.Parameter(torch.rand(shape))`` (draws that ``initialize_weights`` overwrites, but that move
torch's RNG), then runs ``initialize_weights(model)`` over ``model.modules()``. The expected
tensors are drawn here by replaying that sequence of draws with plain torch calls -- never by
calling the twin.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jaxllm.models.transformer import TransformerConfig
from jaxllm.torch_ref import transformer as t_tr

# (vocab, d_model, heads, blocks, pad): a pad row inside the table, several heads and blocks
CONFIGS = [(23, 16, 2, 2, 5), (13, 12, 3, 1, 0)]
SEEDS = (0, 123)


def book_initial_state(vocab, dim, heads, blocks, pad, seed, *, rand_draws=True):
    """The book's ``torch.manual_seed(seed); model = DecoderLanguageModel(...);
    initialize_weights(model)``, replayed draw by draw. ``rand_draws=False`` skips the
    construction-time ``torch.rand`` calls (what a ``torch.empty`` twin does)."""
    d_h = dim // heads
    rand = torch.rand if rand_draws else torch.empty
    torch.manual_seed(seed)

    # construction, in module order
    embedding = torch.empty(vocab, dim)
    nn.init.normal_(embedding)  # nn.Embedding.reset_parameters: N(0, 1), then the pad row zeroed
    embedding[pad].fill_(0)
    state = {"embedding.weight": embedding}
    for b in range(blocks):
        p = f"layers.{b}."
        state[p + "norm1.scale"] = torch.ones(dim)
        for h in range(heads):
            for name in ("W_Q", "W_K", "W_V"):
                state[p + f"attn.heads.{h}.{name}"] = rand(dim, d_h)
        state[p + "attn.W_O"] = rand(dim, dim)
        state[p + "norm2.scale"] = torch.ones(dim)
        state[p + "mlp.W_1"] = rand(dim, 4 * dim)
        state[p + "mlp.B_1"] = rand(4 * dim)
        state[p + "mlp.W_2"] = rand(4 * dim, dim)
        state[p + "mlp.B_2"] = rand(dim)
    state["output"] = rand(dim, vocab)

    # initialize_weights: model.modules() is pre-order, so the model itself comes first, and each
    # MultiHeadAttention before its heads
    nn.init.xavier_uniform_(state["output"])
    nn.init.normal_(state["embedding.weight"], mean=0.0, std=0.02)
    state["embedding.weight"][pad].fill_(0)
    for b in range(blocks):
        p = f"layers.{b}."
        nn.init.xavier_uniform_(state[p + "attn.W_O"])
        for h in range(heads):
            for name in ("W_Q", "W_K", "W_V"):
                nn.init.xavier_uniform_(state[p + f"attn.heads.{h}.{name}"])
        nn.init.xavier_uniform_(state[p + "mlp.W_1"])
        nn.init.xavier_uniform_(state[p + "mlp.W_2"])
        nn.init.zeros_(state[p + "mlp.B_1"])
        nn.init.zeros_(state[p + "mlp.B_2"])
    return state


def twin_initial_state(vocab, dim, heads, blocks, pad, seed):
    config = TransformerConfig(vocab, d_model=dim, num_heads=heads, num_layers=blocks, pad_index=pad)
    torch.manual_seed(seed)
    return {k: v.detach() for k, v in t_tr.from_config(config).state_dict().items()}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", CONFIGS, ids=lambda c: "V{}-D{}-H{}-L{}-pad{}".format(*c))
def test_same_seed_same_initial_state_dict_as_the_book(shape, seed):
    expected = book_initial_state(*shape, seed)
    actual = twin_initial_state(*shape, seed)
    assert sorted(actual) == sorted(expected)  # the book's names, nothing missing or extra
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and actual[name].shape == value.shape, name
        assert torch.equal(actual[name], value), f"{name} differs from the book's draw"
    assert not actual["embedding.weight"][shape[-1]].any()  # the pad row


@pytest.mark.parametrize("shape", CONFIGS[:1], ids=["V23-D16-H2-L2-pad5"])
def test_the_rand_draws_matter(shape):
    """Skipping the book's construction-time ``torch.rand`` draws (a ``torch.empty`` twin) gives
    other weights from the same seed, so the test above can tell the two apart; and another seed
    gives other weights."""
    book = book_initial_state(*shape, 0)
    without = book_initial_state(*shape, 0, rand_draws=False)
    for name in ("output", "embedding.weight", "layers.0.attn.W_O", "layers.1.mlp.W_2"):
        assert not torch.equal(book[name], without[name]), name
    twin = twin_initial_state(*shape, 0)
    assert not torch.equal(twin["output"], without["output"])
    other_seed = twin_initial_state(*shape, 1)
    assert not torch.equal(twin["output"], other_seed["output"])
