"""Cells of notebooks/04_transformer_kv_cache.ipynb (build with: python notebooks/build.py 04_transformer_kv_cache --execute)."""

# %% [markdown]
# # 04 · Transformers: the Burkov decoder and GPT-2, RoPE, and decoding with a KV cache
#
# Two decoder-only language models, each with its PyTorch twin written as its book writes it:
#
# * Burkov's decoder (ch. 4): pre-RMSNorm, **RoPE** on each head's queries and keys, ReLU MLP, no
#   final norm, untied output — `jaxllm.models.transformer` vs `jaxllm.torch_ref.transformer`;
# * Raschka's GPT-2 (ch. 4): pre-LayerNorm, **learned positions**, tanh GELU, dropout —
#   `jaxllm.models.gpt2` vs `jaxllm.torch_ref.gpt2.GPTModel`.
#
# We check RoPE against the book's code, train both pairs of twins from the same weights on the same
# batches, and then generate text four ways: the books' way (recompute the whole prefix for every
# token, eagerly), the same in JAX (which teaches what `jit` needs), with a **KV cache** inside one
# jitted loop (`jaxllm.generate.generate`), and with a hand-written `lax.scan` decode loop.

# %% parameters
# Sizes. The test suite runs this notebook with the values after "# test:".
VOCAB = 512  # test: 300
CONTEXT = 64  # test: 16
D_MODEL = 64  # test: 16
NUM_HEADS = 4  # test: 2
NUM_LAYERS = 2  # test: 1
BATCH = 16  # test: 4
STEPS = 150  # test: 3
LR = 1e-3
NEW_TOKENS = 64  # test: 6
RECOMPILE_DEMO = 6  # test: 2
MAX_LEN = 128  # the KV cache's length and GPT-2's context: prompt + NEW_TOKENS must fit
SEED = 0
TORCH_THREADS = 1  # tiny models gain nothing from more, and on a busy CPU idle OpenMP threads spin

# %%
import time
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bar; the text bar is fine
from jaxllm import interop
from jaxllm.data.batches import ArrayBatches
from jaxllm.data.tokenizer import encode
from jaxllm.data.windows import lm_windows
from jaxllm.generate import generate
from jaxllm.models import gpt2, transformer as tr
from jaxllm.nn.rope import interleaved_to_half, rope_angles, rope_interleaved, rope_rotate_half
from notebook_utils import overlay_losses, play_tokens, time_calls, timing_table
from jaxllm.torch_ref import gpt2 as t_gpt2, transformer as t_tr
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step
from jaxllm.training.losses import lm_cross_entropy

torch.set_num_threads(TORCH_THREADS)

# %% [markdown]
# ## 1. RoPE, checked against the book's code
#
# Rotary position embeddings rotate each pair of a head's lanes by an angle proportional to the
# position: pair `i` at position `p` turns by `p · 10000^(-2i/d)`. Burkov pairs the lanes
# interleaved, `(x[0::2], x[1::2])`; Llama and Hugging Face pair the two halves. Because a rotation
# preserves dot products up to the *difference* of the angles, the attention score of a query at
# position `m` and a key at position `n` depends only on `m − n` — and the KV cache can store keys
# already rotated, with new tokens rotated at their own offset position.

# %%
rng = np.random.default_rng(SEED)
head_dim, T = 8, 6
x = rng.standard_normal((1, T, head_dim)).astype(np.float32)
book = t_tr.rope(torch.from_numpy(x)).numpy()                          # the book's rope(x), positions 0..T-1
cos, sin = rope_angles(jnp.arange(T)[None, :], head_dim)
ours = rope_interleaved(x[:, :, None, :], cos, sin)[:, :, 0, :]         # [batch, time, heads, head_dim] layout
print("max |gap| to the book's rope:", float(np.max(np.abs(np.asarray(ours) - book))))
np.testing.assert_allclose(ours, book, atol=1e-6)


@jax.jit
def rotate(vector, position):
    cos, sin = rope_angles(jnp.array([[position]]), head_dim)
    return rope_interleaved(vector[None, None, None, :], cos, sin)[0, 0, 0]


q, k = rng.standard_normal((2, head_dim)).astype(np.float32)
scores = [float(rotate(q, m) @ rotate(k, m - 3)) for m in (3, 10, 100)]
print("score of a query and a key 3 positions apart, at positions (3, 0), (10, 7), (100, 97):", np.round(scores, 5))
np.testing.assert_allclose(scores, scores[0], rtol=1e-4)

cos2, sin2 = rope_angles(jnp.arange(4, T)[None, :], head_dim)          # the last two tokens, at offset 4
tail = rope_interleaved(x[:, 4:, None, :], cos2, sin2)[:, :, 0, :]
print("rotating tokens 4..5 on their own, at offset 4, equals rows 4..5 of the full pass:",
      bool(np.allclose(tail, ours[:, 4:], atol=1e-6)))

perm = interleaved_to_half(head_dim)                                  # the two layouts are one permutation apart
half = rope_rotate_half(x[:, :, None, perm], cos, sin)[:, :, 0, :]
print("interleaved RoPE == rotate-half RoPE on permuted lanes:", bool(np.allclose(half, np.asarray(ours)[..., perm], atol=1e-6)))

# %% [markdown]
# ## 2. Data and the two pairs of twins
#
# *Hamlet* with a byte-level BPE of `VOCAB` ids (as in notebook 03); windows of `CONTEXT` tokens,
# shuffled once and fed to every run in the same order. The twins are built under
# `torch.manual_seed` with their books' initialisations and converted by `interop.from_torch`
# (GPT-2's state dict also holds the causal masks, which are buffers, not parameters:
# `drop_masks` removes them).

# %%
encoding, ids = play_tokens("hamlet", VOCAB)
split = int(0.9 * len(ids))
windows = lm_windows(ids[:split], CONTEXT, CONTEXT)
batcher = ArrayBatches(windows, BATCH, seed=SEED)
batches = [batcher.next() for _ in range(STEPS)]
val = {k: np.array(v[:32]) for k, v in lm_windows(ids[split:], CONTEXT, CONTEXT).items()}
V = encoding.n_vocab

dec_config = tr.TransformerConfig(vocab_size=V, d_model=D_MODEL, num_heads=NUM_HEADS, num_layers=NUM_LAYERS,
                                  max_len=MAX_LEN)
torch.manual_seed(SEED)
dec_twin = t_tr.from_config(dec_config)                                # DecoderLanguageModel + initialize_weights
dec_params = interop.from_torch(dec_config, dec_twin.state_dict())

gpt_config = gpt2.GPT2Config(vocab_size=V, context_length=MAX_LEN, emb_dim=D_MODEL, n_heads=NUM_HEADS,
                             n_layers=NUM_LAYERS, drop_rate=0.0)          # no dropout: see section 4
torch.manual_seed(SEED)
gpt_twin = t_gpt2.GPTModel(gpt_config.to_twin_dict())
gpt_params = interop.from_torch(gpt_config, t_gpt2.drop_masks(gpt_twin.state_dict()))

count = lambda tree: sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree))
tokens = batches[0]["inputs"][:4]
for name, config, params, twin in [("Burkov decoder", dec_config, dec_params, dec_twin),
                                   ("GPT-2", gpt_config, gpt_params, gpt_twin)]:
    logits = jax.jit(config.build().apply)({"params": params}, tokens)[0]
    twin.eval()
    with torch.no_grad():
        t_logits = twin(torch.from_numpy(tokens).long()).numpy()
    print(f"{name:15s} {count(params):,} parameters; max |logits gap| {float(np.max(np.abs(logits - t_logits))):.1e}")
    np.testing.assert_allclose(logits, t_logits, atol=1e-5)

# %% [markdown]
# ## 3. Training the twins from the same start, on the same batches
#
# AdamW at `LR` for both models (the decoder with PyTorch's default weight decay 0.01 as in
# Burkov's book, GPT-2 with Raschka's 0.1), next-token cross-entropy over every position.

# %%
def train_torch(twin, lr, weight_decay):
    optimizer = torch.optim.AdamW(twin.parameters(), lr=lr, weight_decay=weight_decay)
    twin.train()
    losses, times = [], []
    for batch in batches:
        start = time.perf_counter()
        logits = twin(torch.from_numpy(batch["inputs"]).long())
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch["targets"]).long().flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    return losses, times


def train_jax(config, params, lr, weight_decay):
    model = config.build()
    loss_fn = lm_cross_entropy(lambda p, tokens: model.apply({"params": p}, tokens)[0])
    optimizer = make_optimizer(OptimizerConfig("adamw", lr=lr, weight_decay=weight_decay))
    train_step = make_train_step(loss_fn, optimizer)
    state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer, jax.random.PRNGKey(SEED))
    losses, times = [], []
    for batch in batches:
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - start)
    return state.params, losses, times, float(jax.jit(loss_fn)(state.params, val, None)[0])


runs = {}
for name, config, params, twin, wd in [("Burkov decoder", dec_config, dec_params, dec_twin, 0.01),
                                       ("GPT-2", gpt_config, gpt_params, gpt_twin, 0.1)]:
    torch_losses, torch_times = train_torch(twin, LR, wd)
    trained, jax_losses, jax_times, val_loss = train_jax(config, params, LR, wd)
    np.testing.assert_allclose(jax_losses[:10], torch_losses[:10], rtol=1e-4)  # the parity tests' bar
    runs[name] = dict(params=trained, torch=(torch_losses, torch_times), jax=(jax_losses, jax_times), val=val_loss)
    print(f"{name:15s} final train loss: PyTorch {torch_losses[-1]:.4f}, JAX {jax_losses[-1]:.4f}; "
          f"validation loss (JAX) {val_loss:.4f}; max |gap| {np.max(np.abs(np.subtract(jax_losses, torch_losses))):.1e}")

# %%
for name, run in runs.items():
    overlay_losses({"PyTorch twin (eager)": run["torch"][0], "Flax (jit)": run["jax"][0]},
                   title=f"{name} on Hamlet, AdamW")
    plt.show()
display(timing_table({f"{name}: {style}": run[key][1] for name, run in runs.items()
                      for style, key in [("PyTorch (eager)", "torch"), ("JAX (jit)", "jax")]}))

# %% [markdown]
# ## 4. Randomness: dropout keys vs a global generator
#
# The parity runs above use no dropout, because the two frameworks can never draw the same masks.
# In Flax, dropout draws from a key you pass (`rngs={"dropout": key}`), so the same key gives the
# same masks, anywhere, any time; `make_train_step` derives each step's key as
# `fold_in(state.key, step)`. PyTorch draws from one global generator, so the masks depend on
# everything that consumed random numbers before.

# %%
dropout_model = gpt_config.replace(drop_rate=0.1).build()
with_dropout = jax.jit(lambda key: dropout_model.apply({"params": runs["GPT-2"]["params"]}, tokens,
                                                       deterministic=False, rngs={"dropout": key})[0])
a, b, c = with_dropout(jax.random.PRNGKey(1)), with_dropout(jax.random.PRNGKey(1)), with_dropout(jax.random.PRNGKey(2))
print("JAX:   same key -> same output:", bool(jnp.array_equal(a, b)), "| another key -> another:", not bool(jnp.array_equal(a, c)))

torch_dropout = t_gpt2.GPTModel({**gpt_config.to_twin_dict(), "drop_rate": 0.1}).train()
t_gpt2.load_without_masks(torch_dropout, interop.to_torch(gpt_config, runs["GPT-2"]["params"]))
torch.manual_seed(1)
ta = torch_dropout(torch.from_numpy(tokens).long())
tb = torch_dropout(torch.from_numpy(tokens).long())                   # the generator has moved on
torch.manual_seed(1)
tc = torch_dropout(torch.from_numpy(tokens).long())
print("torch: same seed, second call -> differs:", not torch.equal(ta, tb), "| reseeded -> same:", torch.equal(ta, tc))

# %% [markdown]
# ## 5. Generation with and without the KV cache
#
# Greedy decoding (argmax) from the trained JAX weights, copied into the twins so every method
# starts from the same function (small models trained for minutes: the text soon repeats itself;
# what matters here is that every method produces the same tokens, at very different costs):
#
# * **PyTorch, no cache** — the book's `generate_text_simple`: every new token reruns the model on
#   the whole prefix, eagerly.
# * **JAX, no cache, growing input** — the same loop around a jitted forward. Every call has a new
#   input length, so *every call traces and compiles again*: correct, and slow.
# * **JAX, no cache, fixed buffer** — pad the sequence to `MAX_LEN` and read the logits at the last
#   real position (causal attention makes the padding invisible): one compilation, but each token
#   still costs a full forward over `MAX_LEN` positions.
# * **JAX, KV cache** — `jaxllm.generate.generate`: one prefill writes the prompt's keys and values
#   into a preallocated cache (per layer, keys `[batch, heads, MAX_LEN, head_dim]` and values
#   `[batch, heads, head_dim, MAX_LEN]`, each as its attention matmul reads it); each new token costs one
#   forward over one position; the loop is a `lax.while_loop` inside one jitted function.

# %%
prompt = encode(encoding, "HAMLET.\nTo be, or not to be")
print(f"prompt: {len(prompt)} tokens; {NEW_TOKENS} new tokens; cache length {MAX_LEN}")


def torch_no_cache(twin):
    idx = torch.tensor([prompt])
    return t_gpt2.generate_text_simple(twin, idx, NEW_TOKENS, MAX_LEN)[0, len(prompt):].tolist()


def jax_growing(config, params, n):
    traces = []

    @jax.jit
    def next_token(params, tokens):
        traces.append(tokens.shape)                                    # runs only when tracing
        logits = config.build().apply({"params": params}, tokens)[0]
        return jnp.argmax(logits[0, -1])

    sequence, times = list(prompt), []
    for _ in range(n):
        start = time.perf_counter()
        sequence.append(int(next_token(params, jnp.array([sequence], jnp.int32))))
        times.append(time.perf_counter() - start)
    return sequence[len(prompt):], times, len(traces)


def make_fixed_buffer_decoder(config):
    @jax.jit
    def step(params, buffer, n):                                     # n (the real length) is traced
        logits = config.build().apply({"params": params}, buffer)[0]
        token = jnp.argmax(logits[0, n - 1]).astype(jnp.int32)
        return buffer.at[0, n].set(token), token

    def decode(params):
        buffer = jnp.zeros((1, MAX_LEN), jnp.int32).at[0, :len(prompt)].set(jnp.array(prompt))
        out = []
        for i in range(NEW_TOKENS):
            buffer, token = step(params, buffer, len(prompt) + i)
            out.append(token)
        return [int(t) for t in out]

    return decode


def jax_kv_cache(config, params):
    return generate(config, params, [prompt], max_new_tokens=NEW_TOKENS, key=jax.random.PRNGKey(SEED),
                    temperature=0.0, max_len=MAX_LEN)[0]


twins = {"Burkov decoder": t_tr.from_config(dec_config), "GPT-2": t_gpt2.GPTModel(gpt_config.to_twin_dict())}
twins["Burkov decoder"].load_state_dict(interop.to_torch(dec_config, runs["Burkov decoder"]["params"]))
t_gpt2.load_without_masks(twins["GPT-2"], interop.to_torch(gpt_config, runs["GPT-2"]["params"]))
generation_times = {}
for name, config in [("Burkov decoder", dec_config), ("GPT-2", gpt_config)]:
    params, twin = runs[name]["params"], twins[name].eval()
    fixed_buffer = make_fixed_buffer_decoder(config)
    per_token = lambda times: [t / NEW_TOKENS for t in times]
    by_growing, growing_times, traces = jax_growing(config, params, RECOMPILE_DEMO)
    generation_times.update({                                          # timed first: the 1st call compiles
        f"{name}: PyTorch, no cache (per token)": per_token(time_calls(torch_no_cache, twin, calls=3)),
        f"{name}: JAX, no cache, growing input (per token)": growing_times,
        f"{name}: JAX, no cache, fixed buffer (per token)": per_token(time_calls(fixed_buffer, params, calls=3)),
        f"{name}: JAX, KV cache, jitted loop (per token)": per_token(time_calls(jax_kv_cache, config, params, calls=3)),
    })
    by_torch, by_buffer, by_cache = torch_no_cache(twin), fixed_buffer(params), jax_kv_cache(config, params)
    assert by_torch == by_buffer == by_cache and by_growing == by_cache[:RECOMPILE_DEMO]
    print(f"{name}: all four methods give the same {NEW_TOKENS} tokens; the growing-input loop traced "
          f"{traces} times for {RECOMPILE_DEMO} tokens")
    print(repr(encoding.decode(prompt + by_cache)), "\n")
display(timing_table(generation_times))

# %% [markdown]
# Reading the table: for the growing-input loop, every call compiles, so its "steady state" is no
# better than its first call. The fixed buffer compiles once but pays for `MAX_LEN` positions per
# token. With the cache, the first call pays for compiling the whole decode loop once; after that a
# token costs one position's worth of work plus attention over the filled slots. (The first call of
# the fixed buffer and of the cache includes compilation; later calls reuse it, as long as the prompt
# length, `NEW_TOKENS` and `MAX_LEN` stay the same.)
#
# ## 6. The jitted decode loop, by hand
#
# Here is the heart of `generate`, for one prompt and greedy decoding: prefill the cache, then a
# `lax.scan` whose body feeds one token and returns the next. The cache is an explicit pytree that
# goes in and comes out of every step; nothing is hidden in the model.

# %%
forward = dec_config.forward                          # (params, tokens, cache) -> (logits, cache)


def greedy_scan(params, prompt_ids, steps):
    cache = dec_config.init_cache(1, MAX_LEN)
    logits, cache = forward(params, prompt_ids, cache)                  # prefill: slots 0..P-1

    def body(carry, _):                                                 # the carry keeps its shapes
        last_logits, cache = carry                                      # [1, vocab], the cache pytree
        token = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)      # [1]
        logits, cache = forward(params, token[:, None], cache)          # one position, at slot cache.lengths
        return (logits[:, -1], cache), token[0]

    _, new_tokens = jax.lax.scan(body, (logits[:, -1], cache), None, length=steps)
    return new_tokens


greedy_scan_jit = jax.jit(greedy_scan, static_argnames="steps")
prompt_ids = jnp.array([prompt], jnp.int32)
dec_trained = runs["Burkov decoder"]["params"]
by_hand = greedy_scan_jit(dec_trained, prompt_ids, steps=NEW_TOKENS).tolist()
assert by_hand == jax_kv_cache(dec_config, dec_trained)
print("the hand-written scan gives generate's tokens:", True)
empty = dec_config.init_cache(1, MAX_LEN)
print(f"cache: {empty.num_layers} layers of keys", empty.keys[0].shape, "= [batch, kv_heads, max_len, head_dim]",
      "and values", empty.values[0].shape, "= [batch, kv_heads, head_dim, max_len]")
for steps in (4, NEW_TOKENS):
    jaxpr = jax.make_jaxpr(greedy_scan, static_argnums=2)(dec_trained, prompt_ids, steps).jaxpr
    names = [eqn.primitive.name for eqn in jaxpr.eqns]
    print(f"steps={steps:3d}: {len(names)} top-level operations, {names.count('scan')} scan "
          f"(its body is the one-token forward, traced once)")

# %% [markdown]
# ## What differs, concretely
#
# * **Where state lives.** The PyTorch twins hold weights (and GPT-2 its causal-mask buffers) in
#   modules; to decode they simply rerun on a longer prefix. In JAX the weights are a pytree and the
#   **KV cache is a value**: allocated once with a fixed `MAX_LEN`, passed into every step and
#   returned updated (`lax.dynamic_update_slice` at each row's length), never stored in the model.
#   RoPE and GPT-2's learned positions read the cache's lengths to place new tokens.
# * **How randomness flows.** Dropout masks come from explicit keys (section 4), sampling in
#   `generate` uses `fold_in(key, step)` per token; PyTorch uses one global generator. Neither
#   framework can reproduce the other's random numbers, so the parity runs disable dropout and copy
#   the initial weights.
# * **What jit requires.** Static shapes: the growing-input loop recompiled on every token. The fix
#   is to make shapes constant — a fixed buffer, or better a fixed-size cache — and to move the
#   loop itself into the compiled program (`lax.scan` for a fixed count, `lax.while_loop` to stop
#   at an end-of-text token). Loop bounds that change the program (`steps`) are static arguments.
# * **Debugging.** Compare against the slow, obvious version first: here the eager twin and the
#   no-cache fixed buffer are the references, and the cached decoder must reproduce them token for
#   token (the repository's tests check the logits too). `jax.make_jaxpr` shows what was compiled
#   (one `scan`, whatever the number of steps); out-of-range cache writes do not raise under jit
#   (XLA clamps them), so `generate` checks `len(prompt) + max_new_tokens <= max_len` on the host.
