"""Bad model and generation inputs are refused with a ValueError naming the problem and the limit:
token ids outside the vocabulary, a full KV cache, a prompt past the context, bad
sampling arguments, a tokenizer bigger than the embedding, unsafe or truncated weight files."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiktoken

from jaxllm.generate import generate, sample_logits
from jaxllm.models import classifier, gpt2, rnn, transformer

VOCAB = 40
DECODER = transformer.tiny(VOCAB)
GPT2 = gpt2.GPT2Config(vocab_size=VOCAB, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
RNN = rnn.tiny(VOCAB)
CONFIGS = {"transformer": DECODER, "gpt2": GPT2, "rnn": RNN,
           "transformer_classifier": classifier.classifier_config(DECODER, 2),
           "gpt2_classifier": classifier.classifier_config(GPT2, 2)}


@functools.lru_cache(maxsize=None)
def params_of(config):
    return config.init(jax.random.PRNGKey(0))


def byte_encoding() -> tiktoken.Encoding:
    """256 ids, one per byte: every character of an ASCII prompt is one token."""
    return tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_concrete_token_ids_outside_the_vocabulary_are_refused(name):
    config = CONFIGS[name]
    params = params_of(config)
    apply = config.logits
    good = np.array([[0, 5, VOCAB - 1]], np.int32)
    assert np.all(np.isfinite(np.asarray(apply(params, good))))
    limit = rf"tokens must lie in \[0, {VOCAB - 1}\] \(vocabulary of {VOCAB}\)"
    for bad, seen in [(np.array([[1, VOCAB]], np.int32), f"from 1 to {VOCAB}"),
                      (jnp.array([[-1, 3]], jnp.int32), "from -1 to 3"),
                      (np.array([[1, 2**32 + 1]], np.int64), f"from 1 to {2**32 + 1}")]:  # not wrapped to 1
        with pytest.raises(ValueError, match=rf"{limit}, got values {seen}"):
            apply(params, bad)
    # Traced ids are the caller's promise: jit and eval_shape run (and init with the example input).
    out = jax.jit(apply)(params, jnp.array([[1, VOCAB]], jnp.int32))
    assert out.shape[:2] == (1, 2)
    assert jax.eval_shape(apply, params, jnp.zeros((2, 3), jnp.int32)).shape[:2] == (2, 3)


@pytest.mark.parametrize("config", [DECODER, GPT2], ids=["transformer", "gpt2"])
def test_a_full_kv_cache_refuses_another_token(config):
    model, params = config.build(), params_of(config)
    cache = config.init_cache(2, 6)
    _, cache = model.apply({"params": params}, jnp.ones((2, 4), jnp.int32), cache=cache)
    _, cache = model.apply({"params": params}, jnp.ones((2, 2), jnp.int32), cache=cache)  # exactly full
    np.testing.assert_array_equal(np.asarray(cache.lengths), [6, 6])
    with pytest.raises(ValueError, match=r"KV cache overflow: a row holds 6 of 6 positions .* and 1 more"):
        model.apply({"params": params}, jnp.ones((2, 1), jnp.int32), cache=cache)
    ragged = config.init_cache(2, 6).replace(lengths=jnp.array([1, 5], jnp.int32))
    with pytest.raises(ValueError, match="a row holds 5 of 6 positions"):
        model.apply({"params": params}, jnp.ones((2, 2), jnp.int32), cache=ragged)
    # Under jit the lengths are traced: the caller's promise (generate checks up front).
    jax.jit(lambda c: model.apply({"params": params}, jnp.ones((2, 1), jnp.int32), cache=c))(cache)


def test_gpt2_cache_past_the_learned_positions_is_refused():
    model, params = GPT2.build(), params_of(GPT2)
    cache = transformer.KVCache.zeros(GPT2.n_layers, 1, 32, GPT2.n_heads, GPT2.head_dim)  # longer than 16
    cache = cache.replace(lengths=jnp.array([15], jnp.int32))
    model.apply({"params": params}, jnp.ones((1, 1), jnp.int32), cache=cache)  # position 15: the last one
    with pytest.raises(ValueError, match="past the model's 16 positions"):
        model.apply({"params": params}, jnp.ones((1, 2), jnp.int32), cache=cache)


def test_generate_on_gpt2_without_max_len_and_prompts_past_the_context(load_script, capsys):
    params, key = params_of(GPT2), jax.random.PRNGKey(0)
    new = generate(GPT2, params, [[1, 2, 3]], max_new_tokens=5, key=key)  # cache = context_length 16
    assert new == generate(GPT2, params, [[1, 2, 3]], max_new_tokens=5, key=key, max_len=16)
    assert len(new[0]) == 5
    generate(GPT2, params, [[1] * 10], max_new_tokens=6, key=key)  # exactly the context
    with pytest.raises(ValueError, match=r"10 tokens \+ max_new_tokens 7 = 17 exceeds .* 16 \(the model's context"):
        generate(GPT2, params, [[1] * 10], max_new_tokens=7, key=key)
    with pytest.raises(ValueError, match=r"17 tokens \+ max_new_tokens 1 = 18"):
        generate(GPT2, params, [[1] * 17], max_new_tokens=1, key=key)
    with pytest.raises(ValueError, match="max_len 17 exceeds the model's context_length of 16"):
        generate(GPT2, params, [[1]], max_new_tokens=1, key=key, max_len=17)

    # The CLI's sample_text cuts a prompt that fills the context, and says so, for every model with a context limit.
    sample_text = load_script("lm").sample_text
    for config in (GPT2.replace(vocab_size=256), DECODER.replace(vocab_size=256, max_len=16)):
        kw = dict(key=key, temperature=0.0)
        prompt, new = sample_text(config, params_of(config), byte_encoding(), "a" * 20, max_new_tokens=10, **kw)
        out = capsys.readouterr().out
        assert prompt == "a" * 8
        assert "note: the prompt was cut from 20 to its last 8 tokens because the context is 16" in out
        assert "note: 10 new tokens go past the 16-token context" in out  # and go on with a sliding window
        assert len(new) == 10
        sample_text(config, params_of(config), byte_encoding(), "a" * 4, max_new_tokens=12, **kw)
        assert "note:" not in capsys.readouterr().out  # fits: nothing cut, nothing said


def test_sample_logits_refuses_negative_temperature_and_bad_top_k():
    logits, key = jnp.array([[0.0, 1.0, 2.0]]), jax.random.PRNGKey(0)
    for temperature in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=r"temperature must be >= 0"):
            sample_logits(logits, key, temperature=temperature)
    for top_k in (0, -2, 4, 1.5):
        with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 3\] \(the vocabulary size\)"):
            sample_logits(logits, key, temperature=1.0, top_k=top_k)
    jitted = jax.jit(sample_logits, static_argnames=("temperature", "top_k", "top_p"))
    assert jitted(logits, key, temperature=1.0, top_k=1).tolist() == [2]
    with pytest.raises(ValueError, match="temperature"):
        jitted(logits, key, temperature=-1.0)


def write_run(run_dir, config, encoding, steps=(0,)):
    """A train/lm.py-style run directory by hand: tokenizer.json + checkpoints/<step> with the run config."""
    from jaxllm.data.tokenizer import save_encoding
    from jaxllm.training import TrainState, make_optimizer
    from jaxllm.training.checkpoint import Checkpointer, run_config
    from jaxllm.training.optim import OptimizerConfig

    opt = OptimizerConfig(name="sgd", lr=0.1)
    state = TrainState.create(params_of(config), make_optimizer(opt), jax.random.PRNGKey(0))
    with Checkpointer(run_dir / "checkpoints", config=run_config(config, opt)) as ckpt:
        for step in steps:
            ckpt.save(state.replace(step=jax.numpy.int32(step)))
    save_encoding(encoding, run_dir / "tokenizer.json")


def test_a_base_with_a_damaged_newest_checkpoint_loads_the_newest_intact_one(tmp_path, capsys):
    from jaxllm.pretrained import load_base

    config = GPT2.replace(vocab_size=256)
    write_run(tmp_path, config, byte_encoding(), steps=(1, 2))
    metadata = tmp_path / "checkpoints" / "2" / "state" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes().replace(b"params", b"paRams", 1))
    base = load_base(str(tmp_path))
    assert base.source == f"run:{tmp_path}@1"
    assert "checkpoint step 2" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "2").exists()  # loading a base never moves a run's files


def test_a_run_whose_tokenizer_outgrows_the_embedding_is_refused(tmp_path):
    from jaxllm.pretrained import load_base, load_run

    fits = GPT2.replace(vocab_size=256)
    write_run(tmp_path / "fits", fits, byte_encoding())
    config, _, encoding, step = load_run(str(tmp_path / "fits"))
    assert config == fits and encoding.n_vocab == 256 and step == 0

    run = tmp_path / "outgrown"
    write_run(run, GPT2, byte_encoding())  # 256 token ids, 40 embedding rows
    for load in (load_run, load_base):
        with pytest.raises(ValueError, match=rf"tokenizer {run / 'tokenizer.json'} has 256 token ids but the model "
                                             rf"in checkpoint step 0 in {run / 'checkpoints'} embeds only 40"):
            load(str(run))


class _MakesAFile:
    """Unpickling this calls ``open(path, "w")``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unsafe_or_truncated_weight_files_are_refused_by_name(tmp_path):
    import torch
    from safetensors.numpy import save_file

    from jaxllm.interop import load_hf_state_dict
    from jaxllm.nn.lora import add_lora, load_lora, raschka, save_lora

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"wte.weight": torch.zeros(2, 2), "payload": _MakesAFile(str(marker))}, evil / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"{evil / 'pytorch_model.bin'} is not a weights-only PyTorch checkpoint"):
        load_hf_state_dict(evil)
    assert not marker.exists()  # nothing in it ran

    good = {"wte.weight": np.arange(64, dtype=np.float32).reshape(8, 8)}
    save_file(good, str(tmp_path / "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in good.items()}, tmp_path / "pytorch_model.bin")
    for name, kind in [("model.safetensors", "safetensors file"), ("pytorch_model.bin", "PyTorch checkpoint")]:
        path = tmp_path / name
        np.testing.assert_array_equal(load_hf_state_dict(path)["wte.weight"], good["wte.weight"])
        data = path.read_bytes()
        for size in (len(data) // 2, 4, 0):
            path.write_bytes(data[:size])
            with pytest.raises(ValueError, match=rf"{path} is not a valid {kind}"):
                load_hf_state_dict(path)

    base = params_of(GPT2)
    lora_path = tmp_path / "adapter.safetensors"
    save_lora(lora_path, add_lora(base, raschka(rank=2), jax.random.PRNGKey(1)), raschka(rank=2))
    load_lora(lora_path, base)
    data = lora_path.read_bytes()
    for size in (len(data) - 10, 8, 0):
        lora_path.write_bytes(data[:size])
        with pytest.raises(ValueError, match=rf"{lora_path} is not a valid LoRA \(safetensors\) file"):
            load_lora(lora_path, base)
    assert os.listdir(tmp_path)  # (the files are still there to look at)
