"""Sample text from a ``jaxllm train lm`` run or a local Hugging Face GPT-2 directory (``--run``,
read by ``jaxllm.pretrained.load_base``): ``jaxllm generate --run runs/lm --prompt "ROMEO:"``.

Reads the model and optimiser settings from the checkpoint's own metadata (the run config that
``jaxllm train lm`` saved with every checkpoint), the run's ``tokenizer.json``, and restores the whole
train state of the chosen checkpoint (latest by default) into a template of the same shapes
(zeros shaped by ``jax.eval_shape``, so no initialiser runs); only its params are used. Decoding is
KV-cached (``jaxllm.generate.generate``). Prints prompt + continuation and returns that text.
"""

from __future__ import annotations

import jax

from jaxllm.jobs.lm import sample_text
from jaxllm.pretrained import load_base
from jaxllm import cli


def main(argv=None) -> str:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--run", default="runs/lm", help="a `jaxllm train lm` output directory or a local Hugging Face GPT-2 directory")
    p.add_argument("--step", type=cli.non_negative_int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--prompt", default="ROMEO:\n", help="the text to continue")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=200, help="tokens to add to the prompt")
    p.add_argument("--temperature", type=cli.non_negative_float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=cli.non_negative_int, default=40, help="0 for none")
    p.add_argument("--top-p", type=cli.positive_fraction, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=cli.non_negative_int, default=0, help="seed of the sampling keys")
    args = p.parse_args(argv)
    base = load_base(args.run, args.step)
    config, params, encoding = base.config, base.params, base.encoding
    prompt, continuation = sample_text(
        config, params, encoding, args.prompt, max_new_tokens=args.max_new_tokens,
        key=jax.random.PRNGKey(args.seed), temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p)
    text = prompt + continuation
    print(text)
    return text
