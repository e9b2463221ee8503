"""Cells of notebooks/06_parallel.ipynb (build with: python notebooks/build.py 06_parallel --execute)."""

# %% [markdown]
# # 06 · Data parallelism: `pmap` vs `jit` with shardings vs `shard_map`
#
# One training step, five ways, from `jaxllm.training.parallel` (`make_strategy(name)`):
#
# | strategy | style | who writes the cross-device mean |
# |---|---|---|
# | `single` | `jax.jit` on one device | nobody: there is one device |
# | `sharded` | `jax.jit` over a `Mesh`; the batch split (`P("data")`), params replicated | **the compiler** (XLA's SPMD partitioner inserts an all-reduce) |
# | `fsdp` | as `sharded`, and params + optimiser state split too | **the compiler** (all-gathers weights, reduces gradients) |
# | `shard_map` | per-device code over the same mesh | **you**: an explicit `lax.psum` |
# | `pmap` | the classic per-device style, state with a leading device axis | **you**: an explicit `lax.psum` |
#
# The model never knows: it is the same tiny GPT-2 and the same loss function in every run,
# started from the same weights and fed the same global batches, and every strategy must produce
# the single-device losses. The devices here are **forced host devices**: XLA splits one CPU
# into `N_DEVICES` logical devices that share the same cores. That is enough to prove the
# programs are *correct* (same numbers, the right collectives) and says nothing about *speed*.

# %% parameters
# Sizes. The test suite runs this notebook with the values after "# test:".
N_DEVICES = 4  # forced host devices: set before JAX is imported (the next cell)
CONTEXT = 32  # test: 16
EMB_DIM = 64  # test: 32
N_HEADS = 4  # test: 2
N_LAYERS = 2  # test: 1
BATCH = 32  # test: 16
STEPS = 40  # test: 3
ACCUM = 4  # micro-batches per step in section 5; BATCH must divide by N_DEVICES * ACCUM
ACCUM_STEPS = 10  # test: 2
LR = 1e-3
WEIGHT_DECAY = 0.1
SEED = 0
TORCH_THREADS = 1

# %%
import os

# A process fixes its device count when JAX starts: this must run before `import jax`.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}").strip()

import re
import time
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display

warnings.filterwarnings("ignore", message="IProgress not found")
from jaxllm import interop
from jaxllm.data.batches import ArrayBatches
from jaxllm.data.corpus import shakespeare_plays
from jaxllm.data.windows import lm_windows
from jaxllm.models import gpt2
from notebook_utils import MarkdownTable, overlay_losses, timing_table
from jaxllm.torch_ref import gpt2 as t_gpt2
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_strategy
from jaxllm.training.losses import lm_cross_entropy
from jaxllm.training.parallel import STRATEGIES

torch.set_num_threads(TORCH_THREADS)
print(f"{jax.device_count()} devices:", jax.devices())
assert jax.device_count() == N_DEVICES, "JAX was imported before XLA_FLAGS was set: restart the kernel"

# %% [markdown]
# ## 1. One model, one loss, one start, one stream of batches
#
# A character-level GPT-2 (bytes of *Hamlet*, 256 ids, no dropout: per-device code folds the
# device index into the dropout key, so its masks would differ from one device's by design).
# The start is the PyTorch twin's initialisation, converted with `interop.from_torch`, so the
# twin can run as a single-process reference curve on the same batches.

# %%
ids = np.frombuffer(shakespeare_plays()["hamlet"].encode("utf-8"), np.uint8).astype(np.int32)
batcher = ArrayBatches(lm_windows(ids, CONTEXT, CONTEXT), BATCH, seed=SEED)
batches = [batcher.next() for _ in range(STEPS)]

config = gpt2.tiny(vocab_size=256, context_length=CONTEXT, emb_dim=EMB_DIM, n_heads=N_HEADS, n_layers=N_LAYERS,
                   drop_rate=0.0)
torch.manual_seed(SEED)
twin = t_gpt2.GPTModel(config.to_twin_dict())
params0 = jax.device_get(interop.from_torch(config, t_gpt2.drop_masks(twin.state_dict())))  # host numpy

model = config.build()
loss_fn = lm_cross_entropy(lambda p, tokens: model.apply({"params": p}, tokens)[0])
optimizer = make_optimizer(OptimizerConfig("adamw", lr=LR, weight_decay=WEIGHT_DECAY))
print(f"{len(ids):,} bytes; {STEPS} global batches of {BATCH} x {CONTEXT} tokens, "
      f"{BATCH // N_DEVICES} rows per device; "
      f"{sum(x.size for x in jax.tree_util.tree_leaves(params0)):,} parameters")

# %% [markdown]
# ## 2. Training with every strategy
#
# The loop is the same for all five: `place` the state onto the strategy's devices, build its
# step from the *same* `loss_fn` and `optimizer`, feed it the *global* host batch (the strategy
# splits it), and `gather` the state back onto one device at the end.

# %%
def train(name, accum_steps=1, steps=STEPS):
    strategy = make_strategy(name)
    state = strategy.place(TrainState.create(params0, optimizer, jax.random.PRNGKey(SEED)))
    step = strategy.train_step(loss_fn, optimizer, accum_steps=accum_steps)
    losses, times = [], []
    for batch in batches[:steps]:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))                            # float() waits for the step
        times.append(time.perf_counter() - start)
    return dict(strategy=strategy, step=step, state=state, losses=losses, times=times,
                params=jax.device_get(strategy.gather(state).params))


runs = {name: train(name) for name in STRATEGIES}

twin_opt = torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
torch_losses, torch_times = [], []
for batch in batches:
    start = time.perf_counter()
    logits = twin(torch.from_numpy(batch["inputs"]).long())
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch["targets"]).long().flatten())
    loss.backward()
    twin_opt.step()
    twin_opt.zero_grad()
    torch_losses.append(loss.item())
    torch_times.append(time.perf_counter() - start)

reference = runs["single"]
for name, run in runs.items():
    loss_gap = np.max(np.abs(np.subtract(run["losses"], reference["losses"])))
    param_gap = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(run["params"]),
                                                               jax.tree_util.tree_leaves(reference["params"])))
    print(f"{name:9s} final loss {run['losses'][-1]:.4f}; vs single: max |loss gap| {loss_gap:.1e}, "
          f"max |param gap| {param_gap:.1e}")
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=1e-5)
print(f"PyTorch twin (one process) final loss {torch_losses[-1]:.4f}; "
      f"max |loss gap| to single {np.max(np.abs(np.subtract(torch_losses, reference['losses']))):.1e}")
np.testing.assert_allclose(torch_losses[:10], reference["losses"][:10], rtol=1e-4)

# %%
overlay_losses({**{f"JAX {name}": run["losses"] for name, run in runs.items()}, "PyTorch twin": torch_losses},
               title=f"tiny GPT-2 on Hamlet's bytes, {N_DEVICES} forced host devices")
plt.show()

# %% [markdown]
# (The gap panel is on a log scale: gaps of 1e-7…1e-6 are float32 summation order — a mean over
# four device shards is added up in a different order than over one batch.)
#
# ## 3. Where the arrays live
#
# Every `jax.Array` carries a `sharding`: which device holds which slice. After training, the
# states are still where each strategy put them.

# %%
def describe(x):
    spec = getattr(x.sharding, "spec", None)
    shard = x.addressable_shards[0].data.shape
    n = len(x.sharding.device_set)
    return f"shape {str(tuple(x.shape)):14s} {type(x.sharding).__name__}{'' if spec is None else f'({spec})'}, " \
           f"{n} device{'s' * (n > 1)}, {'each ' * (n > 1)}holding {tuple(shard)}"


kernel = lambda params: params["trf_blocks_0"]["ff"]["layers_0"]["kernel"]   # [D, 4D]
for name in STRATEGIES:
    print(f"{name:9s} ff kernel: {describe(kernel(runs[name]['state'].params))}")
placed = runs["sharded"]["step"].prepare(batches[0])["inputs"]
print(f"sharded   batch:     {describe(placed)}")
for path, leaf in jax.tree_util.tree_flatten_with_path(runs["fsdp"]["state"].opt_state)[0]:
    where = jax.tree_util.keystr(path, simple=True, separator="/")
    if where.endswith("trf_blocks_0/ff/layers_0/kernel"):                # Adam's mu and nu follow their param
        print(f"fsdp      opt_state .../{where.split('/trf_blocks_0')[0].rsplit('/', 1)[-1]}: {describe(leaf)}")

# %% [markdown]
# `jax.debug.visualize_array_sharding` draws the same for a 1-D or 2-D array: the batch rows of
# `sharded` split over four devices, and the `fsdp` kernel split along its largest dimension that
# divides by the device count.

# %%
jax.debug.visualize_array_sharding(placed)
jax.debug.visualize_array_sharding(kernel(runs["fsdp"]["state"].params), max_width=120)
jax.debug.visualize_array_sharding(kernel(runs["sharded"]["state"].params))

# %% [markdown]
# ## 4. Explicit collectives vs compiler-inserted ones
#
# In the per-device styles the program *you* trace computes one device's gradients and then calls
# `lax.psum` over the `data` axis: it is in the jaxpr. The sharded `jit` traces a program for the
# *global* batch with no collective at all; XLA's partitioner then decides where the data must
# move and inserts the all-reduces (and, for `fsdp`, all-gathers / reduce-scatters) into the
# compiled HLO. Below: the collectives in each strategy's traced program (jaxpr) and in its
# compiled program.

# %%
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
rows = ["| strategy | psum in the traced program (jaxpr) | collectives in the compiled HLO |", "|---|---:|---|"]
for name, run in runs.items():
    step, state = run["step"], run["state"]
    jitted, batch = (step.jitted, step.prepare(batches[0])) if hasattr(step, "prepare") else (step, batches[0])
    jaxpr = jax.make_jaxpr(jitted)(state, batch).pretty_print(use_color=False)  # what was traced, nested bodies too
    hlo = jitted.lower(state, batch).compile().as_text()                # what XLA will run
    counts = {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}
    psums = len(re.findall(r"\bpsum\w*\[", jaxpr))
    rows.append(f"| {name} | {psums} | {', '.join(f'{n} {op}' for op, n in counts.items() if n) or 'none'} |")
display(MarkdownTable("\n".join(rows)))

# %% [markdown]
# The per-device programs hold one `psum` per summed array (every gradient, the loss, the count
# and the metrics); XLA combines them into one all-reduce. The sharded `jit` traced none, yet its
# compiled program holds the same all-reduce; `fsdp` also all-gathers each split weight before
# using it.
#
# The per-device step, traced by hand: the `psum` is a line of *our* program (here the body that
# `shard_map` and `pmap` run, from `make_train_step(..., axis_name="data")`).

# %%
from jaxllm.training.step import make_train_step

body = make_train_step(loss_fn, optimizer, jit=False, axis_name="data")
state1 = TrainState.create(params0, optimizer, jax.random.PRNGKey(SEED))
per_device = jax.make_jaxpr(body, axis_env=[("data", N_DEVICES)])(state1, batches[0])
psum_lines = [line.strip() for line in per_device.pretty_print(use_color=False).splitlines() if "psum" in line]
print(f"{len(psum_lines)} psum in the per-device jaxpr; the first, shortened:\n  {psum_lines[0][:160]}...")
global_jaxpr = jax.make_jaxpr(make_train_step(loss_fn, optimizer, jit=False))(state1, batches[0])
print("psum in the global (sharded jit) jaxpr:", global_jaxpr.pretty_print(use_color=False).count("psum"))

# %% [markdown]
# ## 5. Gradient accumulation is the same step
#
# `accum_steps=k` splits the global batch into k micro-batches (each device keeps its own rows),
# runs them one at a time in a `lax.scan` and takes one optimiser step on the count-weighted sum
# of their gradients: the update of the whole batch at once, with the activations of one
# micro-batch. Here `ACCUM` micro-batches of `BATCH / ACCUM` rows each (split over the devices),
# with the compiler's collectives (`sharded`) and with the explicit ones (`shard_map`), against the
# one-shot single-device run of section 2.

# %%
accum_runs = {f"{name}, accum_steps={ACCUM}": train(name, accum_steps=ACCUM, steps=ACCUM_STEPS)
              for name in ("sharded", "shard_map")}
one_shot = reference["losses"][:ACCUM_STEPS]
for name, run in accum_runs.items():
    print(f"{name:25s} max |loss gap| to one batch of {BATCH} on one device: "
          f"{np.max(np.abs(np.subtract(run['losses'], one_shot))):.1e}")
    np.testing.assert_allclose(run["losses"], one_shot, rtol=1e-5)
overlay_losses({f"single, one batch of {BATCH}": one_shot,
                **{name: run["losses"] for name, run in accum_runs.items()}},
               title=f"{ACCUM} micro-batches of {BATCH // ACCUM} vs one batch of {BATCH}")
plt.show()

try:  # a global batch must divide by devices x micro-batches
    runs["sharded"]["step"](runs["sharded"]["state"], {k: v[:BATCH - 2] for k, v in batches[0].items()})
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## 6. Timing: first call vs steady state
#
# **Read this table as a correctness artefact, not a benchmark.** The forced host devices are
# the same CPU cores, so four "devices" do the single device's work plus the cost of
# coordinating; on a machine with several real accelerators each device would have its own
# compute and memory, and the sharded steps would scale. The first call of each strategy
# includes tracing and XLA compilation (the partitioner's work included).

# %%
display(timing_table({**{f"JAX {name}": run["times"] for name, run in runs.items()},
                      **{f"JAX {name}": run["times"] for name, run in accum_runs.items()},
                      "PyTorch twin (eager, one process)": torch_times}))

# %% [markdown]
# ## What differs, concretely
#
# * **Where state lives.** In `single`, `sharded`, `fsdp` and `shard_map` the state is one
#   logical array per parameter; its `sharding` says which device holds what (replicated,
#   or split along a dimension under `fsdp`), and `gather` is a `device_put`. Under `pmap` the
#   state is *stacked*: every leaf gains a leading device axis of size `N_DEVICES`, and the
#   metrics come back per device (the strategy reads device 0's copy). PyTorch keeps the state
#   in modules on one device; its data-parallel twin (`DistributedDataParallel`) would hold one
#   replica per process and all-reduce gradients in backward hooks.
# * **How randomness flows.** One key per step, `fold_in(state.key, step)`, in every strategy.
#   The per-device styles also fold in `lax.axis_index("data")`, so each device draws its own
#   dropout masks — different from one device's masks by design, which is why these runs use no
#   dropout. Under the sharded `jit` the program is global: a mask is drawn for the whole batch.
# * **What jit requires.** Static, divisible shapes: the global batch must split evenly over
#   devices × micro-batches (a clear `ValueError` otherwise); each strategy compiles once per
#   batch shape. With shardings you write the single-device program and annotate where data
#   lives; with `shard_map`/`pmap` you write the per-device program and its collectives yourself
#   (forgetting the `psum` trains each device on its own shard — silently).
# * **Debugging.** Start from `single` and require every other strategy to reproduce its losses
#   (section 2); look at `x.sharding` and `jax.debug.visualize_array_sharding` to see where data
#   is; read the jaxpr for the collectives you wrote and the compiled HLO (`.lower(...).compile()
#   .as_text()`) for the ones XLA inserted. Forced host devices make all of this work on a laptop.
