"""Load a base language model from disk: a ``train/lm.py`` run directory or a local Hugging Face
GPT-2 directory. Fine-tuning scripts (``train/classify.py``, ``train/instruct.py``) and
``train/generate.py`` start from here. Nothing downloads.

``load_base(path) -> Base(config, params, encoding, source)``:

* a run directory (``tokenizer.json`` + ``checkpoints/<step>``): the model config comes from the
  run config saved in the checkpoint's metadata, the params from the chosen (latest) checkpoint,
  the tokenizer from ``tokenizer.json``;
* an HF directory (``config.json`` with ``model_type: gpt2`` and ``model.safetensors`` or
  ``pytorch_model.bin``): a ``GPT2Config`` built from ``config.json`` (Q/K/V biases, untied head
  filled from ``wte`` as HF ties it, dropout from ``resid_pdrop``), params via
  ``interop.from_hf``, GPT-2's own BPE.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import tiktoken

import jaxllm.models  # noqa: F401  (registers the model configs)
from jaxllm.config import config_from_dict


class Base(NamedTuple):
    config: Any
    params: Any
    encoding: tiktoken.Encoding
    source: str  # "run:<dir>@<step>" or "hf:<dir>"


def load_base(path: str | os.PathLike, step: int | None = None) -> Base:
    """A ``train/lm.py`` run directory or a local HF GPT-2 directory -> ``Base``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"no base model directory {path}: pass a train/lm.py output directory "
                         "(run `make demo` to make runs/lm) or a local Hugging Face GPT-2 directory")
    if os.path.isfile(os.path.join(path, "tokenizer.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
        config, params, encoding, step = load_run(path, step)
        return Base(config, params, encoding, f"run:{path}@{step}")
    if os.path.isfile(os.path.join(path, "config.json")):
        config, params = load_hf_gpt2(path)
        from jaxllm.data.tokenizer import gpt2_encoding

        encoding = gpt2_encoding()
        check_vocab_fits(encoding, config, f"GPT-2's tokenizer (used for {path})", os.path.join(path, "config.json"))
        return Base(config, params, encoding, f"hf:{path}")
    raise ValueError(f"{path} is neither a train/lm.py run (tokenizer.json + checkpoints/) nor a Hugging Face "
                     "model directory (config.json + model.safetensors or pytorch_model.bin)")


def check_vocab_fits(encoding, config, tokenizer_name: str, model_name: str) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding: ``ValueError``
    naming both sizes and both files otherwise (an id past the table would be clamped silently
    under jit)."""
    ids = encoding.max_token_value + 1
    if ids > config.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer_name} has {ids} token ids but the model in {model_name} embeds "
                         f"only {config.vocab_size} (vocab_size): they do not belong together")


def gpt2_config_from_hf(hf: dict, **changes):
    """HF ``GPT2Config`` fields -> our ``GPT2Config`` (Q/K/V biases on, head untied)."""
    from jaxllm.models.gpt2 import GPT2Config

    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"only Hugging Face GPT-2 directories are supported, got model_type {hf.get('model_type')!r}")
    fields = dict(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
                  n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=float(hf.get("resid_pdrop", 0.1)),
                  qkv_bias=True)
    return GPT2Config(**{**fields, **changes})


def load_hf_gpt2(directory: str):
    """``(GPT2Config, params)`` of a local HF GPT-2 directory."""
    from jaxllm.interop import from_hf

    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    config = gpt2_config_from_hf(hf)
    return config, from_hf(config, directory, hf_config=hf)


def load_run(run_dir: str, step: int | None = None):
    """``(model config, params, encoding, step)`` of a ``train/lm.py`` output directory.

    The whole train state of the chosen checkpoint is restored into a template of the same
    shapes (zeros shaped by ``jax.eval_shape``, so no initialiser runs) built from the model and
    optimiser config saved in it; only its params are returned. Without ``step``, the newest
    intact checkpoint (a damaged newer one is skipped with a warning; see ``Checkpointer.restore``).
    A tokenizer with more ids than the model's ``vocab_size`` is refused.
    """
    from jaxllm.data.tokenizer import load_encoding
    from jaxllm.training import TrainState, make_optimizer
    from jaxllm.training.checkpoint import Checkpointer
    from jaxllm.training.optim import OptimizerConfig

    if not os.path.isdir(run_dir):
        raise ValueError(f"no run directory {run_dir}")
    tokenizer = os.path.join(run_dir, "tokenizer.json")
    if not os.path.exists(tokenizer):
        raise ValueError(f"{run_dir} has no tokenizer.json: is it a train/lm.py output directory?")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
        raise ValueError(f"{run_dir} holds no checkpoint (expected {ckpt_dir}/<step>)")
    encoding = load_encoding(tokenizer)
    found = {}

    def template(meta):
        where = f"checkpoint step {meta.get('step')} in {ckpt_dir}"
        run = meta.get("config") or {}
        if "model" not in run or "optimizer" not in run:
            raise ValueError(f"{where} carries no run config (model and optimizer)")
        config = config_from_dict(run["model"])
        check_vocab_fits(encoding, config, tokenizer, where)
        optimizer = make_optimizer(OptimizerConfig(**run["optimizer"]))

        def fresh():
            params = config.build().init(jax.random.PRNGKey(0), config.example_input())["params"]
            return TrainState.create(params, optimizer, jax.random.PRNGKey(0))

        found["config"] = config
        shapes = jax.eval_shape(fresh)  # zeros of the right shapes: no initialiser runs
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    with Checkpointer(ckpt_dir) as ckpt:
        state, meta = ckpt.restore_with(template, step)
    return found["config"], state.params, encoding, int(meta["step"])
