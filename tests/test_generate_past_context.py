"""Generation past the context (``generate_past_context``): while the prompt and the new tokens fit,
the tokens are ``generate``'s; past the context, each window is the last half of the previous one
plus greedy tokens recomputed here with full forwards (no cache), for every language-model family
with a context limit."""

import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiktoken

from jaxllm.generate import generate, generate_past_context, window_keep
from jaxllm.models import gpt2, transformer

VOCAB, CONTEXT = 40, 16
CONFIGS = {
    "gpt2": gpt2.GPT2Config(vocab_size=VOCAB, context_length=CONTEXT, emb_dim=16, n_heads=2, n_layers=1,
                            drop_rate=0.0),
    "decoder": transformer.tiny(VOCAB).replace(max_len=CONTEXT),
    "llama": transformer.llama(VOCAB, d_model=16, num_heads=2, num_kv_heads=1, mlp_hidden=24, max_len=CONTEXT),
}


def greedy_by_full_forwards(config, params, prompt: list[int], new_tokens: int) -> list[int]:
    """The windows' rule, by hand: each token is the argmax of a full forward over the current
    window; a full window restarts from its last ``CONTEXT // 2`` tokens."""
    forward = jax.jit(config.logits)
    window, new = list(prompt), []
    while len(new) < new_tokens:
        if len(window) == CONTEXT:
            window = window[-(CONTEXT // 2):]
        padded = np.zeros((1, CONTEXT), np.int32)  # one shape, one compile: causal, the pad comes after
        padded[0, :len(window)] = window
        logits = forward(params, jnp.asarray(padded))
        token = int(np.argmax(np.asarray(logits[0, len(window) - 1])))
        window.append(token)
        new.append(token)
    return new


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tokens_past_the_context_follow_the_sliding_window(name):
    config = CONFIGS[name]
    params = config.init(jax.random.PRNGKey(0))
    prompt, key = [3, 1, 4, 1, 5], jax.random.PRNGKey(1)
    new = generate_past_context(config, params, prompt, max_new_tokens=27, key=key)  # 11 + two windows of 8
    assert len(new) == 27
    room = CONTEXT - len(prompt)
    # the first context-many tokens are what generate gives when everything fits
    assert new[:room] == generate(config, params, [prompt], max_new_tokens=room, key=key)[0]
    assert new == greedy_by_full_forwards(config, params, prompt, 27)


def test_sampled_windows_draw_new_keys_and_eos_ends_the_generation():
    config = CONFIGS["decoder"]
    params = config.init(jax.random.PRNGKey(0))
    key, prompt = jax.random.PRNGKey(2), [7, 8]
    sampled = generate_past_context(config, params, prompt, max_new_tokens=38, key=key, temperature=1.0)
    assert sampled[:CONTEXT - 2] == generate(config, params, [prompt], max_new_tokens=CONTEXT - 2, key=key,
                                             temperature=1.0)[0]
    assert sampled == generate_past_context(config, params, prompt, max_new_tokens=38, key=key, temperature=1.0)
    windows = [sampled[i:i + 8] for i in range(CONTEXT - 2, 38, 8)]  # 14, then three windows of 8
    assert len({tuple(w) for w in windows}) > 1, "every window would repeat one draw"
    eos = sampled[20]  # a token the second window emits: the generation ends at its first occurrence
    stopped = generate_past_context(config, params, prompt, max_new_tokens=38, key=key, temperature=1.0,
                                    eos_id=eos)
    assert stopped == sampled[:sampled.index(eos) + 1]


def test_a_context_of_one_token_has_no_room_to_slide():
    assert window_keep(16) == 8 and window_keep(3) == 1
    with pytest.raises(ValueError, match="context of 1 token leaves no room .* at least 2"):
        window_keep(1)


def test_sample_text_announces_the_window_once(load_script, capsys):
    sample_text = load_script("lm").sample_text
    letters = string.ascii_letters[:VOCAB]  # a token a letter
    encoding = tiktoken.Encoding(name="letters", pat_str=r"[\s\S]+", special_tokens={},
                                 mergeable_ranks={c.encode(): i for i, c in enumerate(letters)})
    config = CONFIGS["gpt2"]
    params = config.init(jax.random.PRNGKey(0))
    prompt, new = sample_text(config, params, encoding, "abcd", max_new_tokens=40, key=jax.random.PRNGKey(0),
                              temperature=0.0)
    assert prompt == "abcd" and len(new) == 40
    assert capsys.readouterr().out.strip() == ("note: 40 new tokens go past the 16-token context: each time it is "
                                               "full, decoding goes on from its last 8 tokens (their cache "
                                               "recomputed)")
