"""Burkov ch. 3: the Elman RNN language model.

    h_t^l = tanh(x_t^l Wh + h_{t-1}^l Uh + b),   h_0^l = 0,   x_t^{l+1} = h_t^l,
    logits_t = fc(h_t^L).

Parameters are named after the book's ``RecurrentLanguageModel`` state dict, so
``jaxllm.interop`` maps them by rule: ``embedding/embedding`` <-> ``embedding.weight``,
``rnn/rnn_units_{l}/{Wh,Uh,b}`` <-> ``rnn.rnn_units.{l}.{Wh,Uh,b}`` (x@W layout both sides),
``fc/{kernel,bias}`` <-> ``fc.{weight,bias}``.

The book loops over time with the layer loop inside. Layer l at step t needs only layer l-1 at
step t and layer l at step t-1, so running each layer over the whole sequence in turn computes
the same numbers; it lets every layer's input projection ``x Wh + b`` be one big matmul for all
time steps, leaving only ``h Uh`` inside the ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig, register
from jaxllm.validate import check_concrete_token_ids, check_token_batch

# The book's initialize_weights: xavier-uniform on every matrix, U(0, 1) on every vector.
xavier_uniform = nn.initializers.xavier_uniform()


def uniform01(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype)


@register
@dataclasses.dataclass(frozen=True)
class RNNConfig(ModelConfig):
    family: ClassVar[str] = "rnn"
    vocab_size: int = 256
    emb_dim: int = 128
    num_layers: int = 2
    pad_index: int | None = None  # its embedding row gets no gradient (torch's padding_idx)

    def __post_init__(self):
        if self.vocab_size < 1 or self.emb_dim < 1 or self.num_layers < 1:
            raise ValueError(
                f"vocab_size, emb_dim and num_layers must be >= 1, got "
                f"{self.vocab_size}, {self.emb_dim}, {self.num_layers}"
            )
        if self.pad_index is not None and not 0 <= self.pad_index < self.vocab_size:
            raise ValueError(f"pad_index must lie in [0, {self.vocab_size - 1}], got {self.pad_index}")

    def build(self):
        return RNNLanguageModel(self)

    def example_input(self, batch: int = 1):
        return jnp.zeros((batch, 4), jnp.int32)

    def validate_input(self, tokens) -> np.ndarray:
        """``tokens`` must be int ids ``[batch, time]`` in ``[0, vocab_size)``; returns int32."""
        return check_token_batch(tokens, self.vocab_size)

    def init_hidden(self, batch: int):
        """The book's ``h_0 = 0``: float32[num_layers, batch, emb_dim]."""
        return jnp.zeros((self.num_layers, batch, self.emb_dim), jnp.float32)


def burkov(vocab_size: int, pad_index: int | None = None) -> RNNConfig:
    """The book's hyperparameters (``get_hyperparameters``): emb_dim 128, 2 layers."""
    return RNNConfig(vocab_size, emb_dim=128, num_layers=2, pad_index=pad_index)


def tiny(vocab_size: int, pad_index: int | None = None) -> RNNConfig:
    """For tests and smoke runs."""
    return RNNConfig(vocab_size, emb_dim=16, num_layers=2, pad_index=pad_index)


class ElmanRNNUnit(nn.Module):
    """One layer's parameters: ``Wh`` (input), ``Uh`` (hidden), both (D, D) x@W layout; ``b`` (D,)."""

    emb_dim: int

    def setup(self):
        d = self.emb_dim
        self.Wh = self.param("Wh", xavier_uniform, (d, d))
        self.Uh = self.param("Uh", xavier_uniform, (d, d))
        self.b = self.param("b", uniform01, (d,))

    def __call__(self, x, h0):
        """x: float32[batch, time, D], h0: float32[batch, D] -> (h float32[batch, time, D], h_T)."""
        # Hoisted out of the recurrence: the input projection of every step in one matmul.
        xw = x @ self.Wh + self.b
        Uh = self.Uh

        def step(h, xw_t):  # a pure function of arrays, so lax.scan can trace it
            h = jnp.tanh(xw_t + h @ Uh)
            return h, h

        h_last, hs = jax.lax.scan(step, h0, jnp.swapaxes(xw, 0, 1))  # scan over time
        return jnp.swapaxes(hs, 0, 1), h_last


class ElmanRNN(nn.Module):
    """Stacked Elman units. x: float32[batch, time, D], hidden: float32[L, batch, D]
    -> (top layer's outputs float32[batch, time, D], final hidden float32[L, batch, D])."""

    emb_dim: int
    num_layers: int

    def setup(self):
        self.rnn_units = [ElmanRNNUnit(self.emb_dim) for _ in range(self.num_layers)]

    def __call__(self, x, hidden):
        finals = []
        for layer, unit in enumerate(self.rnn_units):  # a static loop over layers, not over time
            x, h_last = unit(x, hidden[layer])
            finals.append(h_last)
        return x, jnp.stack(finals)


class RNNLanguageModel(nn.Module):
    """tokens int32[batch, time], hidden float32[L, batch, D] | None
    -> (logits float32[batch, time, vocab], hidden float32[L, batch, D]).

    ``hidden`` is the whole cache: calling again with the returned hidden continues the sequence,
    so chunked or token-by-token decoding equals the full-sequence forward. Concrete (non-traced)
    token ids outside ``[0, vocab_size)`` raise ``ValueError``; inside ``jit`` they are the
    caller's promise (compiled code cannot raise and XLA clamps the lookup): check at the boundary
    there with ``RNNConfig.validate_input``.
    """

    config: RNNConfig

    def setup(self):
        cfg = self.config
        self.embedding = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=xavier_uniform)
        self.rnn = ElmanRNN(cfg.emb_dim, cfg.num_layers)
        self.fc = nn.Dense(cfg.vocab_size, kernel_init=xavier_uniform, bias_init=uniform01)

    def __call__(self, tokens, hidden=None):
        cfg = self.config
        check_concrete_token_ids(tokens, cfg.vocab_size)  # before any cast; traced ids pass
        batch = tokens.shape[0]
        if hidden is None:
            hidden = cfg.init_hidden(batch)
        expected = (cfg.num_layers, batch, cfg.emb_dim)
        if hidden.shape != expected:  # shapes are static, so this raises at trace time
            raise ValueError(f"hidden must have shape [num_layers, batch, emb_dim] = {expected}, got {hidden.shape}")
        table = self.embedding.embedding
        if cfg.pad_index is not None:
            # torch's padding_idx: the pad row is used in the forward (the book re-initialises it,
            # so it is not zero) but never receives a gradient.
            is_pad = (jnp.arange(cfg.vocab_size) == cfg.pad_index)[:, None]
            table = jnp.where(is_pad, jax.lax.stop_gradient(table), table)
        x = jnp.take(table, tokens, axis=0)
        outputs, hidden = self.rnn(x, hidden)
        return self.fc(outputs), hidden


@functools.lru_cache(maxsize=None)  # one function per config, so jit caches keyed on it hit
def make_forward(config: RNNConfig, *, jit: bool = True):
    """Return ``forward(params, tokens int32[batch, time], hidden | None) -> (logits, hidden)``."""
    model = config.build()

    def forward(params, tokens, hidden=None):
        return model.apply({"params": params}, tokens, hidden)

    return jax.jit(forward) if jit else forward


@functools.lru_cache(maxsize=None)
def make_step(config: RNNConfig, *, jit: bool = True):
    """Return ``step(params, token int32[batch], hidden | None) -> (logits float32[batch, vocab], hidden)``.

    O(1) work per token: the model on a length-1 sequence with the carried hidden state.
    """
    model = config.build()

    def step(params, token, hidden=None):
        if hidden is None:
            hidden = config.init_hidden(token.shape[0])
        logits, hidden = model.apply({"params": params}, token[:, None], hidden)
        return logits[:, 0], hidden

    return jax.jit(step) if jit else step


def xavier_bound(fan_in: int, fan_out: int) -> float:
    """Half-width of the xavier-uniform distribution."""
    return math.sqrt(6.0 / (fan_in + fan_out))
