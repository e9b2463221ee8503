"""Decoder-only transformer LM: Burkov's ch. 4 model, and a Llama-style preset of the same model.

    x = embed(tokens)
    per block:  x = x + attn(norm1(x));  x = x + mlp(norm2(x))      (pre-RMSNorm)
    logits = [final_norm](x) @ output      (or @ embedding.T when tie_embeddings)

Config switches (``TransformerConfig``): RoPE layout (``interleaved`` as the book,
``rotate_half`` as Llama/HF), RMSNorm eps, final norm, ReLU or SwiGLU MLP (+ biases), tying,
grouped-query attention (``num_kv_heads < num_heads``), and the Q/K/V parameter layout.

Parameter names (Flax path -> torch key by ``jaxllm.interop``'s rule):

* ``qkv_layout="per_head"`` (the ``burkov`` preset) mirrors the book's ``DecoderLanguageModel``:
  ``embedding/embedding`` -> ``embedding.weight``; ``layers_{i}/norm1/scale``;
  ``layers_{i}/attn/heads_{h}/{W_Q,W_K,W_V}`` (D, d_h); ``layers_{i}/attn/W_O`` (D, D);
  ``layers_{i}/norm2/scale``; ``layers_{i}/mlp/{W_1,B_1,W_2,B_2}``; ``output`` (D, V). All
  matrices x@W layout, so the twin's state dict loads unchanged. Q/K/V are fused at compute time
  (see ``jaxllm.nn.attention``).
* ``qkv_layout="fused"`` (the ``llama`` preset): ``layers_{i}/attn/{W_Q (D, H*d_h), W_K, W_V
  (D, KV*d_h), W_O (H*d_h, D)}``, ``layers_{i}/mlp/{W_1, W_3, W_2}`` (gate, up, down),
  ``final_norm/scale``; ``output`` absent when tied. This layout has no torch twin here.

Init (the book's): embedding N(0, 0.02) with the pad row zeroed; every matrix xavier-uniform;
biases 0; norm scales 1. Like torch's ``padding_idx``, the pad row of the embedding never gets a
gradient through the lookup (masked with ``stop_gradient``); with tied embeddings the output
head's use of that row still trains it, as in torch.

``max_len`` is only the default length of a KV cache (``init_cache``): RoPE has no learned
table, so the uncached forward takes any length. The book trains on context 30; the presets use
512 so that prompts plus generations fit one cache.

The config implements the language-model interface of ``jaxllm.models.lm`` (``init``,
``logits``, ``forward``, ``init_cache``, block and head names, the Hugging Face mapping of the
llama layout); attention and the KV cache are ``jaxllm.nn.attention``'s, shared with GPT-2.
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
from jaxllm.models.lm import LanguageModelConfig, embed_without_pad_gradient, run_blocks
from jaxllm.nn.attention import ROPE, KVCache, SelfAttention
from jaxllm.nn.init import torch_bias_init, torch_kernel_init
from jaxllm.nn.mlp import ACTIVATIONS, FeedForward
from jaxllm.nn.norms import RMSNorm
from jaxllm.nn.ops import matmul, static_positions
from jaxllm.validate import check_concrete_token_ids, check_token_batch

__all__ = ["TransformerConfig", "Transformer", "KVCache", "PRESETS", "preset", "burkov", "tiny", "llama",
           "xavier_bound"]

xavier_uniform = nn.initializers.xavier_uniform()
QKV_LAYOUTS = ("per_head", "fused")
# the llama preset's fixed layout: what Hugging Face's LlamaForCausalLM computes
LLAMA_LAYOUT = dict(qkv_layout="fused", rope="rotate_half", mlp="swiglu", use_bias=False, final_norm=True)


@register
@dataclasses.dataclass(frozen=True)
class TransformerConfig(LanguageModelConfig):
    family: ClassVar[str] = "transformer"
    hf_model_type: ClassVar[str] = "llama"
    vocab_size: int = 256
    d_model: int = 128
    num_heads: int = 8
    num_kv_heads: int | None = None  # None: = num_heads; fewer: grouped-query attention
    num_layers: int = 2
    max_len: int = 512  # default KV-cache length only (RoPE has no length limit)
    pad_index: int | None = None  # its embedding row gets no gradient (torch's padding_idx)
    rope: str = "interleaved"  # "interleaved" (Burkov) | "rotate_half" (Llama / HF)
    rope_base: float = 10000.0
    norm_eps: float = 1e-8
    final_norm: bool = False
    mlp: str = "relu"  # "relu" | "swiglu"
    mlp_hidden: int | None = None  # None: 4 * d_model
    use_bias: bool = True  # MLP biases
    tie_embeddings: bool = False
    qkv_layout: str = "per_head"  # "per_head" (Burkov's names) | "fused" (needed for GQA)
    num_classes: int | None = None  # set: ``output`` is [d_model, num_classes] plus ``output_bias`` (a classifier head)
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, more compute)

    def __post_init__(self):
        if self.num_classes is not None and (self.num_classes < 1 or self.tie_embeddings):
            raise ValueError(f"num_classes must be >= 1 and needs tie_embeddings=False, got {self.num_classes}")
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got d_model / num_heads = {self.head_dim}")
        if not 1 <= self.kv_heads <= self.num_heads or self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads {self.num_heads}, got {self.num_kv_heads}")
        if self.qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout must be one of {QKV_LAYOUTS}, got {self.qkv_layout!r}")
        if self.qkv_layout == "per_head" and self.kv_heads != self.num_heads:
            raise ValueError("grouped-query attention (num_kv_heads < num_heads) needs qkv_layout='fused'")
        if self.rope not in ROPE:
            raise ValueError(f"rope must be one of {tuple(ROPE)}, got {self.rope!r}")
        if self.mlp not in ACTIVATIONS:
            raise ValueError(f"mlp must be one of {ACTIVATIONS}, got {self.mlp!r}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1, got {self.mlp_hidden}")
        if self.pad_index is not None and not 0 <= self.pad_index < self.vocab_size:
            raise ValueError(f"pad_index must lie in [0, {self.vocab_size - 1}], got {self.pad_index}")

    # --- the language-model interface (jaxllm.models.lm) -------------------------------------
    @property
    def context_limit(self) -> int:
        """The longest prompt + generation by default: ``max_len``, the default KV-cache length
        (RoPE itself has no limit, so a longer cache may be asked for explicitly)."""
        return self.max_len

    @property
    def num_blocks(self) -> int:
        return self.num_layers

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def width(self) -> int:
        return self.d_model

    @property
    def head_names(self) -> tuple[str, ...]:
        if self.num_classes is not None:
            return ("output", "output_bias")
        return () if self.tie_embeddings else ("output",)

    @property
    def final_norm_names(self) -> tuple[str, ...]:
        return ("final_norm",) if self.final_norm else ()

    def with_classes(self, num_classes: int) -> "TransformerConfig":
        return self.replace(num_classes=num_classes, tie_embeddings=False)

    def with_dropout(self, rate: float) -> "TransformerConfig":
        if rate:
            raise ValueError("dropout applies to GPT-2 only (the Burkov decoder has no dropout)")
        return self

    def init_cache(self, batch: int, max_len: int | None = None, dtype=jnp.float32) -> KVCache:
        """An empty cache of ``max_len`` (default ``max_len``) slots per row, lengths 0."""
        max_len = self.max_len if max_len is None else max_len
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        return KVCache.zeros(self.num_layers, batch, max_len, self.kv_heads, self.head_dim, dtype)

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return 4 * self.d_model if self.mlp_hidden is None else self.mlp_hidden

    def build(self):
        return Transformer(self)

    def example_input(self, batch: int = 1):
        return jnp.zeros((batch, 4), jnp.int32)

    def validate_input(self, tokens) -> np.ndarray:
        """``tokens`` must be int ids ``[batch, time]`` in ``[0, vocab_size)``; returns int32."""
        return check_token_batch(tokens, self.vocab_size)

    # --- Hugging Face (the llama layout <-> LlamaForCausalLM) ----------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict) -> "TransformerConfig":
        """A Hugging Face ``LlamaConfig`` (as a dict) -> the llama-layout config."""
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"a TransformerConfig maps Hugging Face llama models, got model_type {hf.get('model_type')!r}")
        heads = hf["num_attention_heads"]
        return llama(hf["vocab_size"], d_model=hf["hidden_size"], num_heads=heads,
                     num_kv_heads=hf.get("num_key_value_heads") or heads, num_layers=hf["num_hidden_layers"],
                     mlp_hidden=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
                     tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                     rope_base=float(_hf_rope_theta(hf) or 10000.0)).replace(norm_eps=float(hf.get("rms_norm_eps", 1e-6)))

    def to_hf_config(self) -> dict:
        """This config as a Hugging Face ``LlamaConfig`` dict (the llama layout only)."""
        self._require_llama_layout()
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": self.vocab_size,
                "hidden_size": self.d_model, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.kv_heads, "num_hidden_layers": self.num_layers,
                "intermediate_size": self.hidden_dim, "head_dim": self.head_dim, "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_base, "max_position_embeddings": self.max_len,
                "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
                "mlp_bias": False}

    def hf_mismatches(self, hf: dict | None) -> list[str]:
        """Every way this config differs from the HF config ``hf`` (None: check the layout only)."""
        problems = [f"{name}: the Llama layout needs {value!r}, got {getattr(self, name)!r}"
                    for name, value in LLAMA_LAYOUT.items() if getattr(self, name) != value]
        if self.num_classes is not None:
            problems.append("num_classes: a classifier head has no LlamaForCausalLM counterpart")
        if hf is None:
            return problems
        fields = [("vocab_size", self.vocab_size, hf.get("vocab_size"), False),
                  ("d_model (hidden_size)", self.d_model, hf.get("hidden_size"), False),
                  ("num_heads (num_attention_heads)", self.num_heads, hf.get("num_attention_heads"), False),
                  ("kv_heads (num_key_value_heads)", self.kv_heads,
                   hf.get("num_key_value_heads") or hf.get("num_attention_heads"), False),
                  ("num_layers (num_hidden_layers)", self.num_layers, hf.get("num_hidden_layers"), False),
                  ("mlp_hidden (intermediate_size)", self.hidden_dim, hf.get("intermediate_size"), False),
                  ("norm_eps (rms_norm_eps)", self.norm_eps, hf.get("rms_norm_eps"), True),
                  ("rope_base (rope_theta)", self.rope_base, _hf_rope_theta(hf), True),
                  ("head_dim", self.head_dim, hf.get("head_dim"), False),
                  ("tie_embeddings (tie_word_embeddings)", self.tie_embeddings, hf.get("tie_word_embeddings"), False),
                  ("hidden_act", "silu", hf.get("hidden_act"), False)]
        problems += _differences(fields)
        problems += [f"{flag}=True is not supported" for flag in ("attention_bias", "mlp_bias") if hf.get(flag)]
        return problems

    def hf_param_table(self) -> list[tuple[tuple[str, ...], str, object]]:
        """(Flax path, HF key, transform) for every parameter: ``"same"``, ``"T"`` (transpose)."""
        table = [(("embedding", "embedding"), "model.embed_tokens.weight", "same")]
        for i in range(self.num_layers):
            b, h = f"layers_{i}", f"model.layers.{i}"
            for ours, theirs in (("W_Q", "q_proj"), ("W_K", "k_proj"), ("W_V", "v_proj"), ("W_O", "o_proj")):
                table.append(((b, "attn", ours), f"{h}.self_attn.{theirs}.weight", "T"))
            for ours, theirs in (("W_1", "gate_proj"), ("W_3", "up_proj"), ("W_2", "down_proj")):
                table.append(((b, "mlp", ours), f"{h}.mlp.{theirs}.weight", "T"))
            table += [((b, "norm1", "scale"), f"{h}.input_layernorm.weight", "same"),
                      ((b, "norm2", "scale"), f"{h}.post_attention_layernorm.weight", "same")]
        table.append((("final_norm", "scale"), "model.norm.weight", "same"))
        if not self.tie_embeddings:
            table.append((("output",), "lm_head.weight", "T"))
        return table

    def hf_state_in(self, state: dict) -> dict:
        """An HF state dict made ready for ``hf_param_table``: a tied checkpoint's copy of the
        embedding as ``lm_head.weight`` is dropped (refused if it differs)."""
        if self.tie_embeddings and "lm_head.weight" in state:
            embed = state.get("model.embed_tokens.weight")
            if embed is not None and not np.array_equal(state["lm_head.weight"], embed):
                raise ValueError("lm_head.weight differs from model.embed_tokens.weight, so the checkpoint "
                                 "is untied: use tie_embeddings=False")
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        return state

    def hf_state_out(self, state: dict) -> dict:
        """``hf_param_table``'s output as HF's ``state_dict`` lists it (a tied head too)."""
        if self.tie_embeddings:
            state = {**state, "lm_head.weight": state["model.embed_tokens.weight"].copy()}
        return state

    def _require_llama_layout(self) -> None:
        problems = self.hf_mismatches(None)
        if problems:
            raise ValueError("no Hugging Face counterpart: " + "; ".join(problems))


def _hf_rope_theta(hf: dict):
    if hf.get("rope_theta") is not None:
        return hf["rope_theta"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"HF rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    return rope.get("rope_theta")


def _differences(fields) -> list[str]:
    """``name: ours X, HF Y`` for each (name, ours, theirs, numeric) where HF gives a different value."""
    problems = []
    for name, ours, theirs, numeric in fields:
        if theirs is None:
            continue
        same = np.isclose(float(ours), float(theirs), rtol=1e-6, atol=0) if numeric else ours == theirs
        if not same:
            problems.append(f"{name}: ours {ours!r}, HF {theirs!r}")
    return problems


def burkov(vocab_size: int, pad_index: int | None = None, max_len: int = 512) -> TransformerConfig:
    """The book's decoder (ch. 4): D 128, 8 heads, 2 blocks, interleaved RoPE, pre-RMSNorm eps
    1e-8, ReLU MLP 4x with biases, no final norm, untied output."""
    return TransformerConfig(vocab_size, d_model=128, num_heads=8, num_layers=2, max_len=max_len,
                             pad_index=pad_index)


def tiny(vocab_size: int, pad_index: int | None = None) -> TransformerConfig:
    """The burkov layout, small, for tests and smoke runs."""
    return TransformerConfig(vocab_size, d_model=16, num_heads=2, num_layers=2, max_len=64, pad_index=pad_index)


def llama(vocab_size: int, d_model: int = 128, num_heads: int = 8, num_kv_heads: int | None = None,
          num_layers: int = 2, *, mlp_hidden: int | None = None, max_len: int = 512,
          pad_index: int | None = None, tie_embeddings: bool = False,
          rope_base: float = 10000.0) -> TransformerConfig:
    """Llama-style: rotate-half RoPE, RMSNorm eps 1e-6 with a final norm, SwiGLU without biases
    (hidden ``mlp_hidden``, default 4 * d_model), fused Q/K/V layout, optional GQA and tying."""
    return TransformerConfig(vocab_size, d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                             num_layers=num_layers, max_len=max_len, pad_index=pad_index,
                             rope="rotate_half", rope_base=rope_base, norm_eps=1e-6, final_norm=True,
                             mlp="swiglu", mlp_hidden=mlp_hidden, use_bias=False,
                             tie_embeddings=tie_embeddings, qkv_layout="fused")


PRESETS = {"burkov": burkov, "tiny": tiny, "llama": llama}


def preset(name: str, vocab_size: int, context: int, *, d_model: int | None = None, layers: int | None = None,
           heads: int | None = None, dropout: float | None = None) -> TransformerConfig:
    """A named preset with the scripts' size overrides; the cache holds at least ``context``."""
    if name not in PRESETS:
        raise ValueError(f"the decoder's presets are {tuple(PRESETS)}, got {name!r}")
    config = PRESETS[name](vocab_size)
    sizes = {"d_model": d_model, "num_layers": layers, "num_heads": heads}
    config = config.replace(max_len=max(config.max_len, context), **{k: v for k, v in sizes.items() if v is not None})
    return config if dropout is None else config.with_dropout(dropout)


def embedding_init(pad_index: int | None):
    """The book's: N(0, 0.02), pad row zeroed."""
    def init(key, shape, dtype=jnp.float32):
        table = 0.02 * jax.random.normal(key, shape, dtype)
        return table if pad_index is None else table.at[pad_index].set(0)

    return init


class DecoderBlock(nn.Module):
    """Pre-RMSNorm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, layer_cache, lengths, positions):
        cfg = self.config
        attn = SelfAttention(cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.qkv_layout, rope=cfg.rope,
                             rope_base=cfg.rope_base, name="attn")
        a, layer_cache = attn(RMSNorm(cfg.norm_eps, name="norm1")(x), positions, layer_cache, lengths)
        x = x + a
        return x + FeedForward(cfg.hidden_dim, cfg.mlp, cfg.use_bias, name="mlp")(
            RMSNorm(cfg.norm_eps, name="norm2")(x)), layer_cache


class Transformer(nn.Module):
    """``__call__(tokens int32[B, T], *, positions int32[B, T] | None = None, cache: KVCache | None
    = None, deterministic=True) -> (logits float32[B, T, vocab], cache | None)``.

    Without a cache: causal self-attention over the T tokens, RoPE positions ``0..T-1`` unless
    given. With a cache: the tokens continue each row (keys/values written at slot
    ``cache.lengths[b]``, each token attends to all filled slots up to its own), positions default
    to ``lengths[b] + arange(T)``, and the returned cache has ``lengths + T``. So feeding a prompt
    then tokens one at a time, or in chunks, gives the full forward's logits. ``deterministic`` is
    accepted for the common interface (the book's decoder has no dropout).

    Concrete (non-traced) inputs are checked: token ids outside ``[0, vocab_size)`` and a cache
    without room for the T tokens (``lengths + T > max_len``) raise ``ValueError``. Inside
    ``jit`` (traced ids and lengths) they are the caller's promise: compiled code cannot raise, and
    XLA silently clamps an out-of-range lookup or cache write. Check at the boundary there
    (``TransformerConfig.validate_input``, ``KVCache.check_room``; ``generate`` does both up front).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens, *, positions=None, cache: KVCache | None = None, deterministic: bool = True):
        cfg = self.config
        check_concrete_token_ids(tokens, cfg.vocab_size)  # before any cast; traced ids pass
        batch, t = tokens.shape
        embedding = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embedding_init(cfg.pad_index),
                             name="embedding")
        x = embed_without_pad_gradient(embedding.embedding, tokens, cfg.pad_index)
        if cache is not None:
            cache.check(layers=cfg.num_layers, batch=batch, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                        new_tokens=t)
        if positions is None and cache is None:
            positions = static_positions(t)  # 0..t-1
        elif positions is None:
            positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

        block = nn.remat(DecoderBlock) if cfg.remat else DecoderBlock  # same param names
        x, cache = run_blocks(lambda i: block(cfg, name=f"layers_{i}"), cfg.num_layers, x, positions, cache=cache)
        if cfg.final_norm:
            x = RMSNorm(cfg.norm_eps, name="final_norm")(x)
        if cfg.tie_embeddings:
            return x @ embedding.embedding.T, cache
        if cfg.num_classes is not None:  # a new Linear(d_model, classes) head, torch's default init
            output = self.param("output", torch_kernel_init, (cfg.d_model, cfg.num_classes))
            return matmul(x, output) + self.param("output_bias", torch_bias_init(cfg.d_model), (cfg.num_classes,)), cache
        return matmul(x, self.param("output", xavier_uniform, (cfg.d_model, cfg.vocab_size))), cache


def xavier_bound(fan_in: int, fan_out: int) -> float:
    """Half-width of the xavier-uniform distribution."""
    return math.sqrt(6.0 / (fan_in + fan_out))
