"""jaxllm.chat and generate.stream: tokens written before the next is computed, equal to
generate's, prompts of one bucket compiled once, the instruction template, the REPL end to end."""

import codecs
import io
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from corpus import english
from conftest import ROOT
from jaxllm import chat as chat_module
from jaxllm import generate as gen
from jaxllm.chat import Chat, Utf8Writer
from jaxllm.data.instruct import SHIPPED_PATH, format_prompt, load_instructions
from jaxllm.data.tokenizer import encode
from jaxllm.generate import generate, stream
from jaxllm.jobs import instruct as instruct_job
from jaxllm.jobs import lm as lm_job
from jaxllm.models import transformer
from jaxllm.pretrained import load_base

TINY = transformer.tiny(29)
CONTEXT = 128


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny GPT-2 run (2 steps, its own 300-token BPE, context 128) written by ``jaxllm train lm``,
    on English and the shipped instructions in their template (so a templated prompt fits the context)."""
    root = tmp_path_factory.mktemp("chat")
    corpus = root / "corpus.txt"
    records = load_instructions(SHIPPED_PATH)
    corpus.write_text(english() + "\n".join(format_prompt(r) + r["output"] for r in records) * 2)
    out = root / "lm"
    lm_job.main(["--text", str(corpus), "--model", "gpt2", "--preset", "tiny", "--steps", "2",
                        "--vocab-size", "300", "--context", str(CONTEXT), "--batch-size", "4", "--warmup-steps", "0",
                        "--d-model", "16", "--heads", "2", "--sample-tokens", "2", "--eval-batch-size", "8",
                        "--no-progress", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def instruct_run(lm_run, tmp_path_factory):
    """That base instruction-tuned for 1 step by train/instruct.py."""
    root = tmp_path_factory.mktemp("instruct")
    data = root / "data.json"
    data.write_text(json.dumps(load_instructions(SHIPPED_PATH)[:12]))
    out = root / "instruct"
    instruct_job.main(["--base", str(lm_run), "--data", str(data), "--out", str(out), "--steps", "1",
                              "--batch-size", "4", "--max-new-tokens", "2", "--eval-batch-size", "4", "--no-progress"])
    return out


class Events:
    """A text stream that logs what is written to it, next to the decode steps (see ``logged_steps``)."""

    def __init__(self):
        self.log = []

    def write(self, text):
        self.log.append(("emit", text))

    def flush(self):
        pass

    def text(self):
        return "".join(t for kind, t in self.log if kind == "emit")


def logged_steps(monkeypatch, events):
    """Log every call of the jitted decode step that ``stream`` makes."""
    step = gen._decode_step

    def logging_step(*args, **kwargs):
        events.log.append(("step", None))
        return step(*args, **kwargs)

    monkeypatch.setattr(gen, "_decode_step", logging_step)


def expected_chunks(encoding, tokens):
    """What a streaming writer must emit for each of ``tokens``: its text as soon as it decodes
    (nothing for end-of-text); then the closing newline, after a replacement character for the
    bytes of a character the last tokens left unfinished."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chunks = [decoder.decode(b"" if t == encoding.eot_token else encoding.decode_single_token_bytes(t))
              for t in tokens]
    return chunks, decoder.decode(b"\n", final=True)


# --------------------------------------------------------------------------- stream


def test_stream_yields_generates_tokens_greedy_and_sampled():
    params = TINY.init(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    sampled = dict(temperature=1.3, top_k=10, top_p=0.9)  # step i samples with fold_in(key, i) in both
    for prompt, kw in (([3, 9, 1, 12], {}), ([7] * 20, {}), ([3, 9, 1, 12], sampled)):  # greedy in two buckets
        want = generate(TINY, params, [prompt], max_new_tokens=9, key=key, **kw)[0]
        assert list(stream(TINY, params, prompt, max_new_tokens=9, key=key, **kw)) == want
    eos = generate(TINY, params, [[5]], max_new_tokens=9, key=key)[0][2]
    cut = list(stream(TINY, params, [5], max_new_tokens=9, key=key, eos_id=eos))
    assert cut == generate(TINY, params, [[5]], max_new_tokens=9, key=key, eos_id=eos)[0] and cut[-1] == eos
    with pytest.raises(ValueError, match="exceeds the cache length"):
        stream(TINY, params, [1] * 60, max_new_tokens=9, key=key)  # checked at the call, not at the first token


def test_utf8_writer_holds_back_a_split_character():
    out = Events()
    writer = Utf8Writer(out)
    piece = "日".encode()
    for data in (b"a", piece[:1], piece[1:], b"b", "é".encode()[:1]):
        writer.write(data)
    writer.write(b"\n", final=True)
    assert [t for _, t in out.log] == ["a", "日", "b", "\ufffd\n"]


# --------------------------------------------------------------------------- chat on a run


def test_each_token_is_written_before_the_next_step(lm_run, monkeypatch):
    chat = Chat(load_base(lm_run), max_new_tokens=8, temperature=0.0)
    out = Events()
    logged_steps(monkeypatch, out)
    tokens = chat.reply("The model", out)
    assert len(tokens) >= 3
    expected = []
    chunks, last = expected_chunks(chat.base.encoding, tokens)
    for i, chunk in enumerate(chunks):
        expected += [("step", None)] if i else []  # token i > 0 is computed by a step, token 0 by the prefill
        expected += [("emit", chunk)] if chunk else []
    expected += [("emit", last)]
    assert out.log == expected


def test_streamed_tokens_equal_generate(lm_run):
    base = load_base(lm_run)
    chat = Chat(base, max_new_tokens=12, temperature=0.0)
    out = io.StringIO()
    tokens = chat.reply("Generation people use", out)
    ids = encode(base.encoding, "Generation people use")
    eot = base.encoding.eot_token
    assert tokens == generate(base.config, base.params, [ids], max_new_tokens=12, key=jax.random.PRNGKey(0),
                              eos_id=eot)[0]
    assert out.getvalue() == base.encoding.decode([t for t in tokens if t != eot]) + "\n"


def test_prompts_of_one_bucket_compile_once(lm_run):
    """main's warm-up compiles the smallest bucket's prefill and the decode step; prompts of other
    lengths in that bucket then compile nothing."""
    chat = Chat(load_base(lm_run), max_new_tokens=5)
    by_length = {}  # three lines of three token lengths (whatever the BPE trained on the corpus merged)
    for k in range(1, 12):
        line = " ".join(["the run"] * k)
        by_length.setdefault(len(chat.prompt(line)[0]), line)
    lines = [line for n, line in sorted(by_length.items()) if n <= gen.SMALLEST_BUCKET][:3]
    lengths = [len(chat.prompt(line)[0]) for line in lines]
    assert len(set(lengths)) == 3 and max(lengths) <= gen.SMALLEST_BUCKET  # one bucket
    chat.warm_up()
    compiled = gen._prefill._cache_size(), gen._decode_step._cache_size()
    steps = []
    for line in lines:
        steps.append(len(chat.reply(line, io.StringIO())) - 1)
        assert (gen._prefill._cache_size(), gen._decode_step._cache_size()) == compiled
    assert sum(steps) >= 4  # the decode step did run


def test_a_prompt_too_long_is_cut_from_the_left_with_a_note(lm_run, monkeypatch):
    chat = Chat(load_base(lm_run), max_new_tokens=4)
    line = " ".join(f"word{i}" for i in range(80))
    ids = encode(chat.base.encoding, line)
    assert len(ids) > CONTEXT
    seen = []
    monkeypatch.setattr(chat_module, "stream", lambda config, params, prompt, **kw: seen.append(prompt) or iter([]))
    err = io.StringIO()
    chat.reply(line, io.StringIO(), err)
    assert seen == [ids[-CONTEXT // 2:]]
    assert err.getvalue() == f"note: the prompt was cut from {len(ids)} to its last {CONTEXT // 2} tokens because " \
                             f"the context is {CONTEXT}\n"


def test_an_instruction_tuned_run_gets_the_template_and_prints_only_the_answer(lm_run, instruct_run, monkeypatch):
    assert not Chat(load_base(lm_run)).instruct
    base = load_base(instruct_run)
    chat = Chat(base, max_new_tokens=6)
    assert chat.instruct and chat.sampling["temperature"] == 0.0  # greedy by default, as instruct.py answers
    seen = []
    monkeypatch.setattr(chat_module, "stream", lambda config, params, prompt, **kw: seen.append(prompt) or
                        stream(config, params, prompt, **kw))
    out = io.StringIO()
    tokens = chat.reply("Name a colour.", out)
    prompt = encode(base.encoding, format_prompt({"instruction": "Name a colour.", "input": ""}))
    assert seen == [prompt]
    new = generate(base.config, base.params, [prompt], max_new_tokens=6, key=jax.random.PRNGKey(0),
                   eos_id=base.encoding.eot_token)[0]
    assert tokens == new
    assert out.getvalue() == base.encoding.decode([t for t in new if t != base.encoding.eot_token]) + "\n"


def test_the_repl_end_to_end_on_piped_stdin(lm_run):
    """Two prompts, an empty line skipped, /quit ends (the line after it is never answered); no
    '> ' prompt when stdin is not a terminal; a blank line after each answer."""
    base = load_base(lm_run)
    lines = ["The model", "chat with a run"]
    proc = subprocess.run([sys.executable, "-m", "jaxllm.chat", str(lm_run), "--max-new-tokens", "6",
                           "--temperature", "0"], input=("\n".join([lines[0], "", lines[1], "/quit", "never"]) + "\n").encode(),
                          capture_output=True, timeout=300, cwd=ROOT)  # bytes: a sampled "\r" must stay one
    stdout, stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    assert proc.returncode == 0, stderr
    answers = []
    for line in lines:
        new = generate(base.config, base.params, [encode(base.encoding, line)], max_new_tokens=6,
                       key=jax.random.PRNGKey(0), eos_id=base.encoding.eot_token)[0]
        answers.append(base.encoding.decode([t for t in new if t != base.encoding.eot_token]) + "\n\n")
    # the answers alone, a blank line after each: no "> " prompt, no note
    assert stdout == "".join(answers) and stderr == ""


def test_the_repl_reads_until_end_of_input(lm_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\n\n  \nsecond"))
    assert chat_module.main([str(lm_run), "--max-new-tokens", "3", "--top-k", "0", "--seed", "4"]) == 2
    assert capsys.readouterr().out.endswith("\n")


def test_bad_flags_are_refused(lm_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        chat_module.main([str(lm_run), "--top-p", "0"])
    assert exit_.value.code == 2 and "--top-p" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no base model directory"):
        chat_module.main([str(lm_run / "missing")])


# --------------------------------------------------------------------------- compiled step (last: optimised mode)


@pytest.mark.optimized
def test_the_stream_step_writes_the_cache_in_place_as_generates_loop_does():
    """The jitted step ``stream`` calls takes the cache donated: at batch 1 (every stream) and 2
    it neither copies nor transposes a whole cache buffer, as generate's loop body (not donated it
    copies)."""
    from test_generate_cache import _decode_step, _whole_buffer_writes

    params = TINY.init(jax.random.PRNGKey(0))
    kw = dict(temperature=0.0, top_k=None, top_p=None)

    def step_writes(step, batch):
        cache = TINY.init_cache(batch)
        hlo = step.lower(TINY, params, jax.numpy.zeros((batch,), jax.numpy.int32), cache, jax.random.PRNGKey(0),
                         np.int32(1), **kw).compile().as_text()
        return _whole_buffer_writes(hlo.splitlines(), cache.keys[0].size)

    def loop_writes(batch):
        cache = TINY.init_cache(batch)
        hlo = gen._generate.lower(TINY, params, jax.numpy.zeros((batch, 5), jax.numpy.int32),
                                  jax.numpy.full((batch,), 5, jax.numpy.int32), cache, jax.random.PRNGKey(0),
                                  max_new_tokens=4, eos_id=None, **kw).compile().as_text()
        return _whole_buffer_writes(_decode_step(hlo), cache.keys[0].size)

    assert step_writes(gen._decode_step, 2) == loop_writes(2) == {}
    assert step_writes(jax.jit(gen.decode_step, static_argnames=("model", *gen._SAMPLING)), 2) != {}  # not donated
    assert step_writes(gen._decode_step, 1) == loop_writes(1) == {}
