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
import pathlib

import jax

from jaxllm.pretrained import load_run
from jaxllm.training import cli


def _lm_module():
    spec = importlib.util.spec_from_file_location("train_lm", pathlib.Path(__file__).with_name("lm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> str:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="runs/lm", help="a train/lm.py output directory")
    p.add_argument("--step", type=cli.non_negative_int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=200)
    p.add_argument("--temperature", type=cli.non_negative_float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=cli.non_negative_int, default=40, help="0 for none")
    p.add_argument("--top-p", type=cli.positive_fraction, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=cli.non_negative_int, default=0)
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
