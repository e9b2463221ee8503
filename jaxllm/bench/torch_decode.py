"""Greedy decoding with the PyTorch twins, with and without a KV cache, for the benchmarks.

The twins are the books' models and have no cache. ``greedy_no_cache`` is the books' loop
(Raschka's ``generate_text_simple``: a full forward of the whole prefix per new token).
``greedy_cached`` decodes with the usual imperative KV cache built from the twin's own modules
and weights: preallocated ``[batch, heads, max_len, head_dim]`` key/value tensors per layer,
written in place, each new token attending to the filled prefix (so its cost grows with the
position, as it does in Hugging Face's ``DynamicCache``). Both return the same tokens as the
twin's full forward (checked in ``tests/test_bench.py``).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def greedy_no_cache(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prompt int64[batch, P] -> int64[batch, new_tokens], one full forward per token."""
    idx = prompt
    for _ in range(new_tokens):
        out = model(idx)
        logits = out[0] if isinstance(out, tuple) else out
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, prompt.shape[1]:]


@torch.no_grad()
def greedy_cached(model, prompt: torch.Tensor, new_tokens: int, max_len: int | None = None) -> torch.Tensor:
    """prompt int64[batch, P] -> int64[batch, new_tokens]: one prefill, then one cached step per token."""
    decoder = CachedDecoder(model, prompt.shape[0], max_len or prompt.shape[1] + new_tokens)
    logits = decoder.step(prompt)
    out = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        if len(out) < new_tokens:
            logits = decoder.step(token)
    return torch.cat(out, dim=1)


class CachedDecoder:
    """A KV cache around a twin (``GPTModel`` or Burkov's ``DecoderLanguageModel``).

    ``step(tokens int64[batch, T]) -> logits [batch, T, vocab]`` continues every row at the same
    position ``self.length`` (prefill: the whole prompt; decode: one token)."""

    def __init__(self, model, batch: int, max_len: int):
        from jaxllm.torch_ref import gpt2, transformer

        if isinstance(model, gpt2.GPTModel):
            self.kind, blocks = "gpt2", list(model.trf_blocks)
            heads, head_dim = blocks[0].att.num_heads, blocks[0].att.head_dim
            if max_len > model.pos_emb.num_embeddings:
                raise ValueError(f"max_len {max_len} exceeds the context_length {model.pos_emb.num_embeddings}")
        elif isinstance(model, transformer.DecoderLanguageModel):
            self.kind, blocks = "decoder", list(model.layers)
            heads, head_dim = len(blocks[0].attn.heads), blocks[0].attn.heads[0].d_h
        else:
            raise ValueError(f"no cached decoder for {type(model).__name__}")
        self.model, self.blocks, self.max_len, self.length = model, blocks, max_len, 0
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape) for _ in blocks]
        self.v = [torch.zeros(shape) for _ in blocks]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"{t} more tokens overflow the cache: {start} of {self.max_len} slots are filled")
        mask = torch.ones(t, end, dtype=torch.bool).tril(diagonal=start)  # query i sees slots <= start + i
        logits = self._gpt2(tokens, start, end, mask) if self.kind == "gpt2" else self._decoder(tokens, start, end, mask)
        self.length = end
        return logits

    def _attend(self, layer, q, k, v, start, end, mask):
        """q, k, v [batch, heads, T, dh] -> [batch, T, heads * dh] over the cache's filled slots."""
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        scores = (q @ keys.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = weights @ values
        return out.transpose(1, 2).flatten(2)

    def _gpt2(self, tokens, start, end, mask):
        m = self.model
        x = m.tok_emb(tokens) + m.pos_emb(torch.arange(start, end))
        for i, block in enumerate(self.blocks):
            att, h = block.att, block.norm1(x)
            split = lambda y: y.view(y.shape[0], y.shape[1], att.num_heads, att.head_dim).transpose(1, 2)
            a = self._attend(i, split(att.W_query(h)), split(att.W_key(h)), split(att.W_value(h)), start, end, mask)
            x = x + att.out_proj(a)
            x = x + block.ff(block.norm2(x))
        return m.out_head(m.final_norm(x))

    def _decoder(self, tokens, start, end, mask):
        m = self.model
        x = m.embedding(tokens)
        for i, block in enumerate(self.blocks):
            h = block.norm1(x)
            heads = block.attn.heads
            q = torch.stack([rope_at(h @ hd.W_Q, start) for hd in heads], dim=1)
            k = torch.stack([rope_at(h @ hd.W_K, start) for hd in heads], dim=1)
            v = torch.stack([h @ hd.W_V for hd in heads], dim=1)
            x = x + self._attend(i, q, k, v, start, end, mask) @ block.attn.W_O
            x = x + block.mlp(block.norm2(x))
        return x @ m.output


def rope_at(x: torch.Tensor, start: int, theta_base: float = 10000.0) -> torch.Tensor:
    """Burkov's interleaved ``rope`` for tokens at positions ``start .. start + seq_len - 1``
    (the twin's ``rope`` always starts at 0). x: (batch, seq_len, d_h)."""
    _, seq_len, dim = x.shape
    pos = torch.arange(start, start + seq_len, dtype=torch.float32).unsqueeze(1)
    freqs = 1.0 / (theta_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = pos * freqs
    sin, cos = torch.sin(angles), torch.cos(angles)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
