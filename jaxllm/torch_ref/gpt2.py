"""Raschka ch. 4: ``MultiHeadAttention``, ``LayerNorm``, ``GELU``, ``FeedForward``,
``TransformerBlock``, ``GPTModel`` and ``generate_text_simple``.

Written as the book writes them: same class, attribute and parameter names and the same creation
order (tok_emb, pos_emb, drop_emb, the blocks [att: W_query, W_key, W_value, out_proj, dropout,
mask; ff; norm1; norm2; drop_shortcut], final_norm, out_head), PyTorch's default init, so
``torch.manual_seed(s)`` + ``GPTModel(cfg)`` gives the book's initial weights and the book's state
dicts load with ``strict=True``.

The causal mask is a *persistent* buffer, as in the book: every block's ``att.mask``
(``context_length x context_length``, ``triu(ones, diagonal=1)``) is in ``state_dict()``. It is
not a parameter, so a Flax param tree has no counterpart: read a twin's state dict with
``jaxllm.interop.from_torch(config, sd, strict=False)`` or drop the masks first
(``drop_masks(sd)``); load a state dict without masks (e.g. from ``interop.to_torch``) with
``load_without_masks(model, sd)``, which is strict about everything else.
"""

from __future__ import annotations

import torch
from torch import nn

GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2's BPE
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

GPT_CONFIG_MEDIUM = {**GPT_CONFIG_124M, "emb_dim": 1024, "n_layers": 24, "n_heads": 16}  # 355M

# Small enough to train on a CPU; keeps GPT-2's vocabulary so ``gpt2_encoding()`` drives it.
GPT_CONFIG_TINY = {**GPT_CONFIG_124M, "context_length": 128, "emb_dim": 64, "n_heads": 4, "n_layers": 2}

MASK_SUFFIX = ".att.mask"


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention; x: (batch, num_tokens, d_in) -> (batch, num_tokens, d_out)."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"

        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads

        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, d_in = x.shape

        keys = self.W_key(x)  # (b, num_tokens, d_out)
        queries = self.W_query(x)
        values = self.W_value(x)

        # (b, num_tokens, d_out) -> (b, num_tokens, num_heads, head_dim) -> (b, num_heads, num_tokens, head_dim)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, num_tokens)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)

        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)


class LayerNorm(nn.Module):
    """``scale * (x - mean) / sqrt(var + eps) + shift`` over the last axis; biased variance, eps 1e-5."""

    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    """GELU, tanh approximation (= ``nn.GELU(approximate="tanh")``)."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(
            torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))
        ))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x = x + drop(att(norm1(x))); x = x + drop(ff(norm2(x)))``."""

    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        x = self.att(x)
        x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        x = x + shortcut
        return x


class GPTModel(nn.Module):
    """in_idx (batch, seq_len) int64 -> logits (batch, seq_len, vocab_size); seq_len <= context_length."""

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])

        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])

        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        batch_size, seq_len = in_idx.shape
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = tok_embeds + pos_embeds  # (batch, seq_len, emb_dim)
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """Greedy decoding: idx (batch, n_tokens) -> (batch, n_tokens + max_new_tokens); each step sees
    at most the last ``context_size`` tokens. The caller sets eval mode, as in the book."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # last position only: (batch, vocab_size)
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (batch, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def text_to_token_ids(text, tokenizer):
    """The book's ch. 5 helper: a (1, n) tensor of ids (``<|endoftext|>`` allowed as the special id)."""
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)


def token_ids_to_text(token_ids, tokenizer):
    return tokenizer.decode(token_ids.squeeze(0).tolist())


def drop_masks(state_dict):
    """A copy of ``state_dict`` without the causal-mask buffers (``trf_blocks.{i}.att.mask``)."""
    return {k: v for k, v in state_dict.items() if not k.endswith(MASK_SUFFIX)}


def load_without_masks(model, state_dict):
    """``load_state_dict`` that tolerates missing/extra mask buffers only; any other mismatch raises.

    The model keeps its own masks (they are a function of ``context_length`` alone)."""
    result = model.load_state_dict(drop_masks(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(MASK_SUFFIX)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"state dict does not match {type(model).__name__}: missing {missing or 'nothing'}; "
            f"unexpected {result.unexpected_keys or 'nothing'}"
        )
    return model
