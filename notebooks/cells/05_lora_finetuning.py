"""Cells of notebooks/05_lora_finetuning.ipynb (build with: python notebooks/build.py 05_lora_finetuning --execute)."""

# %% [markdown]
# # 05 · LoRA fine-tuning: module surgery vs a transform of the parameter tree
#
# LoRA (Hu et al. 2021; Raschka app. E) freezes a weight matrix `W [in, out]` and learns a
# low-rank correction next to it:
#
#     y = x W + b + (alpha / r) · (x A) B        A [in, r] random,  B [r, out] = 0 at the start
#
# The two frameworks express "add an adapter to every Linear and train only the adapters" in
# opposite ways:
#
# * **PyTorch (the book):** *module surgery*. `replace_linear_with_lora` walks the module tree and
#   swaps each `nn.Linear` for a `LinearWithLoRA` object that holds the old Linear and a new
#   `LoRALayer`; freezing is a flag on each tensor (`requires_grad = False`) —
#   `jaxllm.torch_ref.lora`.
# * **JAX:** a *transform of the parameter tree* plus a model flag. `add_lora` returns a new tree
#   with `lora_A`/`lora_B` leaves next to each kernel; the model code is untouched, and
#   `apply_with_lora` adds `scale · (x A) B` at every adapted `nn.Dense` while the model runs.
#   Freezing is a *mask* over the tree, used by the optimiser (`lora_optimizer`) and by the loss
#   (`stop_frozen_gradients`) — `jaxllm.nn.lora`, `jaxllm.training.freeze`.
#
# Both start from the same weights (a tiny GPT-2 with a 2-class head, as in Raschka ch. 6) and see
# the same batches of a small synthetic sentiment task.

# %% parameters
# Sizes. The test suite runs this notebook with the values after "# test:".
N_TEXTS = 512  # test: 48
BATCH = 16  # test: 8
STEPS = 120  # test: 3
EMB_DIM = 64  # test: 32
N_HEADS = 4  # test: 2
N_LAYERS = 2  # test: 1
RANK = 8  # test: 2
ALPHA = 16.0
LR = 1e-3
WEIGHT_DECAY = 0.1
CONTEXT = 16  # texts are padded with <|endoftext|> to this many tokens
SEED = 0
TORCH_THREADS = 1  # tiny models gain nothing from more, and on a busy CPU idle OpenMP threads spin

# %%
import os
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import torch
from IPython.display import display

warnings.filterwarnings("ignore", message="IProgress not found")
from flax import traverse_util
from safetensors.numpy import save_file

from jaxllm import interop
from jaxllm.data.tokenizer import gpt2_encoding
from jaxllm.models import gpt2
from jaxllm.nn import lora
from notebook_utils import overlay_losses, time_calls, timing_table
from jaxllm.torch_ref import gpt2 as t_gpt2, lora as t_lora
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step
from jaxllm.training.freeze import count_params, lora_optimizer, stop_frozen_gradients

torch.set_num_threads(TORCH_THREADS)

# %% [markdown]
# ## 1. A small classification task
#
# Short reviews built from word lists; the label is 1 when the adjective is a positive one —
# wherever it sits, whatever the filler words around it. Tokenised with GPT-2's BPE
# (`tiktoken`), right-padded with `<|endoftext|>` as in Raschka ch. 6, where the classifier reads
# the logits at the **last** position. The batches are drawn once and fed to both frameworks in
# the same order.

# %%
POSITIVE = ["good", "great", "lovely", "superb", "brilliant", "charming", "wonderful", "fine", "delightful", "excellent"]
NEGATIVE = ["bad", "awful", "dull", "boring", "terrible", "poor", "weak", "clumsy", "dreadful", "tedious"]
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the ending", "the music", "the script", "my evening"]
VERBS = ["was", "seemed", "felt", "looked", "turned out"]
ADVERBS = ["", "very ", "quite ", "really ", "rather "]
TAILS = ["", " overall", " to me", " honestly", " again"]

rng = np.random.default_rng(SEED)
encoding = gpt2_encoding()
texts, labels = [], []
for _ in range(N_TEXTS):
    label = int(rng.integers(2))
    adjective = rng.choice(POSITIVE if label else NEGATIVE)
    texts.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(ADVERBS)}{adjective}{rng.choice(TAILS)}.")
    labels.append(label)
ids = [encoding.encode(t) for t in texts]
assert max(map(len, ids)) <= CONTEXT
inputs = np.full((N_TEXTS, CONTEXT), encoding.eot_token, np.int32)
for row, seq in zip(inputs, ids):
    row[:len(seq)] = seq
labels = np.array(labels, np.int32)

n_train = N_TEXTS * 3 // 4
train, test = slice(0, n_train), slice(n_train, None)
order = np.concatenate([rng.permutation(n_train) for _ in range(STEPS * BATCH // n_train + 1)])
batches = [{"inputs": inputs[train][idx], "labels": labels[train][idx]}
           for idx in order[:STEPS * BATCH].reshape(STEPS, BATCH)]
test_batch = {"inputs": inputs[test], "labels": labels[test]}
for t, y in list(zip(texts, labels))[:4]:
    print(y, repr(t))
print(f"{n_train} training and {N_TEXTS - n_train} test texts, {STEPS} batches of {BATCH}; "
      f"positive share {labels.mean():.2f}; longest text {max(map(len, ids))} tokens")

# %% [markdown]
# ## 2. The same start: surgery on the twin, its weights as a tree
#
# The book's recipe, on the PyTorch twin: build `GPTModel`, replace `out_head` by a new
# `nn.Linear(D, 2)`, set `requires_grad = False` on every parameter, then wrap every Linear with
# `replace_linear_with_lora` (the new `A`, `B` are created after the freeze, so they are the only
# trainable tensors). `lora_from_torch` reads the result as a Flax parameter tree: the base weights
# by `interop`'s naming rule (`X.linear.weight` → `X/kernel`, transposed), the adapters as
# `X/lora_A`, `X/lora_B` (same `(in, r)` layout, no transpose).

# %%
config = gpt2.tiny(num_classes=2, qkv_bias=True, emb_dim=EMB_DIM, n_heads=N_HEADS, n_layers=N_LAYERS,
                   context_length=CONTEXT, drop_rate=0.0)
LORA = lora.raschka(RANK, ALPHA)

torch.manual_seed(SEED)
twin = t_gpt2.GPTModel(config.to_twin_dict())
twin.out_head = torch.nn.Linear(config.emb_dim, config.num_classes)      # the 2-class head
for p in twin.parameters():
    p.requires_grad = False                                             # freeze: a flag on each tensor
t_lora.replace_linear_with_lora(twin, RANK, ALPHA)                      # surgery: the module tree changes
params = t_lora.lora_from_torch(config, t_gpt2.drop_masks(twin.state_dict()))

print("PyTorch, after surgery:", twin.trf_blocks[0].att.W_query, sep="\n")
print("\nJAX, the same layer is four leaves of one tree:")
for name, leaf in params["trf_blocks_0"]["att"]["W_query"].items():
    print(f"  trf_blocks_0/att/W_query/{name:7s} {leaf.dtype}{list(leaf.shape)}")

# %% [markdown]
# The JAX way to get there without PyTorch is `add_lora(base_params, LORA, key)`: the same tree
# (the values of `A` differ, since JAX's generator is not PyTorch's). Either way the base model's
# code is unchanged — the adapters are just extra leaves.

# %%
base = config.build().init(jax.random.PRNGKey(SEED), config.example_input())["params"]
from_jax = lora.add_lora(base, LORA, jax.random.PRNGKey(SEED))
same_tree = jax.tree_util.tree_structure(from_jax) == jax.tree_util.tree_structure(params)
same_shapes = jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, from_jax, params))
print("add_lora gives the same tree as the converted twin:", same_tree and same_shapes)

mask = lora.lora_mask(params)                                           # True on the lora_A / lora_B leaves
torch_trainable = sum(p.numel() for p in twin.parameters() if p.requires_grad)
torch_total = sum(p.numel() for p in twin.parameters())
print(f"trainable: PyTorch {torch_trainable:,} of {torch_total:,}; "
      f"JAX {count_params(params, mask):,} of {count_params(params):,}")
assert count_params(params, mask) == torch_trainable and count_params(params) == torch_total

# The book's number for GPT-2 124M (qkv_bias, 2-class head, r = 16): shapes only, nothing allocated.
big = gpt2.gpt2_124m(qkv_bias=True, num_classes=2)
big_lora = jax.eval_shape(lambda p: lora.add_lora(p, lora.raschka(16, 16.0), jax.random.PRNGKey(0)),
                          interop.param_shapes(big))
print(f"GPT-2 124M with LoRA r=16: {count_params(big_lora, lora.lora_mask(big_lora)):,} trainable "
      f"(the book: 2,666,528) of {count_params(big_lora):,}")

# %% [markdown]
# With `B = 0` an adapter adds nothing, so at the start both models compute the base model. The
# JAX side calls the *unchanged* Flax model through `apply_with_lora`, which intercepts every
# `nn.Dense` call whose scope holds `lora_A`/`lora_B`.

# %%
model = config.build()
lora_logits = lora.apply_with_lora(lambda p, tokens: model.apply({"params": p}, tokens)[0], LORA)
logits_jit = jax.jit(lora_logits)
sample = batches[0]["inputs"]
twin.eval()
with torch.no_grad():
    t_logits = twin(torch.from_numpy(sample).long()).numpy()
print("logits", t_logits.shape, "max |gap| at the start:", float(np.max(np.abs(np.asarray(logits_jit(params, sample)) - t_logits))))
np.testing.assert_allclose(logits_jit(params, sample), t_logits, atol=1e-5)

# %% [markdown]
# ## 3. Training only the adapters, in both frameworks
#
# * **PyTorch:** `AdamW(model.parameters())` as in the book — every parameter is handed to the
#   optimiser, but frozen ones never get a `.grad`, so the optimiser skips them.
# * **JAX:** `lora_optimizer(adamw, params)` is `optax.multi_transform`: AdamW on the LoRA leaves,
#   `set_to_zero` on the rest. `stop_frozen_gradients(loss_fn, mask)` puts `lax.stop_gradient` on
#   the frozen leaves, so `jax.grad` returns exact zeros for them and XLA skips computing them.
#
# Loss: cross-entropy on the last position's class logits.

# %%
def loss_fn(params, batch, key):
    logits = lora_logits(params, batch["inputs"])[:, -1, :]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}


optimizer = lora_optimizer(make_optimizer(OptimizerConfig("adamw", lr=LR, weight_decay=WEIGHT_DECAY)), params)
train_step = make_train_step(stop_frozen_gradients(loss_fn, mask), optimizer)
start_params = jax.tree_util.tree_map(np.array, params)                # a host copy: the step donates its input
state = TrainState.create(jax.tree_util.tree_map(jnp.array, params), optimizer, jax.random.PRNGKey(SEED))
jax_losses, jax_times = [], []
for batch in batches:
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax_losses.append(float(metrics["loss"]))
    jax_times.append(time.perf_counter() - start)

start_torch = {k: v.clone() for k, v in t_gpt2.drop_masks(twin.state_dict()).items()}
torch_opt = torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
twin.train()
torch_losses, torch_times = [], []
for batch in batches:
    start = time.perf_counter()
    logits = twin(torch.from_numpy(batch["inputs"]).long())[:, -1, :]
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["labels"]).long())
    loss.backward()
    torch_opt.step()
    torch_opt.zero_grad()
    torch_losses.append(loss.item())
    torch_times.append(time.perf_counter() - start)
twin.eval()

np.testing.assert_allclose(jax_losses[:10], torch_losses[:10], rtol=1e-4)  # the parity tests' bar
with torch.no_grad():
    torch_test = twin(torch.from_numpy(test_batch["inputs"]).long())[:, -1, :].argmax(-1).numpy()
jax_test = np.asarray(jnp.argmax(logits_jit(state.params, test_batch["inputs"])[:, -1, :], -1))
print(f"final train loss: PyTorch {torch_losses[-1]:.4f}, JAX {jax_losses[-1]:.4f}; "
      f"max |gap| over {STEPS} steps {np.max(np.abs(np.subtract(jax_losses, torch_losses))):.1e}")
print(f"test accuracy: PyTorch {np.mean(torch_test == test_batch['labels']):.3f}, "
      f"JAX {np.mean(jax_test == test_batch['labels']):.3f} (chance 0.5)")

# %%
overlay_losses({"PyTorch: LinearWithLoRA, requires_grad=False": torch_losses,
                "JAX: apply_with_lora, masked optax": jax_losses}, title="LoRA on a frozen tiny GPT-2, AdamW")
plt.show()

# %% [markdown]
# Frozen means frozen, bit for bit, in both: weight decay is applied only to what the optimiser
# trains (PyTorch skips parameters without a `.grad`; optax's `set_to_zero` branch gives a zero
# update), and only the adapters moved.

# %%
end_torch = t_gpt2.drop_masks(twin.state_dict())
moved = sorted({".".join(name.split(".")[-2:]) for name in end_torch if not torch.equal(end_torch[name], start_torch[name])})
print("PyTorch tensors that changed:", moved)
changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, start_params)
leaves = jax.tree_util.tree_flatten_with_path(changed)[0]
print("JAX leaves that changed:", sorted({jax.tree_util.keystr(p[-1:], simple=True) for p, c in leaves if c}))
assert all(c == m for (_, c), m in zip(leaves, jax.tree_util.tree_leaves(mask)))

# %% [markdown]
# ## 4. What the optimiser keeps for frozen weights
#
# PyTorch's AdamW keeps a dict `optimizer.state[param]`, filled lazily on the first `step()` — only
# for parameters that had a gradient. optax's state is a pytree fixed at `init`: `multi_transform`
# hands each branch the params with the other branch's leaves replaced by an empty `MaskedNode`, so
# Adam's `mu` and `nu` exist only for the adapters.

# %%
in_optimizer = sum(len(g["params"]) for g in torch_opt.param_groups)
torch_state_numel = sum(v.numel() for s in torch_opt.state.values() for v in s.values() if v.dim() > 0)
print(f"PyTorch: {in_optimizer} tensors handed to AdamW, state for {len(torch_opt.state)} of them "
      f"({torch_state_numel:,} numbers: exp_avg + exp_avg_sq)")

adam = state.opt_state.inner_states["train"].inner_state[0]            # ScaleByAdamState(count, mu, nu)
masked = lambda tree: sum(isinstance(x, optax.MaskedNode) for x in jax.tree_util.tree_leaves(
    tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
jax_state_numel = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)
print(f"JAX: mu holds {len(jax.tree_util.tree_leaves(adam.mu))} arrays and {masked(adam.mu)} MaskedNodes "
      f"({jax_state_numel:,} numbers in the whole opt_state)")
print("one layer of mu:", jax.tree_util.tree_map(lambda x: x.shape, adam.mu["trf_blocks_0"]["att"]["W_query"]))
assert jax_state_numel == torch_state_numel == 2 * torch_trainable

# %% [markdown]
# Without `stop_frozen_gradients` the optimiser would still freeze the base weights, but
# `jax.grad` would compute their full-size gradients first (PyTorch never does: autograd builds
# no graph for tensors with `requires_grad = False`).

# %%
plain = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]))(state.params, batches[0])
stopped = jax.jit(jax.grad(lambda p, b: stop_frozen_gradients(loss_fn, mask)(p, b, None)[0]))(state.params, batches[0])
kernel = ("trf_blocks_0", "att", "W_query", "kernel")
pick = lambda tree: tree[kernel[0]][kernel[1]][kernel[2]][kernel[3]]
print(f"|grad| of the frozen {'/'.join(kernel)}: without stop_gradient {float(jnp.abs(pick(plain)).sum()):.3g}, "
      f"with {float(jnp.abs(pick(stopped)).sum()):.3g}")
print("PyTorch .grad of the frozen W_query.linear.weight:", twin.trf_blocks[0].att.W_query.linear.weight.grad)

# %% [markdown]
# ## 5. Merging for inference, and adapter-only files
#
# For serving, fold each adapter into its weight, `W ← W + scale · A B`: `merge` returns a tree in
# the *base* layout, so the plain model (no interceptor, no extra matmuls) computes the same
# logits. The twin has no merge in the book; by hand it is the same sum on `linear.weight`
# (transposed, PyTorch stores `[out, in]`).

# %%
merged = lora.merge(state.params, LORA)
plain_logits = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens)[0])
x = test_batch["inputs"]
gap_merge = float(jnp.max(jnp.abs(plain_logits(merged, x) - logits_jit(state.params, x))))
print("JAX: merged plain model vs apply_with_lora, max |logits gap|:", f"{gap_merge:.1e}")
np.testing.assert_allclose(plain_logits(merged, x), logits_jit(state.params, x), atol=1e-5)

plain_twin = t_gpt2.GPTModel(config.to_twin_dict())
plain_twin.out_head = torch.nn.Linear(config.emb_dim, config.num_classes)
merged_sd = {}
for name, value in end_torch.items():
    if name.endswith(".lora.A") or name.endswith(".lora.B"):
        continue
    merged_sd[name.replace(".linear.", ".")] = value.clone()
for name, module in twin.named_modules():
    if isinstance(module, t_lora.LinearWithLoRA):
        merged_sd[f"{name}.weight"] += (module.lora.alpha / module.lora.rank * module.lora.A @ module.lora.B).T.detach()
t_gpt2.load_without_masks(plain_twin, merged_sd)
with torch.no_grad():
    twin_lora, twin_merged = (m.eval()(torch.from_numpy(x).long()).numpy() for m in (twin, plain_twin))
print("PyTorch: merged plain model vs LinearWithLoRA, max |logits gap|:", f"{np.max(np.abs(twin_merged - twin_lora)):.1e}")
jax_merged = np.asarray(plain_logits(merged, x))
print(f"after {STEPS} steps, JAX merged vs PyTorch merged: max |logits gap| {np.max(np.abs(jax_merged - twin_merged)):.1e} "
      f"(float32 rounding, amplified by training), same predicted class for "
      f"{np.mean(jax_merged[:, -1].argmax(-1) == twin_merged[:, -1].argmax(-1)):.0%} of the test texts")

# %%
with tempfile.TemporaryDirectory() as folder:
    adapters_file = os.path.join(folder, "adapters.safetensors")
    lora.save_lora(adapters_file, state.params, LORA)                   # only the LoRA leaves, cfg in the metadata
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(merged).items()}
    full_file = os.path.join(folder, "full.safetensors")
    save_file(flat, full_file)
    torch_file = os.path.join(folder, "adapters.pt")
    torch.save({k: v for k, v in end_torch.items() if ".lora." in k}, torch_file)
    sizes = {f: os.path.getsize(f) for f in (adapters_file, full_file, torch_file)}
    reloaded, reloaded_cfg = lora.load_lora(adapters_file, lora.without_lora(state.params))
print(f"adapters (JAX, safetensors): {sizes[adapters_file] / 1024:,.0f} KiB; "
      f"adapters (PyTorch, torch.save): {sizes[torch_file] / 1024:,.0f} KiB; "
      f"the full merged params: {sizes[full_file] / 1024:,.0f} KiB "
      f"({sizes[full_file] / sizes[adapters_file]:.0f}x; most of it GPT-2's 50,257-row token embedding)")
print("load_lora onto the base weights gives the same logits:",
      bool(np.array_equal(logits_jit(reloaded, x), logits_jit(state.params, x))), "| config:", reloaded_cfg)

# %% [markdown]
# ## 6. Timing: first call vs steady state
#
# The JAX training step's first call traces the loss (with the interceptor), differentiates and
# compiles; after that each step is one call into compiled code. Inference is timed on the test
# set, with the adapters (`apply_with_lora`, two extra small matmuls per Dense) and merged.

# %%
twin_merged_call = lambda: plain_twin(torch.from_numpy(x).long())
with torch.no_grad():
    inference_times = {
        "PyTorch inference, LinearWithLoRA": time_calls(lambda: twin(torch.from_numpy(x).long()), calls=5),
        "PyTorch inference, merged": time_calls(twin_merged_call, calls=5),
    }
fresh_jit = lambda fn: jax.jit(lambda p, t: fn(p, t))                 # a new function: no cached compilation
inference_times["JAX inference, apply_with_lora (jit)"] = time_calls(fresh_jit(lora_logits), state.params, x, calls=5)
inference_times["JAX inference, merged (jit)"] = time_calls(fresh_jit(lambda p, t: model.apply({"params": p}, t)[0]),
                                                            merged, x, calls=5)
display(timing_table({"PyTorch train step (eager)": torch_times, "JAX train step (jit)": jax_times,
                      **inference_times}))

# %% [markdown]
# ## What differs, concretely
#
# * **Where state lives.** PyTorch: the model *is* the state. Surgery replaces modules in place,
#   the frozen/trainable split is a flag on each tensor, the optimiser discovers what to keep
#   lazily (`optimizer.state` fills on the first `step()`), and a merge means mutating
#   `linear.weight`. JAX: the parameters are a value (a nested dict); LoRA is a function from one
#   tree to a bigger tree (`add_lora`) and back (`merge`, `without_lora`); the split is a separate
#   bool tree (`lora_mask`) that both the optimiser (`multi_transform`, whose state is fixed at
#   `init`, `MaskedNode` for frozen leaves) and the loss (`stop_frozen_gradients`) read. Saving the
#   adapters is selecting leaves by path.
# * **How randomness flows.** The twin draws each `A` from PyTorch's global generator in the order
#   the surgery visits the Linears; `add_lora` splits one explicit key over the targets in path
#   order. The two can never draw the same `A`, which is why this notebook converts the twin's
#   weights (`lora_from_torch`) to start both runs from one point. Neither model uses dropout here.
# * **What jit requires.** The model code must stay pure and unchanged, so LoRA enters through a
#   Flax method interceptor at trace time — which is why `apply_with_lora` wants the *un-jitted*
#   apply function (a jitted one would hit its cache and skip the interceptor; the function raises
#   rather than silently running the base model) and you jit the result. Changing which leaves are
#   trainable changes the tree's structure, hence the compiled program: rebuild the optimiser and
#   the step.
# * **Debugging.** In PyTorch, `print(model)` shows the surgery and `p.requires_grad`/`p.grad`
#   show the freeze. In JAX, the tree is the whole story: print its paths and shapes, `count_params`
#   with the mask, and the optimiser state (`MaskedNode` where nothing is kept). The checks that
#   catch real bugs are the ones above: the same logits at the start (`B = 0`), frozen leaves
#   unchanged bit for bit, and merged logits equal to the adapted ones.
