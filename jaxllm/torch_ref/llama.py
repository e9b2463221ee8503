"""A Llama-style decoder in PyTorch, written the way Raschka's from-scratch Llama code writes it
(his bonus chapter converts the book's GPT to Llama 2/3): RMSNorm instead of LayerNorm, rotary
position embeddings over the two halves of each head (``compute_rope_params`` / ``compute_rope``),
grouped-query attention (each key/value head shared by ``num_heads / num_kv_heads`` query heads,
``repeat_interleave``), a SwiGLU feed-forward without biases, a final RMSNorm and an untied output
matrix (or the embedding, tied).

The twin of ``jaxllm.models.transformer.llama``. Its matrices are ``x @ W`` parameters named as the
Flax model names them (``W_Q``, ``W_K``, ``W_V``, ``W_O``; ``W_1`` the gate, ``W_3`` the up and ``W_2``
the down projection), so ``jaxllm.interop``'s one rule maps the two without a table.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def compute_rope_params(head_dim, theta_base=10_000.0, context_length=4096):
    """cos, sin: (context_length, head_dim), the angle of pair i repeated over both halves."""
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    positions = torch.arange(context_length, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=1)
    return torch.cos(angles), torch.sin(angles)


def compute_rope(x, cos, sin):
    """x (batch, heads, seq_len, head_dim): rotate the pairs (first half, second half)."""
    seq_len, half = x.shape[2], x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos[:seq_len] + rotated * sin[:seq_len]).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, emb_dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))

    def forward(self, x):
        means = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x.float() * torch.rsqrt(means + self.eps) * self.scale.float()).to(x.dtype)


def xavier(fan_in, fan_out):
    weight = torch.empty(fan_in, fan_out)
    nn.init.xavier_uniform_(weight)
    return nn.Parameter(weight)


class GroupedQueryAttention(nn.Module):
    def __init__(self, d_in, num_heads, num_kv_heads, rope_base=10_000.0, context_length=4096):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = d_in // num_heads
        self.group_size = num_heads // num_kv_heads
        self.W_Q = xavier(d_in, num_heads * self.head_dim)
        self.W_K = xavier(d_in, num_kv_heads * self.head_dim)
        self.W_V = xavier(d_in, num_kv_heads * self.head_dim)
        self.W_O = xavier(num_heads * self.head_dim, d_in)
        cos, sin = compute_rope_params(self.head_dim, rope_base, context_length)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        b, num_tokens, _ = x.shape
        queries = (x @ self.W_Q).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = (x @ self.W_K).view(b, num_tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = (x @ self.W_V).view(b, num_tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        queries, keys = compute_rope(queries, self.cos, self.sin), compute_rope(keys, self.cos, self.sin)
        keys = keys.repeat_interleave(self.group_size, dim=1)
        values = values.repeat_interleave(self.group_size, dim=1)
        scores = queries @ keys.transpose(2, 3)
        mask = torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=x.device), diagonal=1)
        scores = scores.masked_fill(mask, -torch.inf)
        weights = torch.softmax(scores / math.sqrt(self.head_dim), dim=-1)
        context = (weights @ values).transpose(1, 2).reshape(b, num_tokens, self.num_heads * self.head_dim)
        return context @ self.W_O


class FeedForward(nn.Module):
    def __init__(self, emb_dim, hidden_dim):
        super().__init__()
        self.W_1 = xavier(emb_dim, hidden_dim)  # gate
        self.W_3 = xavier(emb_dim, hidden_dim)  # up
        self.W_2 = xavier(hidden_dim, emb_dim)  # down

    def forward(self, x):
        return (nn.functional.silu(x @ self.W_1) * (x @ self.W_3)) @ self.W_2


class TransformerBlock(nn.Module):
    def __init__(self, emb_dim, num_heads, num_kv_heads, hidden_dim, eps, rope_base, context_length):
        super().__init__()
        self.norm1 = RMSNorm(emb_dim, eps)
        self.attn = GroupedQueryAttention(emb_dim, num_heads, num_kv_heads, rope_base, context_length)
        self.norm2 = RMSNorm(emb_dim, eps)
        self.mlp = FeedForward(emb_dim, hidden_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LlamaModel(nn.Module):
    """tokens (batch, seq_len) -> logits (batch, seq_len, vocab_size)."""

    def __init__(self, vocab_size, emb_dim, num_heads, num_kv_heads, num_layers, hidden_dim, *, eps=1e-6,
                 rope_base=10_000.0, context_length=4096, tie_embeddings=False, pad_idx=None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_idx)
        nn.init.normal_(self.embedding.weight, std=0.02)
        if pad_idx is not None:
            with torch.no_grad():
                self.embedding.weight[pad_idx].fill_(0)
        self.layers = nn.ModuleList([TransformerBlock(emb_dim, num_heads, num_kv_heads, hidden_dim, eps, rope_base,
                                                      context_length) for _ in range(num_layers)])
        self.final_norm = RMSNorm(emb_dim, eps)
        self.tie_embeddings = tie_embeddings
        if not tie_embeddings:
            self.output = xavier(emb_dim, vocab_size)

    def forward(self, x):
        x = self.embedding(x)
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        return x @ (self.embedding.weight.T if self.tie_embeddings else self.output)


def from_config(config) -> LlamaModel:
    """The twin of a llama-layout ``jaxllm.models.transformer.TransformerConfig``; ``ValueError``
    for a config this model cannot express."""
    llama = dict(rope="rotate_half", final_norm=True, mlp="swiglu", use_bias=False, qkv_layout="fused")
    differ = {k: getattr(config, k) for k, v in llama.items() if getattr(config, k) != v}
    if differ:
        raise ValueError(f"the Llama twin cannot express {differ}")
    return LlamaModel(config.vocab_size, config.d_model, config.num_heads, config.kv_heads, config.num_layers,
                      config.hidden_dim, eps=config.norm_eps, rope_base=config.rope_base,
                      context_length=config.max_len, tie_embeddings=config.tie_embeddings, pad_idx=config.pad_index)
