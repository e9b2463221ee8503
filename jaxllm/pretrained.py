"""Load a base language model from disk: a ``jaxllm train lm`` run directory or a local Hugging Face
model directory. Fine-tuning scripts (``train/classify.py``, ``train/instruct.py``) and
``train/generate.py`` start from here. Nothing downloads.

``load_base(path) -> Base(config, params, encoding, source, context, run)``:

* a run directory (``tokenizer.json`` + ``checkpoints/<step>``): the model config comes from the
  run config saved in the checkpoint's metadata, the params from the chosen (newest intact)
  checkpoint, the tokenizer from ``tokenizer.json``, the context it was trained at from the run's
  data settings, and the whole run config (``run``: what ``jaxllm.chat`` reads to tell an
  instruction-tuned run from a language model);
* an HF directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``): the config
  class whose ``hf_model_type`` is the file's ``model_type`` builds the config
  (``from_hf_config``), ``interop.from_hf`` the params; the tokenizer is the directory's own
  ``tokenizer.json`` when it holds a byte-level BPE (every ``jaxllm export``, GPT-2's), else the
  one that ships with this package for the model type (GPT-2's BPE); the context is the model's
  ``context_limit``.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import tiktoken

from jaxllm.config import config_from_dict
from jaxllm.models import hf_config_class


class Base(NamedTuple):
    config: Any
    params: Any
    encoding: tiktoken.Encoding
    source: str  # "run:<dir>@<step>" or "hf:<dir>"
    context: int  # the context the base was trained at: the default length of fine-tuning rows
    run: dict  # the run config saved with the checkpoint ({} for a Hugging Face directory)


def load_base(path: str | os.PathLike, step: int | None = None) -> Base:
    """A ``jaxllm train lm`` run directory or a local HF model directory -> ``Base``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"no base model directory {path}: pass a `jaxllm train lm` output directory "
                         "(run `make demo` to make runs/lm) or a local Hugging Face directory (GPT-2, Llama)")
    if os.path.isfile(os.path.join(path, "tokenizer.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
        config, params, encoding, step, context, run = _load_run(path, step)
        return Base(config, params, encoding, f"run:{path}@{step}", context, run)
    if os.path.isfile(os.path.join(path, "config.json")):
        if step is not None:
            raise ValueError(f"--step picks a checkpoint of a run directory; the Hugging Face directory {path} has none")
        config, params = load_hf(path)
        encoding, tokenizer = _hf_encoding(config, path)
        check_vocab_fits(encoding, config, tokenizer, os.path.join(path, "config.json"))
        return Base(config, params, encoding, f"hf:{path}", config.context_limit, {})
    raise ValueError(f"{path} is neither a `jaxllm train lm` run (tokenizer.json + checkpoints/) nor a Hugging Face "
                     "model directory (config.json + model.safetensors or pytorch_model.bin)")


def check_vocab_fits(encoding, config, tokenizer_name: str, model_name: str) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding: ``ValueError``
    naming both sizes and both files otherwise (an id past the table would be clamped silently
    under jit)."""
    ids = encoding.max_token_value + 1
    if ids > config.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer_name} has {ids} token ids but the model in {model_name} embeds "
                         f"only {config.vocab_size} (vocab_size): they do not belong together")


def load_hf(directory: str):
    """``(config, params)`` of a local HF model directory, by its ``config.json``'s ``model_type``."""
    from jaxllm.interop import from_hf

    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    config = hf_config_class(hf.get("model_type")).from_hf_config(hf)
    return config, from_hf(config, directory, hf_config=hf)


def _hf_encoding(config, directory: str) -> tuple[tiktoken.Encoding, str]:
    """``(encoding, what it is)``: the directory's own ``tokenizer.json`` (a byte-level BPE, as
    ``jaxllm export`` writes), else the tokenizer that ships with this package for the model type
    (GPT-2's BPE)."""
    from jaxllm.data.tokenizer import gpt2_encoding, load_hf_tokenizer

    own = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(own):
        return load_hf_tokenizer(own), own
    if config.hf_tokenizer != "gpt2":
        raise ValueError(f"{directory} has no tokenizer.json, and no offline tokenizer ships for Hugging Face "
                         f"{config.hf_model_type} models (only GPT-2's BPE)")
    return gpt2_encoding(), f"{config.hf_tokenizer}'s tokenizer (used for {directory})"


def load_run(run_dir: str, step: int | None = None):
    """``(model config, params, encoding, step)`` of a ``jaxllm train lm`` output directory.

    The whole train state of the chosen checkpoint is restored into a template of the same
    shapes (zeros shaped by ``jax.eval_shape``, so no initialiser runs) built from the model and
    optimiser config saved in it; only its params are returned. Without ``step``, the newest
    intact checkpoint (a damaged newer one is skipped with a warning; see ``Checkpointer.restore``).
    A tokenizer with more ids than the model's ``vocab_size`` is refused. A LoRA run's adapters
    (``jaxllm finetune instruct --mode lora``) come merged into the weights.
    """
    return _load_run(run_dir, step)[:4]


def _load_run(run_dir: str, step: int | None = None):
    """``load_run``'s four, the context the run trained at and its whole run config (``jaxllm.export``)."""
    from jaxllm.data.tokenizer import load_encoding
    from jaxllm.training import TrainState, make_optimizer
    from jaxllm.training.checkpoint import Checkpointer
    from jaxllm.nn import lora
    from jaxllm.training.freeze import lora_optimizer
    from jaxllm.training.optim import OptimizerConfig

    if not os.path.isdir(run_dir):
        raise ValueError(f"no run directory {run_dir}")
    tokenizer = os.path.join(run_dir, "tokenizer.json")
    if not os.path.exists(tokenizer):
        raise ValueError(f"{run_dir} has no tokenizer.json: is it a `jaxllm train lm` output directory?")
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
        params = config.param_shapes()
        adapters = (run.get("data") or {}).get("lora")
        if adapters is not None:  # a LoRA run's checkpoint holds the adapters and their optimiser state only
            found["lora"] = lora.LoRAConfig.from_dict(adapters)
            params = jax.eval_shape(lambda p: lora.add_lora(p, found["lora"], jax.random.PRNGKey(0)), params)
            optimizer = lora_optimizer(optimizer, params)

        found["config"] = config
        shapes = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)), params)
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    with Checkpointer(ckpt_dir) as ckpt:
        state, meta = ckpt.restore_with(template, step)
    config = found["config"]
    if "lora" in found:
        state = state.replace(params=lora.merge(state.params, found["lora"]))
    run = meta.get("config") or {}
    context = (run.get("data") or {}).get("context") or config.context_limit
    return config, state.params, encoding, int(meta["step"]), int(context), run
