"""jaxllm.export: ``jaxllm train lm`` runs as Hugging Face directories (GPT-2, Llama: same logits, same
token ids) or raw Flax safetensors; models without an HF architecture and unsafe targets refused."""

import json
import os
import stat

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from corpus import english
from flax.traverse_util import unflatten_dict  # noqa: E402
from jaxllm import export  # noqa: E402
from jaxllm.jobs import generate as generate_job, lm  # noqa: E402
from jaxllm.config import config_from_dict  # noqa: E402
from jaxllm.data.tokenizer import ENDOFTEXT, encode, load_hf_tokenizer  # noqa: E402
from jaxllm.generate import generate  # noqa: E402
from jaxllm.pretrained import load_run  # noqa: E402
from parity import OUTPUT, assert_close  # noqa: E402

# Unicode lines too, so the BPE learns merges of multi-byte characters
TEXT = english(20000) + "naïve café — 日本語のテキスト 🙂 Ωmega\n" * 30

SAMPLES = ["The model trains on text.\n\nIt   reads\tspaces   and\r\nnewlines\n", "naïve café — 日本語 🙂🙂 ß",
           f"one{ENDOFTEXT}two {ENDOFTEXT}", "trailing spaces   ", "   \n\n\n  x", "'s 'll don't 12345 ٣٤"]

# --model/--preset of the runs: GPT-2, the llama-layout decoder, and the book's decoder (no HF twin)
RUNS = {"gpt2": ("gpt2", "tiny"), "llama": ("decoder", "llama"), "burkov": ("decoder", "burkov")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """``run_dir(name)``: a 2-step ``jaxllm train lm`` run of ``RUNS[name]``, trained once per module."""
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    done = {}

    def get(name):
        if name not in done:
            model, preset = RUNS[name]
            lm.main(["--text", str(corpus), "--model", model, "--preset", preset, "--vocab-size", "300",
                     "--context", "16", "--batch-size", "4", "--d-model", "16", "--heads", "2", "--steps", "2",
                     "--warmup-steps", "1", "--sample-tokens", "2", "--eval-batch-size", "8", "--no-progress",
                     "--cpu-devices", "1", "--out", str(root / name)])
            done[name] = str(root / name)
        return done[name]

    return get


@pytest.fixture(scope="module")
def hf_dir(run_dir, tmp_path_factory):
    """``hf_dir(name)``: the run exported with fmt="hf", once per module."""
    root = tmp_path_factory.mktemp("hf")
    done = {}

    def get(name):
        if name not in done:
            done[name] = export.export_run(run_dir(name), root / name)
        return done[name]

    return get


def leftovers(parent):
    """Hidden temporary siblings an export may have left behind."""
    return [n for n in os.listdir(parent) if n.startswith(".")]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_tokenizer_gives_the_runs_ids(run_dir, hf_dir, name):
    _, _, encoding, _ = load_run(run_dir(name))
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir(name))
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert (tok.eos_token, tok.eos_token_id) == (ENDOFTEXT, encoding.eot_token)
    for text in SAMPLES:
        ids = encode(encoding, text)  # "<|endoftext|>" written in a text is ordinary text, as in the run
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text
    assert encoding.eot_token not in tok(SAMPLES[2])["input_ids"]
    assert tok.decode([encoding.eot_token]) == ENDOFTEXT


@pytest.mark.optimized  # parity, compiled as users run it; after the tokenizer test, so the runs train unoptimised
@pytest.mark.parametrize("name, hf_class", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_hf_export_gives_the_runs_logits(run_dir, hf_dir, name, hf_class):
    out = hf_dir(name)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert mode(out, "model.safetensors") == mode(out, "config.json")
    assert not leftovers(os.path.dirname(out))
    config, params, encoding, _ = load_run(run_dir(name))
    model, info = getattr(transformers, hf_class).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    model.eval()
    assert model.config.eos_token_id == encoding.eot_token
    ids = np.array([encode(encoding, SAMPLES[0])[:16], encode(encoding, SAMPLES[1])[:16]], np.int32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert_close(theirs, config.logits(params, ids), OUTPUT, err_msg=f"{name}: HF vs JAX logits")
    prompt = encode(encoding, "The model")  # and transformers' greedy generate gives the run's tokens
    ours = generate(config, params, [prompt], max_new_tokens=8, key=jax.random.PRNGKey(0))[0]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                pad_token_id=encoding.eot_token)[0, len(prompt):].tolist()
    assert greedy and greedy == ours[:len(greedy)]  # it stops early only at an end-of-text


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_an_exports_tokenizer_reads_back_as_the_runs(run_dir, hf_dir, name):
    _, _, encoding, _ = load_run(run_dir(name))
    back = load_hf_tokenizer(os.path.join(hf_dir(name), "tokenizer.json"))
    assert back._mergeable_ranks == encoding._mergeable_ranks and back._special_tokens == encoding._special_tokens
    assert back._pat_str == encoding._pat_str
    for text in SAMPLES:
        assert encode(back, text) == encode(encoding, text)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_on_an_export_gives_the_runs_tokens(run_dir, hf_dir, name):
    generate = generate_job.main
    flags = ["--prompt", "The model", "--max-new-tokens", "12", "--temperature", "0"]
    assert generate([hf_dir(name), *flags]) == generate([str(run_dir(name)), *flags])


def test_a_tokenizer_json_that_is_no_byte_level_bpe_is_refused(tmp_path):
    wordpiece = tmp_path / "wordpiece.json"
    wordpiece.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match=r"wordpiece.json is not a byte-level BPE .*its model is 'WordPiece'"):
        load_hf_tokenizer(wordpiece)
    unordered = tmp_path / "unordered.json"
    vocab = {chr(b): b for b in range(ord("a"), ord("a") + 3)} | {"ab": 3, "bc": 4}
    unordered.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": ["b c", "a b"]},
                                     "pre_tokenizer": {"type": "ByteLevel"}}))
    with pytest.raises(ValueError, match="merges are not in the order of their tokens' ids"):
        load_hf_tokenizer(unordered)


def test_hf_tokenizer_matches_gpt2s_bpe():
    """The conversion on GPT-2's own 50,257-id BPE (a --tokenizer gpt2 run's encoding)."""
    from jaxllm.data.tokenizer import gpt2_encoding

    encoding = gpt2_encoding()
    tok = export.hf_tokenizer(encoding)
    tok.encode_special_tokens = True  # what tokenizer_config.json's split_special_tokens sets
    for text in SAMPLES + [english(5000)]:
        assert tok.encode(text).ids == encode(encoding, text)


def test_a_model_without_an_hf_architecture_is_refused(run_dir, tmp_path):
    with pytest.raises(ValueError, match="TransformerConfig has no Hugging Face architecture.*per_head.*"
                                         "--format safetensors"):
        export.export_run(run_dir("burkov"), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def mode(directory, name) -> int:
    return stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)


@pytest.mark.parametrize("name", ["burkov", "gpt2"])
def test_safetensors_round_trips_the_params(run_dir, tmp_path, name):
    from safetensors.numpy import load_file

    config, params, _, _ = load_run(run_dir(name))
    out = export.export_run(run_dir(name), tmp_path / "out", fmt="safetensors")
    assert sorted(os.listdir(out)) == ["params.safetensors", "run_config.json"]
    assert mode(out, "params.safetensors") == mode(out, "run_config.json")  # safetensors alone writes 0600
    back = unflatten_dict(load_file(os.path.join(out, "params.safetensors")), sep="/")
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    with open(os.path.join(out, "run_config.json")) as f:
        run = json.load(f)
    assert config_from_dict(run["model"]) == config and {"optimizer", "data"} <= set(run)


def test_an_existing_out_dir_is_refused_unless_overwrite(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty.*overwrite=True"):
        export.export_run(run_dir("burkov"), out, fmt="safetensors")
    assert os.listdir(out) == ["keep.txt"]
    export.export_run(run_dir("burkov"), out, fmt="safetensors", overwrite=True)
    assert sorted(os.listdir(out)) == ["params.safetensors", "run_config.json"]
    assert mode(out, "params.safetensors") == mode(out, "run_config.json")  # safetensors alone writes 0600
    assert not leftovers(tmp_path)


def test_the_export_command(run_dir, tmp_path, capsys):
    """``jaxllm export RUN OUT --format F [--step N] [--overwrite]`` is ``export_run``; a bad flag is one line."""
    out = export.main([run_dir("burkov"), str(tmp_path / "out"), "--format", "safetensors", "--step", "2"])
    assert sorted(os.listdir(out)) == ["params.safetensors", "run_config.json"]
    assert mode(out, "params.safetensors") == mode(out, "run_config.json")  # safetensors alone writes 0600
    printed = capsys.readouterr().out.splitlines()  # what the run was trained on, from its run.json
    assert printed[-1].startswith(f"trained on {os.path.realpath(os.path.dirname(run_dir('burkov')))}{os.sep}corpus.txt (")
    export.main([run_dir("burkov"), str(tmp_path / "out"), "--format", "safetensors", "--overwrite"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        export.main([run_dir("burkov"), str(tmp_path / "other"), "--format", "onnx"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --format: invalid choice: 'onnx'")


def test_bad_arguments_are_refused(run_dir, tmp_path):
    run = run_dir("burkov")
    with pytest.raises(ValueError, match="fmt must be one of"):
        export.export_run(run, tmp_path / "a", fmt="onnx")
    with pytest.raises(ValueError, match="no run directory"):
        export.export_run(tmp_path / "missing", tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        export.export_run(tmp_path / "empty", tmp_path / "c")
    with pytest.raises(ValueError, match="is \\(or contains\\) the run directory"):  # overwrite would delete it
        export.export_run(run, os.path.dirname(run), overwrite=True)
    assert os.path.isdir(os.path.join(run, "checkpoints"))
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_a_failed_export_leaves_nothing(run_dir, tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_hf_tokenizer", fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_run(run_dir("gpt2"), tmp_path / "out")
    assert os.listdir(tmp_path) == []
