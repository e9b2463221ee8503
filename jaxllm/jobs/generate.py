"""Sample text from a jaxllm train lm run or a local Hugging Face directory (GPT-2, Llama):
jaxllm generate runs/lm --prompt "ROMEO:".

The model comes from the checkpoint's own settings and the run's tokenizer; the latest intact
checkpoint is used unless --step names another. Decoding uses the KV cache. Prints the prompt and
its continuation.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from jaxllm.jobs.lm import sample_text
from jaxllm.pretrained import load_base
from jaxllm import cli
from jaxllm.options import Compilation, Sampling, option
from jaxllm.options.values import non_negative_int, positive_int


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    __doc__ = __doc__
    SECTION: ClassVar[str] = "generation"
    run: str | None = option(None, "a jaxllm train lm output directory or a local Hugging Face directory (GPT-2, Llama) "
                                   "(default: runs/lm)", positional=True)
    run_flag: str | None = option(None, flag="run", hidden=True)  # the older spelling, --run RUN
    step: int | None = option(None, "checkpoint step (default: the latest)", type=non_negative_int)
    prompt: str = option("ROMEO:\n", "the text to continue")
    max_new_tokens: int = option(200, "tokens to add to the prompt", type=positive_int)
    sampling: Sampling = Sampling()
    seed: int = option(0, "seed of the sampling keys", type=non_negative_int)
    compilation: Compilation = Compilation()

    def __post_init__(self):
        if self.run and self.run_flag:
            raise ValueError("give the run directory once: as RUN or as --run")

    @property
    def run_dir(self) -> str:
        return self.run or self.run_flag or "runs/lm"


def main(argv=None) -> str:
    cfg = cli.parse(GenerateConfig, argv)
    cli.start(cfg)
    base = load_base(cfg.run_dir, cfg.step)
    config, params, encoding = base.config, base.params, base.encoding
    sampling = cfg.sampling
    prompt, continuation = sample_text(
        config, params, encoding, cfg.prompt, max_new_tokens=cfg.max_new_tokens,
        key=jax.random.PRNGKey(cfg.seed), temperature=sampling.temperature, top_k=sampling.top_k or None,
        top_p=sampling.top_p)
    text = prompt + continuation
    print(text)
    return text
