"""GPT-2 (Raschka ch. 4 ``GPTModel``) in Flax Linen, with a KV cache.

    x = drop(tok_emb(tokens) + pos_emb(positions))
    per block:  x = x + drop(att(norm1(x)));  x = x + drop(ff(norm2(x)))      (pre-LayerNorm)
    logits = final_norm(x) @ out_head        (or @ tok_emb.T when tie_embeddings)

LayerNorm eps 1e-5 with the biased variance, tanh-approximate GELU, learned positions, causal
attention scaled by ``1/sqrt(head_dim)``. Dropout (rate ``drop_rate``) after the embeddings, on
the attention weights and on both residual branches, active only with ``deterministic=False``
and a ``dropout`` rng.

Parameter names (Flax path -> torch key by ``jaxllm.interop``'s rule) are the twin's
(``jaxllm.torch_ref.gpt2.GPTModel``): ``tok_emb/embedding`` -> ``tok_emb.weight``,
``pos_emb/embedding``, ``trf_blocks_{i}/att/{W_query,W_key,W_value,out_proj}/{kernel,bias}``
(Q/K/V biases only with ``qkv_bias``), ``trf_blocks_{i}/ff/layers_0|layers_2/{kernel,bias}``,
``trf_blocks_{i}/norm1|norm2/{scale,shift}``, ``final_norm/{scale,shift}``, ``out_head/kernel``
(no bias; absent when tied; ``[D, num_classes]`` with a bias when ``num_classes`` is set, so the
model returns class logits at every position, as the book's classifier does). The twin's state dict also holds the causal masks
(``trf_blocks.{i}.att.mask``, buffers, not parameters): read it with
``interop.from_torch(config, sd, strict=False)`` or ``from_torch(config, drop_masks(sd))``.

Init follows PyTorch's defaults: embeddings N(0, 1); Linear weights and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm scale 1, shift 0.

Attention is ``jaxllm.nn.attention.SelfAttention`` in its ``dense`` layout (no RoPE: positions
are the learned table's), shared with the RoPE decoder, so training takes the same fast causal
attention, attention dropout included. The KV cache is ``jaxllm.nn.attention.KVCache`` (per
layer keys and values, per-row lengths); with a cache, token t of row b sits at position
``lengths[b] + t`` (keys written there, learned position looked up there), so a prompt then
tokens one at a time (or in chunks) gives the full forward's logits. The config implements the
language-model interface of ``jaxllm.models.lm``, with the Hugging Face ``GPT2LMHeadModel``
mapping.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxllm.config import register
from jaxllm.models.lm import LanguageModelConfig, run_blocks
from jaxllm.nn.attention import KVCache, SelfAttention
from jaxllm.nn.init import torch_dense
from jaxllm.nn.norms import LayerNorm
from jaxllm.validate import check_concrete_token_ids, check_token_batch

__all__ = ["GPT2Config", "GPT2", "KVCache", "PRESETS", "preset", "gpt2_124m", "gpt2_medium", "tiny", "gelu_tanh"]


@register
@dataclasses.dataclass(frozen=True)
class GPT2Config(LanguageModelConfig):
    family: ClassVar[str] = "gpt2"
    block_prefix: ClassVar[str] = "trf_blocks_"
    hf_model_type: ClassVar[str] = "gpt2"
    hf_tokenizer: ClassVar[str] = "gpt2"
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = False
    num_classes: int | None = None  # set: out_head is a new Linear(emb_dim, num_classes) with bias (Raschka ch. 6)
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, more compute)

    def __post_init__(self):
        if self.num_classes is not None and (self.num_classes < 1 or self.tie_embeddings):
            raise ValueError(f"num_classes must be >= 1 and needs tie_embeddings=False, got {self.num_classes}")
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def context_limit(self) -> int:
        """The longest prompt + generation: ``context_length``, the learned position table (a hard
        limit: a KV cache may not be longer)."""
        return self.context_length

    # --- the language-model interface (jaxllm.models.lm) -------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def width(self) -> int:
        return self.emb_dim

    @property
    def head_names(self) -> tuple[str, ...]:
        return () if self.tie_embeddings else ("out_head",)

    @property
    def final_norm_names(self) -> tuple[str, ...]:
        return ("final_norm",)

    @property
    def max_positions(self) -> int:
        return self.context_length

    def with_classes(self, num_classes: int) -> "GPT2Config":
        return self.replace(num_classes=num_classes, tie_embeddings=False)

    def with_dropout(self, rate: float) -> "GPT2Config":
        return self.replace(drop_rate=rate)

    def init_cache(self, batch: int, max_len: int | None = None, dtype=jnp.float32) -> KVCache:
        """An empty cache, lengths 0. ``max_len`` (default ``context_length``) may not exceed
        ``context_length``: there are no learned positions past it."""
        max_len = self.context_length if max_len is None else max_len
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if max_len > self.context_length:
            raise ValueError(f"max_len {max_len} exceeds the model's context_length of {self.context_length} (its "
                             "learned positions; past them the lookup would be clamped silently)")
        return KVCache.zeros(self.n_layers, batch, max_len, self.n_heads, self.head_dim, dtype)

    def build(self):
        return GPT2(self)

    def example_input(self, batch: int = 1):
        return jnp.zeros((batch, 4), jnp.int32)

    def validate_input(self, tokens) -> np.ndarray:
        """``tokens`` must be int ids ``[batch, time]`` in ``[0, vocab_size)`` with ``time <=
        context_length``; returns int32."""
        return check_token_batch(tokens, self.vocab_size, max_time=self.context_length)

    def to_twin_dict(self) -> dict:
        """The twin's ``cfg`` dict (tying has no twin counterpart)."""
        return {"vocab_size": self.vocab_size, "context_length": self.context_length, "emb_dim": self.emb_dim,
                "n_heads": self.n_heads, "n_layers": self.n_layers, "drop_rate": self.drop_rate,
                "qkv_bias": self.qkv_bias}

    # --- Hugging Face (GPT2LMHeadModel) -------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict, **changes) -> "GPT2Config":
        """HF ``GPT2Config`` fields -> ours (Q/K/V biases on; the head untied, filled from ``wte`` as
        HF ties it; dropout from ``resid_pdrop``)."""
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"a GPT2Config maps Hugging Face GPT-2 models, got model_type {hf.get('model_type')!r}")
        fields = dict(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
                      n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=float(hf.get("resid_pdrop", 0.1)),
                      qkv_bias=True)
        return cls(**{**fields, **changes})

    def to_hf_config(self) -> dict:
        """This config as a Hugging Face ``GPT2Config`` dict."""
        problems = self.hf_mismatches(None)
        if problems:
            raise ValueError("no Hugging Face counterpart: " + "; ".join(problems))
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": self.vocab_size,
                "n_positions": self.context_length, "n_ctx": self.context_length, "n_embd": self.emb_dim,
                "n_head": self.n_heads, "n_layer": self.n_layers, "n_inner": None, "activation_function": "gelu_new",
                "resid_pdrop": self.drop_rate, "embd_pdrop": self.drop_rate, "attn_pdrop": self.drop_rate,
                "layer_norm_epsilon": 1e-5, "tie_word_embeddings": self.tie_embeddings}

    def hf_export_config(self) -> "GPT2Config":
        return self.replace(qkv_bias=True)

    def hf_exportable(self, params) -> tuple["GPT2Config", dict]:
        """The book's GPT-2 has no Q/K/V biases (``qkv_bias=False``) but HF GPT-2 always has them:
        zero biases compute the same function, so they are added as zeros."""
        if self.qkv_bias:
            return self, params
        full = self.hf_export_config()
        flat = flatten_dict(params)
        added = {p: np.zeros(s.shape, s.dtype) for p, s in flatten_dict(full.param_shapes()).items() if p not in flat}
        return full, unflatten_dict({**flat, **added})

    def hf_mismatches(self, hf: dict | None) -> list[str]:
        """Every way this config differs from the HF config ``hf`` (None: what any HF GPT-2 needs)."""
        problems = []
        if not self.qkv_bias:
            problems.append("qkv_bias: HF GPT-2 has Q/K/V biases, so the config needs qkv_bias=True")
        if self.num_classes is not None:
            problems.append("num_classes: a classifier head has no GPT2LMHeadModel counterpart")
        if hf is None:
            return problems
        for name, ours, theirs in (("vocab_size", self.vocab_size, hf.get("vocab_size")),
                                   ("context_length (n_positions)", self.context_length, hf.get("n_positions")),
                                   ("emb_dim (n_embd)", self.emb_dim, hf.get("n_embd")),
                                   ("n_heads (n_head)", self.n_heads, hf.get("n_head")),
                                   ("n_layers (n_layer)", self.n_layers, hf.get("n_layer"))):
            if theirs is not None and ours != theirs:
                problems.append(f"{name}: ours {ours!r}, HF {theirs!r}")
        eps = hf.get("layer_norm_epsilon")
        if eps is not None and not np.isclose(eps, 1e-5, rtol=1e-6, atol=0):
            problems.append(f"layer_norm_epsilon: ours 1e-05, HF {eps!r}")
        if hf.get("n_inner") not in (None, 4 * self.emb_dim):
            problems.append(f"n_inner: ours {4 * self.emb_dim}, HF {hf['n_inner']}")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            problems.append(f"activation_function: ours tanh GELU (gelu_new), HF {act!r}")
        problems += [f"{flag}=True is not supported" for flag in ("scale_attn_by_inverse_layer_idx",
                                                                  "reorder_and_upcast_attn") if hf.get(flag)]
        if hf.get("scale_attn_weights") is False:
            problems.append("scale_attn_weights=False is not supported")
        return problems

    def hf_param_table(self) -> list[tuple[tuple[str, ...], str, object]]:
        """(Flax path, HF key, transform) for every parameter: ``"same"``, ``"T"`` (transpose) or
        ``("split", j, 3)`` (the j-th third of the fused ``c_attn``; HF's Conv1D is x@W already)."""
        table = [(("tok_emb", "embedding"), "wte.weight", "same"),
                 (("pos_emb", "embedding"), "wpe.weight", "same")]
        for i in range(self.n_layers):
            b, h = f"trf_blocks_{i}", f"h.{i}"
            for j, name in enumerate(("W_query", "W_key", "W_value")):
                table += [((b, "att", name, "kernel"), f"{h}.attn.c_attn.weight", ("split", j, 3)),
                          ((b, "att", name, "bias"), f"{h}.attn.c_attn.bias", ("split", j, 3))]
            table += [((b, "att", "out_proj", "kernel"), f"{h}.attn.c_proj.weight", "same"),
                      ((b, "att", "out_proj", "bias"), f"{h}.attn.c_proj.bias", "same"),
                      ((b, "ff", "layers_0", "kernel"), f"{h}.mlp.c_fc.weight", "same"),
                      ((b, "ff", "layers_0", "bias"), f"{h}.mlp.c_fc.bias", "same"),
                      ((b, "ff", "layers_2", "kernel"), f"{h}.mlp.c_proj.weight", "same"),
                      ((b, "ff", "layers_2", "bias"), f"{h}.mlp.c_proj.bias", "same")]
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                table += [((b, ours, "scale"), f"{h}.{theirs}.weight", "same"),
                          ((b, ours, "shift"), f"{h}.{theirs}.bias", "same")]
        table += [(("final_norm", "scale"), "ln_f.weight", "same"),
                  (("final_norm", "shift"), "ln_f.bias", "same")]
        if not self.tie_embeddings:
            table.append((("out_head", "kernel"), "lm_head.weight", "T"))
        return table

    def hf_state_in(self, state: dict) -> dict:
        """An HF state dict made ready for ``hf_param_table``: the ``transformer.`` prefix dropped;
        HF ties ``lm_head`` to ``wte``, so an untied config takes ``wte`` when the file has no
        ``lm_head.weight`` (safetensors drops the copy), and a tied one drops ``lm_head.weight``
        (refused if it differs from ``wte``)."""
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        if self.tie_embeddings and "lm_head.weight" in state:
            if "wte.weight" in state and not np.array_equal(state["lm_head.weight"], state["wte.weight"]):
                raise ValueError("lm_head.weight differs from wte.weight, so the checkpoint is untied: "
                                 "use tie_embeddings=False")
            state.pop("lm_head.weight")
        if not self.tie_embeddings and "lm_head.weight" not in state and "wte.weight" in state:
            state["lm_head.weight"] = state["wte.weight"]
        return state

    def hf_state_out(self, state: dict) -> dict:
        """``hf_param_table``'s output as ``GPT2LMHeadModel.state_dict`` lists it (``transformer.``
        prefix; a tied head as a copy of ``wte``)."""
        out = {(k if k.startswith("lm_head") else f"transformer.{k}"): v for k, v in state.items()}
        if self.tie_embeddings:
            out["lm_head.weight"] = out["transformer.wte.weight"].copy()
        return out


def gpt2_124m(**changes) -> GPT2Config:
    """The book's GPT_CONFIG_124M: 163,009,536 parameters untied, 124,412,160 tied."""
    return GPT2Config(**changes)


def gpt2_medium(**changes) -> GPT2Config:
    """GPT-2 medium (355M): emb 1024, 24 layers, 16 heads."""
    return GPT2Config(**{"emb_dim": 1024, "n_layers": 24, "n_heads": 16, **changes})


def tiny(**changes) -> GPT2Config:
    """The twin's GPT_CONFIG_TINY: GPT-2's vocabulary, context 128, emb 64, 4 heads, 2 layers."""
    return GPT2Config(**{"context_length": 128, "emb_dim": 64, "n_heads": 4, "n_layers": 2, **changes})


PRESETS = {"tiny": tiny, "gpt2_124m": gpt2_124m, "gpt2_medium": gpt2_medium}


def preset(name: str, vocab_size: int, context: int, *, d_model: int | None = None, layers: int | None = None,
           heads: int | None = None, dropout: float | None = None) -> GPT2Config:
    """A named preset with the scripts' size overrides; ``context`` is the learned position table."""
    if name not in PRESETS:
        raise ValueError(f"GPT-2's presets are {tuple(PRESETS)}, got {name!r}")
    sizes = {"emb_dim": d_model, "n_layers": layers, "n_heads": heads}
    config = PRESETS[name](vocab_size=vocab_size, context_length=context, **{k: v for k, v in sizes.items() if v is not None})
    return config if dropout is None else config.with_dropout(dropout)


def gelu_tanh(x):
    return 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * jnp.power(x, 3))))


class FeedForward(nn.Module):
    """``layers_0`` (D -> 4D), tanh GELU, ``layers_2`` (4D -> D): the twin's ``ff.layers.{0,2}``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        d = self.config.emb_dim
        x = gelu_tanh(torch_dense(4 * d, d, name="layers_0")(x))
        return torch_dense(d, 4 * d, name="layers_2")(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block with dropout on both residual branches (and, inside, on the attention
    weights): ``x + drop(att(norm1(x)))``, then ``x + drop(ff(norm2(x)))``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, layer_cache=None, lengths=None, deterministic: bool = True):
        cfg = self.config
        drop = nn.Dropout(cfg.drop_rate)
        att = SelfAttention(cfg.n_heads, cfg.n_heads, cfg.head_dim, "dense", use_bias=cfg.qkv_bias, rope=None,
                            dropout_rate=cfg.drop_rate, name="att")
        a, layer_cache = att(LayerNorm(name="norm1")(x), None, layer_cache, lengths, deterministic)
        x = x + drop(a, deterministic=deterministic)
        f = FeedForward(cfg, name="ff")(LayerNorm(name="norm2")(x))
        return x + drop(f, deterministic=deterministic), layer_cache


class GPT2(nn.Module):
    """``__call__(tokens int32[B, T], *, cache: KVCache | None = None, deterministic=True) ->
    (logits float32[B, T, vocab], cache | None)``.

    Without a cache, positions are ``0..T-1`` (T <= context_length). With one, the tokens
    continue each row at slot/position ``cache.lengths[b]`` and the returned cache has
    ``lengths + T``. Concrete (non-traced) inputs are checked: token ids outside ``[0,
    vocab_size)`` and a cache without room for the T tokens (``lengths + T`` past ``max_len`` or
    ``context_length``) raise ``ValueError``. Inside ``jit`` (traced ids and lengths) they are the
    caller's promise: compiled code cannot raise, and XLA silently clamps out-of-range lookups and
    cache writes; check at the boundary there (``GPT2Config.validate_input``, ``KVCache.check_room``;
    ``generate`` does both up front).
    Dropout runs only with ``deterministic=False`` and a ``dropout`` rng (``rngs={"dropout": k}``).
    """

    config: GPT2Config

    @nn.compact
    def __call__(self, tokens, *, cache: KVCache | None = None, deterministic: bool = True):
        cfg = self.config
        deterministic = deterministic or cfg.drop_rate == 0.0 or not self.has_rng("dropout")
        check_concrete_token_ids(tokens, cfg.vocab_size)  # before any cast; traced ids pass
        batch, t = tokens.shape
        normal = nn.initializers.normal(1.0)  # torch's nn.Embedding init
        tok_emb = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=normal, name="tok_emb")
        pos_emb = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=normal, name="pos_emb")

        if cache is not None:
            # concrete lengths only (under jit the caller's promise); past the learned table the
            # position lookup would be clamped silently
            cache.check(layers=cfg.n_layers, batch=batch, kv_heads=cfg.n_heads, head_dim=cfg.head_dim,
                        new_tokens=t, positions=cfg.context_length)
            positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        else:
            if t > cfg.context_length:  # static shapes: raises at trace time
                raise ValueError(f"{t} tokens exceed the context_length of {cfg.context_length}")
            positions = jnp.arange(t, dtype=jnp.int32)[None, :]

        x = tok_emb(tokens) + pos_emb(positions)
        x = nn.Dropout(cfg.drop_rate)(x, deterministic=deterministic)

        # remat keeps param names (the explicit name); `deterministic` is a Python bool: static
        block = nn.remat(TransformerBlock, static_argnums=(4,)) if cfg.remat else TransformerBlock
        x, cache = run_blocks(lambda i: block(cfg, name=f"trf_blocks_{i}"), cfg.n_layers, x, deterministic,
                              cache=cache)
        x = LayerNorm(name="final_norm")(x)
        if cfg.tie_embeddings:
            return tok_emb.attend(x), cache
        if cfg.num_classes is not None:  # classifier: the book swaps out_head for Linear(D, classes)
            return torch_dense(cfg.num_classes, cfg.emb_dim, name="out_head")(x), cache
        return torch_dense(cfg.vocab_size, cfg.emb_dim, name="out_head", use_bias=False)(x), cache
