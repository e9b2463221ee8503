"""Burkov ch. 4: ``rope``, ``RMSNorm``, ``AttentionHead``, ``MultiHeadAttention``, ``MLP``,
``DecoderBlock``, ``DecoderLanguageModel``, ``initialize_weights``.

Written as the book writes them, with the book's parameter names, shapes and x@W layouts
(docs/models.md, "Decoder language model (Burkov ch. 4)"), so the book's state dicts load with
``strict=True`` and ``jaxllm.interop`` maps them to ``jaxllm.models.transformer`` by rule.

Initial weights are drawn as the book draws them, so ``torch.manual_seed(s)`` + ``from_config``
gives the book's starting ``state_dict`` (``tests/test_torch_transformer_init.py``). Modules are
built in the book's order -- ``embedding`` (``nn.Embedding``'s constructor draws N(0, 1) and zeroes
the pad row), then ``layers`` (each: ``norm1``, ``attn`` = per-head ``heads`` each ``W_Q, W_K,
W_V``, then ``W_O``, ``norm2``, ``mlp`` = ``W_1, B_1, W_2, B_2``), then ``output`` -- and every
raw matrix and bias is created with ``torch.rand`` as in the book, consuming draws that
``initialize_weights`` then overwrites. ``initialize_weights`` walks ``model.modules()`` in
pre-order: the model itself first (``output``), then the embedding, then per block the attention
module before its heads (``W_O``, then each head's ``W_Q, W_K, W_V``), then the MLP (``W_1``,
``W_2``; biases zeroed). RMSNorm scales are ``torch.ones`` (no draw).

Beyond the book only ``from_config`` is added (the twin of a Flax config, initialised as the book
does); ``forward(x)`` is the book's, with no cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope(x, theta_base=10000.0):
    """Interleaved RoPE over the last axis of x (batch, seq_len, d_h), positions 0..seq_len-1:
    rotate the pairs ``(x[..., 0::2], x[..., 1::2])`` by ``pos * theta_base^(-2i/d_h)``."""
    _, seq_len, dim = x.size()
    pos = torch.arange(0, seq_len, dtype=torch.float32, device=x.device).unsqueeze(1)
    freqs = 1.0 / (theta_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    angles = pos * freqs  # (seq_len, dim / 2)
    sin, cos = torch.sin(angles), torch.cos(angles)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.empty_like(x)
    rotated[..., 0::2] = x_even * cos - x_odd * sin
    rotated[..., 1::2] = x_even * sin + x_odd * cos
    return rotated


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + epsilon) * scale`` over the last axis; epsilon 1e-8 inside the sqrt."""

    def __init__(self, emb_dim, epsilon=1e-8):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.epsilon = epsilon

    def forward(self, x):
        mean_squared = torch.mean(x**2, dim=-1, keepdim=True)
        return x / torch.sqrt(mean_squared + self.epsilon) * self.scale


class AttentionHead(nn.Module):
    """One causal head: x (batch, seq_len, emb_dim) -> (batch, seq_len, d_h)."""

    def __init__(self, emb_dim, d_h):
        super().__init__()
        self.W_Q = nn.Parameter(torch.rand(emb_dim, d_h))
        self.W_K = nn.Parameter(torch.rand(emb_dim, d_h))
        self.W_V = nn.Parameter(torch.rand(emb_dim, d_h))
        self.d_h = d_h

    def forward(self, x, mask):
        Q = rope(x @ self.W_Q)
        K = rope(x @ self.W_K)
        V = x @ self.W_V
        scores = Q @ K.transpose(-2, -1) / math.sqrt(self.d_h)
        scores = scores.masked_fill(mask == 0, float("-inf"))
        return torch.softmax(scores, dim=-1) @ V


class MultiHeadAttention(nn.Module):
    """Heads concatenated in head order, then ``@ W_O`` (emb_dim, emb_dim)."""

    def __init__(self, emb_dim, num_heads):
        super().__init__()
        d_h = emb_dim // num_heads
        self.heads = nn.ModuleList([AttentionHead(emb_dim, d_h) for _ in range(num_heads)])
        self.W_O = nn.Parameter(torch.rand(emb_dim, emb_dim))

    def forward(self, x, mask):
        return torch.cat([head(x, mask) for head in self.heads], dim=-1) @ self.W_O


class MLP(nn.Module):
    """``relu(x @ W_1 + B_1) @ W_2 + B_2`` with hidden width 4 * emb_dim."""

    def __init__(self, emb_dim):
        super().__init__()
        self.W_1 = nn.Parameter(torch.rand(emb_dim, emb_dim * 4))
        self.B_1 = nn.Parameter(torch.rand(emb_dim * 4))
        self.W_2 = nn.Parameter(torch.rand(emb_dim * 4, emb_dim))
        self.B_2 = nn.Parameter(torch.rand(emb_dim))

    def forward(self, x):
        return torch.relu(x @ self.W_1 + self.B_1) @ self.W_2 + self.B_2


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, emb_dim, num_heads):
        super().__init__()
        self.norm1 = RMSNorm(emb_dim)
        self.attn = MultiHeadAttention(emb_dim, num_heads)
        self.norm2 = RMSNorm(emb_dim)
        self.mlp = MLP(emb_dim)

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class DecoderLanguageModel(nn.Module):
    """tokens (batch, seq_len) -> logits (batch, seq_len, vocab_size). No final norm; the output
    matrix (emb_dim, vocab_size) is untied from the embedding; no dropout."""

    def __init__(self, vocab_size, emb_dim, num_heads, num_blocks, pad_idx):
        super().__init__()
        if emb_dim % num_heads:
            raise ValueError(f"emb_dim {emb_dim} is not divisible by num_heads {num_heads}")
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_idx)
        self.layers = nn.ModuleList([DecoderBlock(emb_dim, num_heads) for _ in range(num_blocks)])
        self.output = nn.Parameter(torch.rand(emb_dim, vocab_size))

    def forward(self, x):
        x = self.embedding(x)
        seq_len = x.size(1)
        mask = torch.tril(torch.ones(seq_len, seq_len, device=x.device))
        for layer in self.layers:
            x = layer(x, mask)
        return x @ self.output


def initialize_weights(model):
    """The book's init: embedding N(0, 0.02) with the pad row zeroed; every matrix xavier-uniform;
    biases 0; RMSNorm scales keep their 1s."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].fill_(0)
        elif isinstance(module, AttentionHead):
            for w in (module.W_Q, module.W_K, module.W_V):
                nn.init.xavier_uniform_(w)
        elif isinstance(module, MultiHeadAttention):
            nn.init.xavier_uniform_(module.W_O)
        elif isinstance(module, MLP):
            nn.init.xavier_uniform_(module.W_1)
            nn.init.zeros_(module.B_1)
            nn.init.xavier_uniform_(module.W_2)
            nn.init.zeros_(module.B_2)
        elif isinstance(module, DecoderLanguageModel):
            nn.init.xavier_uniform_(module.output)


def from_config(config):
    """The twin of a burkov-layout ``jaxllm.models.transformer.TransformerConfig``, initialised as
    the book does. Raises ``ValueError`` for configs the book's model cannot express."""
    book = dict(kv_heads=config.num_heads, rope="interleaved", rope_base=10000.0, norm_eps=1e-8,
                final_norm=False, mlp="relu", hidden_dim=4 * config.d_model, use_bias=True,
                tie_embeddings=False, qkv_layout="per_head")
    differ = {k: getattr(config, k) for k, v in book.items() if getattr(config, k) != v}
    if differ:
        raise ValueError(f"the book's DecoderLanguageModel cannot express {differ}")
    model = DecoderLanguageModel(config.vocab_size, config.d_model, config.num_heads, config.num_layers,
                                 config.pad_index)
    initialize_weights(model)
    return model
