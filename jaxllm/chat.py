"""Chat with a model: ``jaxllm chat RUN`` reads one prompt a line and streams each answer.

``RUN`` is a run directory of ``jaxllm train lm`` or ``jaxllm finetune instruct`` (``train/lm.py``,
``train/instruct.py``) or a local Hugging Face directory (GPT-2, Llama) (``jaxllm.pretrained.load_base``).
A language model continues the line's text.
An instruction-tuned run (its saved run config names the instruction data it was tuned on) gets
the line as the instruction of the book's Alpaca prompt, and only the response is printed.

Every line is its own prompt (no history is kept). A prompt too long for the context is cut from
the left, announced by a ``note:`` line on stderr (``jaxllm.generate.fit_context``). An answer ends
at end-of-text or after ``--max-new-tokens``. ``/quit`` or end of input ends the session, an empty
line is skipped, Ctrl-C stops the answer being written.

Tokens are written as they are decoded (``jaxllm.generate.stream``: one prefill, then one jitted
step per token), so the first words show at once. Prompts are padded to length buckets: a new
prompt length reuses the compiled functions of its bucket. A byte-level BPE token can end inside a
multi-byte character: its bytes are held back until the character is complete.
"""

from __future__ import annotations

import codecs
import dataclasses
import sys
from typing import ClassVar

import jax

from jaxllm.data.instruct import format_prompt
from jaxllm.data.tokenizer import encode
from jaxllm.generate import fit_context, stream
from jaxllm.pretrained import Base, load_base
from jaxllm import cli, runio
from jaxllm.options import Compilation, Sampling, option
from jaxllm.options.values import non_negative_int, positive_int


def is_instruction_run(run: dict) -> bool:
    """The instruct job saves the path of its instruction data in the run config's data settings."""
    return "instructions" in (run.get("data") or {})


class Utf8Writer:
    """Token bytes -> a text stream, written and flushed as soon as they decode: the bytes of an
    incomplete UTF-8 character wait for the token that completes it."""

    def __init__(self, out):
        self.out, self.decoder = out, codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes, final: bool = False) -> None:
        text = self.decoder.decode(data, final=final)  # final: a character left incomplete becomes U+FFFD
        if text:
            self.out.write(text)
            self.out.flush()


class Chat:
    """A loaded model and how it answers a line."""

    def __init__(self, base: Base, *, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = 40, top_p: float | None = None, seed: int = 0):
        self.base, self.max_new_tokens = base, max_new_tokens
        self.instruct = is_instruction_run(base.run)
        # an instruction-tuned model answers best greedily (as the instruct job's test responses)
        temperature = (0.0 if self.instruct else 0.8) if temperature is None else temperature
        self.sampling = dict(temperature=temperature, top_k=min(top_k, base.config.vocab_size) if top_k else None,
                             top_p=top_p)
        self.key, self.turns = jax.random.PRNGKey(seed), 0

    def prompt(self, line: str) -> tuple[list[int], int, list[str]]:
        """The line's prompt ids, cut to the context: ``(ids, max_new_tokens, notes)``."""
        text = format_prompt({"instruction": line}) if self.instruct else line
        return fit_context(encode(self.base.encoding, text), self.max_new_tokens, self.base.config.context_limit)

    def tokens(self, ids: list[int], max_new_tokens: int):
        """The new tokens, one at a time, each line sampled with its own key."""
        key = jax.random.fold_in(self.key, self.turns)
        self.turns += 1
        return stream(self.base.config, self.base.params, ids, max_new_tokens=max_new_tokens, key=key,
                      eos_id=self.base.encoding.eot_token, **self.sampling)

    def reply(self, line: str, out, err=sys.stderr) -> list[int]:
        """Write the answer to ``line`` to ``out`` token by token, then a newline; returns its tokens
        (the end-of-text included when the model ended the answer)."""
        ids, max_new_tokens, notes = self.prompt(line)
        for note in notes:
            print(note, file=err, flush=True)
        writer, eot, tokens = Utf8Writer(out), self.base.encoding.eot_token, []
        for token in self.tokens(ids, max_new_tokens):
            tokens.append(token)
            if token != eot:
                writer.write(self.base.encoding.decode_single_token_bytes(token))
        writer.write(b"\n", final=True)
        return tokens

    def warm_up(self) -> None:
        """Compile before the first line: the decode step, and the prefill of the bucket a short line
        falls in (an instruction run's template makes every prompt long)."""
        ids = self.prompt("Hello")[0]
        key = jax.random.fold_in(self.key, 0)  # fold_in compiles too
        list(stream(self.base.config, self.base.params, ids, max_new_tokens=2, key=key, **self.sampling))


def repl(chat: Chat, stdin, out, err=sys.stderr) -> int:
    """Answer each line of ``stdin`` until end of input or ``/quit``; returns how many were answered."""
    tty, answered = stdin.isatty(), 0
    while True:
        if tty:
            out.write("> ")
            out.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session like end of input
            line = ""
        if not line or line.strip() == "/quit":
            if tty and not line:
                out.write("\n")
            return answered
        if not line.strip():
            continue
        try:
            chat.reply(line.rstrip("\r\n"), out, err)
        except KeyboardInterrupt:  # stops this answer, not the session
            out.write("\n")
        out.write("\n")  # a blank line between answers: a many-line answer still shows where it ends
        out.flush()
        answered += 1


@dataclasses.dataclass(frozen=True)
class ChatConfig:
    __doc__ = __doc__
    SECTION: ClassVar[str] = "generation"
    HELP: ClassVar[dict] = {"temperature": "0: greedy (default: 0 for an instruction-tuned run, else 0.8)"}
    run: str = option(None, "a run directory of `jaxllm train lm` or `jaxllm finetune instruct`, or a local Hugging "
                            "Face directory (GPT-2, Llama)", positional=True, required=True)
    step: int | None = option(None, "checkpoint step of a run directory (default: the latest intact one)",
                              type=non_negative_int)
    max_new_tokens: int | None = option(None, "tokens per answer at most (default: the room the context leaves after "
                                              "the prompt)", type=positive_int)
    sampling: Sampling = Sampling(temperature=None)
    seed: int = option(0, "seed of the sampling keys", type=non_negative_int)
    compilation: Compilation = Compilation()


def main(argv=None) -> int:
    cfg = cli.parse(ChatConfig, argv)
    cli.start(cfg)
    base = load_base(cfg.run, cfg.step)
    chat = Chat(base, max_new_tokens=cfg.max_new_tokens, temperature=cfg.sampling.temperature,
                top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p, seed=cfg.seed)
    chat.warm_up()
    if sys.stdin.isatty():
        kind = "instruction-tuned: each line is an instruction" if chat.instruct else "each line is continued"
        print(f"{base.source} ({kind}); /quit or Ctrl-D ends", file=sys.stderr)
        if runio.describe_data(cfg.run):
            print(runio.describe_data(cfg.run), file=sys.stderr)
    return repl(chat, sys.stdin, sys.stdout)


if __name__ == "__main__":
    cli.run(main, prog="jaxllm chat")
