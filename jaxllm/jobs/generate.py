"""Sample text from a jaxllm train lm run or a local Hugging Face GPT-2 directory:
jaxllm generate runs/lm --prompt "ROMEO:".

The model comes from the checkpoint's own settings and the run's tokenizer; the latest intact
checkpoint is used unless --step names another. Decoding uses the KV cache. Prints the prompt and
its continuation.
"""

from __future__ import annotations

import argparse

import jax

from jaxllm.jobs.lm import sample_text
from jaxllm.pretrained import load_base
from jaxllm import cli


def main(argv=None) -> str:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("run", nargs="?", default=None,
                   help="a jaxllm train lm output directory or a local Hugging Face GPT-2 directory (default: runs/lm)")
    p.add_argument("--run", dest="run_flag", default=None, help=argparse.SUPPRESS)  # the older spelling
    p.add_argument("--step", type=cli.non_negative_int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--prompt", default="ROMEO:\n", help="the text to continue")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=200, help="tokens to add to the prompt")
    cli.add_sampling_flags(p)
    p.add_argument("--seed", type=cli.non_negative_int, default=0, help="seed of the sampling keys")
    args = p.parse_args(argv)
    if args.run and args.run_flag:
        p.error("give the run directory once: as RUN or as --run")
    base = load_base(args.run or args.run_flag or "runs/lm", args.step)
    config, params, encoding = base.config, base.params, base.encoding
    prompt, continuation = sample_text(
        config, params, encoding, args.prompt, max_new_tokens=args.max_new_tokens,
        key=jax.random.PRNGKey(args.seed), temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p)
    text = prompt + continuation
    print(text)
    return text
