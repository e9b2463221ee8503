"""Burkov ch. 3: ``ElmanRNNUnit``, ``ElmanRNN``, ``RecurrentLanguageModel``, ``initialize_weights``.

Written as the book writes them: same class and parameter names, the same creation order
(``Uh`` before ``Wh`` before ``b``, each from ``torch.rand`` before ``initialize_weights``
overwrites it), so ``torch.manual_seed(s)`` + construction + ``initialize_weights`` gives the
book's initial weights and the book's state dicts load with ``strict=True``.
One extension: ``forward(x, hidden=None)`` also returns the final hidden state
``[num_layers, batch, emb_dim]`` and can start from one (the book starts from zeros and returns
logits only), so the twin can be compared with the JAX model's streaming decode.
"""

from __future__ import annotations

import torch
from torch import nn


class ElmanRNNUnit(nn.Module):
    """One step of one layer: ``h_new = tanh(x @ Wh + h @ Uh + b)``; x, h: (batch, emb_dim)."""

    def __init__(self, emb_dim):
        super().__init__()
        self.Uh = nn.Parameter(torch.rand(emb_dim, emb_dim))
        self.Wh = nn.Parameter(torch.rand(emb_dim, emb_dim))
        self.b = nn.Parameter(torch.rand(emb_dim))

    def forward(self, x, h):
        return torch.tanh(x @ self.Wh + h @ self.Uh + self.b)


class ElmanRNN(nn.Module):
    """x: (batch, seq_len, emb_dim) -> (outputs (batch, seq_len, emb_dim), hidden (num_layers, batch, emb_dim))."""

    def __init__(self, emb_dim, num_layers):
        super().__init__()
        self.emb_dim = emb_dim
        self.num_layers = num_layers
        self.rnn_units = nn.ModuleList([ElmanRNNUnit(emb_dim) for _ in range(num_layers)])

    def forward(self, x, hidden=None):
        batch_size, seq_len, emb_dim = x.size()
        if hidden is None:
            h_prev = [torch.zeros(batch_size, emb_dim, device=x.device) for _ in range(self.num_layers)]
        else:
            h_prev = list(hidden.unbind(0))
        outputs = []
        for t in range(seq_len):  # the book's order: time outside, layers inside
            input_t = x[:, t]
            for l, rnn_unit in enumerate(self.rnn_units):
                h_new = rnn_unit(input_t, h_prev[l])
                h_prev[l] = h_new
                input_t = h_new
            outputs.append(input_t)
        return torch.stack(outputs, dim=1), torch.stack(h_prev)


class RecurrentLanguageModel(nn.Module):
    """tokens (batch, seq_len) -> (logits (batch, seq_len, vocab_size), hidden (num_layers, batch, emb_dim))."""

    def __init__(self, vocab_size, emb_dim, num_layers, pad_index):
        super().__init__()
        self.vocab_size = vocab_size
        self.emb_dim = emb_dim
        self.num_layers = num_layers
        self.pad_index = pad_index
        self.embedding = nn.Embedding(vocab_size, emb_dim, pad_index)
        self.rnn = ElmanRNN(emb_dim=emb_dim, num_layers=num_layers)
        self.fc = nn.Linear(emb_dim, vocab_size)

    def forward(self, x, hidden=None):
        embeddings = self.embedding(x)
        rnn_output, hidden = self.rnn(embeddings, hidden)
        return self.fc(rnn_output), hidden


def initialize_weights(model):
    """The book's init: xavier-uniform on every parameter with dim > 1, U(0, 1) on the rest.

    It overwrites the embedding's zeroed pad row too; ``padding_idx`` still keeps that row's
    gradient at zero.
    """
    for name, param in model.named_parameters():
        if param.dim() > 1:
            nn.init.xavier_uniform_(param)
        else:
            nn.init.uniform_(param)


def from_config(config):
    """The twin of a ``jaxllm.models.rnn.RNNConfig``, initialised as the book does."""
    model = RecurrentLanguageModel(config.vocab_size, config.emb_dim, config.num_layers, config.pad_index)
    initialize_weights(model)
    return model
