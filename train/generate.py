"""Sample text from a train/lm.py run: ``python train/generate.py --run runs/lm --prompt "ROMEO:"``.

Reads the model and optimiser settings from the checkpoint's own metadata (the run config that
train/lm.py saved with every checkpoint), the run's ``tokenizer.json``, and restores the whole
train state of the chosen checkpoint (latest by default) into a template of the same shapes
(zeros shaped by ``jax.eval_shape``, so no initialiser runs); only its params are used. Decoding is
KV-cached (``jaxllm.generate.generate``). Prints prompt + continuation and returns that text.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import jaxllm.models  # noqa: F401  (registers the model configs)
from jaxllm.config import config_from_dict
from jaxllm.data.tokenizer import load_encoding
from jaxllm.training import TrainState, cli, make_optimizer
from jaxllm.training.checkpoint import Checkpointer, CheckpointError
from jaxllm.training.optim import OptimizerConfig


def _lm_module():
    spec = importlib.util.spec_from_file_location("train_lm", pathlib.Path(__file__).with_name("lm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_run(run_dir: str, step: int | None = None):
    """``(model config, params, encoding, step)`` of a train/lm.py output directory."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"no run directory {run_dir}")
    tokenizer = os.path.join(run_dir, "tokenizer.json")
    if not os.path.exists(tokenizer):
        raise ValueError(f"{run_dir} has no tokenizer.json: is it a train/lm.py output directory?")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
        raise ValueError(f"{run_dir} holds no checkpoint (expected {ckpt_dir}/<step>)")
    with Checkpointer(ckpt_dir) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step not in ckpt.all_steps():
            raise ValueError(f"no checkpoint for step {step} in {ckpt_dir}; there are {ckpt.all_steps()}")
        try:
            meta = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as exc:
            raise CheckpointError(f"checkpoint step {step} in {ckpt_dir} is unreadable: {exc}") from exc
        run = meta.get("config") or {}
        if "model" not in run or "optimizer" not in run:
            raise ValueError(f"checkpoint step {step} in {ckpt_dir} carries no run config (model and optimizer)")
        config = config_from_dict(run["model"])
        optimizer = make_optimizer(OptimizerConfig(**run["optimizer"]))

        def template():
            params = config.build().init(jax.random.PRNGKey(0), config.example_input())["params"]
            return TrainState.create(params, optimizer, jax.random.PRNGKey(0))

        shapes = jax.eval_shape(template)  # zeros of the right shapes: no initialiser runs
        state, _ = ckpt.restore(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), step)
    return config, state.params, load_encoding(tokenizer), step


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="runs/lm", help="a train/lm.py output directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40, help="0 for none")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config, params, encoding, step = load_run(args.run, args.step)
    prompt, continuation = _lm_module().sample_text(
        config, params, encoding, args.prompt, max_new_tokens=args.max_new_tokens,
        key=jax.random.PRNGKey(args.seed), temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p)
    text = prompt + continuation
    print(text)
    return text


if __name__ == "__main__":
    cli.run(main)
