"""Burkov ch. 3: the Elman RNN language model.

    h_t^l = tanh(x_t^l Wh + h_{t-1}^l Uh + b),   h_0^l = 0,   x_t^{l+1} = h_t^l,
    logits_t = fc(h_t^L).

Parameters are named after the book's ``RecurrentLanguageModel`` state dict, so
``jaxllm.interop`` maps them by rule: ``embedding/embedding`` <-> ``embedding.weight``,
``rnn/rnn_units_{l}/{Wh,Uh,b}`` <-> ``rnn.rnn_units.{l}.{Wh,Uh,b}`` (x@W layout both sides),
``fc/{kernel,bias}`` <-> ``fc.{weight,bias}``.

The config implements the language-model interface of ``jaxllm.models.lm`` where it applies:
``init``, ``logits``, and ``forward(params, tokens, cache)`` / ``init_cache(batch)`` with the
hidden state as the cache (``context_limit`` is None: an RNN has no length limit).

The book loops over time with the layer loop inside. Layer l at step t needs only layer l-1 at
step t and layer l at step t-1, so running each layer over the whole sequence in turn computes
the same numbers; it lets every layer's input projection ``x Wh + b`` be one big matmul for all
time steps, leaving only ``h Uh`` inside the ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import register
from jaxllm.models.lm import LanguageModelConfig, embed_without_pad_gradient
from jaxllm.validate import check_concrete_token_ids, check_token_batch

# The book's initialize_weights: xavier-uniform on every matrix, U(0, 1) on every vector.
xavier_uniform = nn.initializers.xavier_uniform()


def uniform01(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype)


@register
@dataclasses.dataclass(frozen=True)
class RNNConfig(LanguageModelConfig):
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

    # --- the language-model interface (jaxllm.models.lm), where it applies -------------------
    @property
    def context_limit(self) -> None:
        return None  # the hidden state carries any length

    @property
    def width(self) -> int:
        return self.emb_dim

    @property
    def head_names(self) -> tuple[str, ...]:
        return ("fc",)

    def init_cache(self, batch: int, max_len: int | None = None):
        """The book's ``h_0 = 0``: float32[num_layers, batch, emb_dim] (``max_len`` is irrelevant)."""
        return jnp.zeros((self.num_layers, batch, self.emb_dim), jnp.float32)


def burkov(vocab_size: int, pad_index: int | None = None) -> RNNConfig:
    """The book's hyperparameters (``get_hyperparameters``): emb_dim 128, 2 layers."""
    return RNNConfig(vocab_size, emb_dim=128, num_layers=2, pad_index=pad_index)


def tiny(vocab_size: int, pad_index: int | None = None) -> RNNConfig:
    """For tests and smoke runs."""
    return RNNConfig(vocab_size, emb_dim=16, num_layers=2, pad_index=pad_index)


class ElmanRNNUnit(nn.Module):
    """One layer: ``Wh`` (input), ``Uh`` (hidden), both (D, D) x@W layout; ``b`` (D,).
    x: float32[batch, time, D], h0: float32[batch, D] -> (h float32[batch, time, D], h_T)."""

    emb_dim: int

    @nn.compact
    def __call__(self, x, h0):
        d = self.emb_dim
        Wh = self.param("Wh", xavier_uniform, (d, d))
        Uh = self.param("Uh", xavier_uniform, (d, d))
        b = self.param("b", uniform01, (d,))
        xw = x @ Wh + b  # hoisted out of the recurrence: the input projection of every step in one matmul

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

    @nn.compact
    def __call__(self, x, hidden):
        finals = []
        for layer in range(self.num_layers):  # a static loop over layers, not over time
            x, h_last = ElmanRNNUnit(self.emb_dim, name=f"rnn_units_{layer}")(x, hidden[layer])
            finals.append(h_last)
        return x, jnp.stack(finals)


class RNNLanguageModel(nn.Module):
    """``__call__(tokens int32[batch, time], *, cache float32[L, batch, D] | None = None,
    deterministic=True) -> (logits float32[batch, time, vocab], hidden float32[L, batch, D])``.

    The hidden state is the whole cache: calling again with the returned hidden continues the
    sequence, so chunked or token-by-token decoding equals the full-sequence forward
    (``deterministic`` is accepted for the common interface: there is no dropout). Concrete
    (non-traced) token ids outside ``[0, vocab_size)`` raise ``ValueError``; inside ``jit`` they
    are the caller's promise (compiled code cannot raise and XLA clamps the lookup): check at the
    boundary there with ``RNNConfig.validate_input``.
    """

    config: RNNConfig

    @nn.compact
    def __call__(self, tokens, *, cache=None, deterministic: bool = True):
        cfg = self.config
        check_concrete_token_ids(tokens, cfg.vocab_size)  # before any cast; traced ids pass
        batch = tokens.shape[0]
        hidden = cfg.init_cache(batch) if cache is None else cache
        expected = (cfg.num_layers, batch, cfg.emb_dim)
        if hidden.shape != expected:  # shapes are static, so this raises at trace time
            raise ValueError(f"hidden must have shape [num_layers, batch, emb_dim] = {expected}, got {hidden.shape}")
        embedding = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=xavier_uniform, name="embedding")
        # torch's padding_idx (the book re-initialises the pad row, so it is not zero)
        x = embed_without_pad_gradient(embedding.embedding, tokens, cfg.pad_index)
        outputs, hidden = ElmanRNN(cfg.emb_dim, cfg.num_layers, name="rnn")(x, hidden)
        fc = nn.Dense(cfg.vocab_size, kernel_init=xavier_uniform, bias_init=uniform01, name="fc")
        return fc(outputs), hidden


def xavier_bound(fan_in: int, fan_out: int) -> float:
    """Half-width of the xavier-uniform distribution."""
    return math.sqrt(6.0 / (fan_in + fan_out))
