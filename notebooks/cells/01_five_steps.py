"""Cells of notebooks/01_five_steps.ipynb (build with: python notebooks/build.py 01_five_steps --execute)."""

# %% [markdown]
# # 01 · Tensors, autograd and the five-step loop — PyTorch and JAX side by side
#
# The "PyTorch in one hour" fundamentals, written three ways on the same problem, from **the same
# initial weights** and on **the same data**:
#
# * **PyTorch** (imperative): tensors that you mutate, gradients accumulated on them by
#   `loss.backward()`, an optimiser object that updates them in place;
# * **JAX + Flax Linen + optax** (functional): parameters are a plain pytree, `jax.grad` turns the loss
#   function into a gradient function, the update is a pure function `params -> new params`, compiled
#   once with `jax.jit`;
# * **Flax NNX**: objects again, like PyTorch, but with a functional core you can take out with
#   `nnx.split` / `nnx.merge`.
#
# The problem is linear regression `y = 2x + 1 + 0.1·noise` on 10 points (`jaxllm.data.tabular.linear_toy`),
# trained with plain SGD on the mean squared error. The five steps are: **predict, loss, gradient,
# update, reset**.

# %% parameters
# Sizes. The test suite runs this notebook with the values after "# test:".
EPOCHS = 100  # test: 4
LR = 0.05
N_POINTS = 10
SEED = 0
TORCH_THREADS = 1  # tiny models gain nothing from more, and on a busy CPU idle OpenMP threads spin

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import torch
from flax import nnx
from IPython.display import display
from torch import nn

from jaxllm import interop
from jaxllm.data import tabular
from jaxllm.models import linear
from notebook_utils import overlay_losses, timing_table
from jaxllm.torch_ref import linear as t_linear

torch.set_num_threads(TORCH_THREADS)

print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}")

# %% [markdown]
# ## 1. Tensors: mutable objects vs immutable values
#
# A PyTorch tensor is an object you can write into. A JAX array is a value: "changing" it gives you a
# new array (`x.at[i].set(v)`), and the old one is untouched. That single difference is what lets JAX
# treat a whole training step as a mathematical function.

# %%
t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
t[0, 0] = 10.0                                   # in-place write: fine
print("torch:", t.tolist(), t.dtype, t.device)

a = jnp.array([[1.0, 2.0], [3.0, 4.0]])
b = a.at[0, 0].set(10.0)                         # a new array; `a` is unchanged
print("jax:  ", a.tolist(), "->", b.tolist(), a.dtype, a.devices())
try:
    a[0, 0] = 10.0
except TypeError as err:
    print("jax refuses in-place writes:", str(err).split(".")[0])

# Moving data between the two goes through NumPy (a copy on CPU, never pickle).
print(torch.from_numpy(np.array(b)).sum().item(), jnp.asarray(t.numpy()).sum())

# %% [markdown]
# ## 2. Autograd: gradients as state vs gradients as functions
#
# PyTorch records the operations on tensors that `requires_grad` and `backward()` **adds** the
# gradient into `.grad` — which is why every training loop must reset it. `jax.grad` instead
# transforms a Python function into a new function that returns the gradient: nothing is stored,
# nothing accumulates, and transformations compose (`jax.grad(jax.grad(f))`).

# %%
w = torch.tensor(3.0, requires_grad=True)
(w ** 2 + 2 * w).backward()
print("torch, first backward: ", w.grad.item())    # 2w + 2 = 8
(w ** 2 + 2 * w).backward()
print("torch, second backward:", w.grad.item())    # 16: accumulated -- hence step 5, reset
w.grad.zero_()


def f(w):
    return w ** 2 + 2 * w


df = jax.grad(f)
print("jax, called twice:     ", df(3.0), df(3.0))  # 8, 8: a function, no state
print("jax, second derivative:", jax.grad(jax.grad(f))(3.0))
print("what jax.grad built (a new pure function, as a jaxpr):")
print(jax.make_jaxpr(df)(3.0).pretty_print(use_color=False))

# %% [markdown]
# ## 3. The five steps by hand
#
# Same data, same starting `W` and `b` (drawn once by PyTorch and copied), same learning rate. The
# PyTorch loop mutates `W` and `b` under `torch.no_grad()` and zeroes their gradients; the JAX loop
# calls a pure, jitted `sgd_step(params, x, y) -> (new_params, loss)`. (The same two loops live in
# the library as `jaxllm.torch_ref.linear.fit_by_hand` and `jaxllm.training.by_hand.fit_by_hand`.)

# %%
x_np, y_np = tabular.linear_toy(N_POINTS, seed=SEED)   # x ~ N(0, 1), y = 2x + 1 + 0.1 noise
torch.manual_seed(SEED)
W0, b0 = torch.randn(1, 1), torch.randn(1)              # one random start, shared by every style
print(f"start: W = {W0.item():.4f}, b = {b0.item():.4f}")

# PyTorch, by hand.
x_t, y_t = torch.from_numpy(x_np), torch.from_numpy(y_np)
W = W0.clone().requires_grad_(True)
b = b0.clone().requires_grad_(True)
torch_hand_losses, torch_hand_times = [], []
for epoch in range(EPOCHS):
    start = time.perf_counter()
    pred = x_t @ W + b                        # 1. predict
    loss = ((pred - y_t) ** 2).mean()         # 2. loss
    loss.backward()                           # 3. gradient (into W.grad, b.grad)
    with torch.no_grad():                     # 4. update, in place
        W -= LR * W.grad
        b -= LR * b.grad
    W.grad.zero_()                            # 5. reset
    b.grad.zero_()
    torch_hand_losses.append(loss.item())
    torch_hand_times.append(time.perf_counter() - start)


# JAX, by hand: the same steps as a pure function of (params, data).
def mse(params, x, y):
    pred = x @ params["W"] + params["b"]      # 1. predict
    return jnp.mean((pred - y) ** 2)          # 2. loss


@jax.jit
def sgd_step(params, x, y):
    loss, grads = jax.value_and_grad(mse)(params, x, y)                         # 3. gradient
    new_params = jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads)  # 4. update
    return new_params, loss                   # 5. reset: nothing to reset, grads were a return value


params = {"W": jnp.asarray(W0.numpy()), "b": jnp.asarray(b0.numpy())}
jax_hand_losses, jax_hand_times = [], []
for epoch in range(EPOCHS):
    start = time.perf_counter()
    params, loss = sgd_step(params, x_np, y_np)
    jax_hand_losses.append(float(loss))       # float() waits for the (asynchronous) result
    jax_hand_times.append(time.perf_counter() - start)

print(f"torch: W = {W.item():.6f}, b = {b.item():.6f}")
print(f"jax:   W = {float(params['W'][0, 0]):.6f}, b = {float(params['b'][0]):.6f}")
np.testing.assert_allclose(jax_hand_losses, torch_hand_losses, rtol=1e-5)
print("max |loss gap| over all epochs:", np.max(np.abs(np.subtract(jax_hand_losses, torch_hand_losses))))

# %%
overlay_losses({"PyTorch, by hand": torch_hand_losses, "JAX, by hand (jit)": jax_hand_losses},
               title="linear regression, the five steps by hand", xlabel="epoch", log_y=True)
plt.show()

# %% [markdown]
# ## 4. With the libraries: `nn.Module` + `torch.optim` vs Linen + optax vs NNX
#
# The twins start from one `nn.Linear(1, 1)`: its `state_dict` is converted to Flax parameters by
# `jaxllm.interop.from_torch`, which transposes `weight (out, in)` into a Flax `kernel (in, out)`.

# %%
torch.manual_seed(SEED)
torch_model = t_linear.linear_regression(1, 1)              # nn.Linear(1, 1)
config = linear.LinearConfig(num_inputs=1, num_outputs=1)
start_params = interop.from_torch(config, torch_model.state_dict())
print({k: tuple(v.shape) for k, v in torch_model.state_dict().items()}, "->",
      jax.tree_util.tree_map(jnp.shape, start_params))

# PyTorch: the model owns its weights, the optimiser holds references to them.
optimizer = torch.optim.SGD(torch_model.parameters(), lr=LR)
loss_fn = nn.MSELoss()
torch_losses, torch_times = [], []
for epoch in range(EPOCHS):
    start = time.perf_counter()
    loss = loss_fn(torch_model(x_t), y_t)     # 1-2. predict, loss
    loss.backward()                           # 3. gradient
    optimizer.step()                          # 4. update (in place)
    optimizer.zero_grad()                     # 5. reset
    torch_losses.append(loss.item())
    torch_times.append(time.perf_counter() - start)

# %% [markdown]
# In Linen the model object is only a *description*: `init` creates parameters, `apply` runs the model
# on parameters you pass in. optax is the same: `tx.init(params)` makes the optimiser state and
# `tx.update` is a pure function. The whole step is one function of `(params, opt_state, batch)`,
# compiled once. (`jaxllm.training.make_train_step` is this function, plus a `TrainState` pytree, buffer
# donation and metrics.)

# %%
flax_model = config.build()                   # LinearRegression(config): holds no weights
tx = optax.sgd(LR)


def linen_loss(params, x, y):
    return jnp.mean((flax_model.apply({"params": params}, x) - y) ** 2)


@jax.jit
def linen_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(linen_loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


params, opt_state = start_params, tx.init(start_params)
linen_losses, linen_times = [], []
for epoch in range(EPOCHS):
    start = time.perf_counter()
    params, opt_state, loss = linen_step(params, opt_state, x_np, y_np)
    linen_losses.append(float(loss))
    linen_times.append(time.perf_counter() - start)
linen_params = params

# %% [markdown]
# NNX gives back the PyTorch feel — the module holds its weights, `optimizer.update` changes them in
# place — while `nnx.jit` / `nnx.value_and_grad` split the objects into pure pytrees at the
# function boundary and merge them back afterwards.

# %%
nnx_model = nnx.Linear(1, 1, rngs=nnx.Rngs(SEED))
nnx_model.kernel[...] = start_params["kernel"]          # the same start as the twins
nnx_model.bias[...] = start_params["bias"]
nnx_optimizer = nnx.Optimizer(nnx_model, optax.sgd(LR), wrt=nnx.Param)


@nnx.jit
def nnx_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)            # in place, like optimizer.step()
    return loss


nnx_losses, nnx_times = [], []
for epoch in range(EPOCHS):
    start = time.perf_counter()
    nnx_losses.append(float(nnx_step(nnx_model, nnx_optimizer, x_np, y_np)))
    nnx_times.append(time.perf_counter() - start)

# The functional core: split the object into a static graph definition and a pytree of arrays.
graphdef, state = nnx.split(nnx_model)
print("state, a pytree of", jax.tree_util.tree_map(jnp.shape, nnx.to_pure_dict(state)))


@jax.jit
def pure_forward(state, x):                   # plain jax.jit: merge rebuilds the module inside
    return nnx.merge(graphdef, state)(x)


np.testing.assert_allclose(pure_forward(state, x_np), nnx_model(x_np), rtol=1e-6)

# %%
for name, w_, b_ in [("torch nn.Linear", torch_model.weight.item(), torch_model.bias.item()),
                     ("Linen + optax", float(linen_params["kernel"][0, 0]), float(linen_params["bias"][0])),
                     ("NNX", float(nnx_model.kernel[0, 0]), float(nnx_model.bias[0]))]:
    print(f"{name:16s} W = {w_:.6f}  b = {b_:.6f}   (true: W = 2, b = 1)")
np.testing.assert_allclose(linen_losses, torch_losses, rtol=1e-5)
np.testing.assert_allclose(nnx_losses, torch_losses, rtol=1e-5)
overlay_losses({"PyTorch nn.Linear + optim.SGD": torch_losses, "Linen + optax (jit)": linen_losses,
                "NNX + nnx.Optimizer (nnx.jit)": nnx_losses},
               title="linear regression with the libraries", xlabel="epoch", log_y=True)
plt.show()

# %% [markdown]
# ## 5. Time per step: the first call compiles
#
# The first call of a jitted function traces it and compiles it with XLA; later calls with the same
# shapes reuse the compiled code. PyTorch runs eagerly: no compilation, but every operation is a
# separate dispatch from Python. On a problem this small, dispatch overhead is all there is to
# measure — the table shows the *shape* of the costs, not the speed of either framework. `nnx.jit`'s
# steady state is slower than `jax.jit`'s here because every call walks the module in Python to
# split it into arrays and merge the results back: a fixed cost per call that a real model's compute
# hides (or avoid it: `nnx.split` once and `jax.jit` a pure function of the state, as in section 4).

# %%
display(timing_table({
    "PyTorch by hand (eager)": torch_hand_times,
    "JAX by hand (jit)": jax_hand_times,
    "PyTorch nn.Module + optim": torch_times,
    "Linen + optax (jit)": linen_times,
    "NNX (nnx.jit)": nnx_times,
}))

# %% [markdown]
# ## 6. What `jit` requires, in three cells
#
# A jitted function is **traced** once per input shape/dtype: Python runs it on abstract values and
# records the array operations. Side effects run only during tracing; a new shape means a new trace
# and a new compilation; Python `if` on a traced value is refused (use `jnp.where` / `lax.cond`).

# %%
traces = []


@jax.jit
def scaled_sum(x):
    traces.append(x.shape)                    # a Python side effect: runs only while tracing
    print("  tracing with", x)                # prints a tracer, once per shape
    jax.debug.print("  running, sum = {}", x.sum())   # staged into the computation: every call
    return 2 * x.sum()


for n in (3, 3, 4, 3):
    scaled_sum(jnp.ones(n))
print("traced for shapes:", traces)           # (3,) and (4,): two compilations for four calls

# %%
@jax.jit
def relu_if(x):
    if x > 0:                                 # Python control flow on a traced value
        return x
    return 0.0


try:
    relu_if(1.0)
except jax.errors.TracerBoolConversionError as err:
    print(type(err).__name__, "->", str(err).splitlines()[0])
print("the jit-friendly way:", jax.jit(lambda x: jnp.where(x > 0, x, 0.0))(-1.0))

# %% [markdown]
# ## 7. What differs, concretely
#
# | | PyTorch | Linen + optax | NNX |
# |---|---|---|---|
# | **where the weights live** | inside the `nn.Module` (`model.weight`) | in a pytree you pass to `apply` and get back from the step | inside the module, split into a pytree at `nnx.jit` boundaries |
# | **where gradients live** | `.grad` on each tensor, accumulated by `backward()`, reset by `zero_grad()` | a pytree returned by `jax.grad` — nothing to reset | a `State` returned by `nnx.grad` |
# | **optimiser state** | inside the optimiser object, keyed by parameter identity | `opt_state`, a pytree threaded through the step | inside `nnx.Optimizer`, updated in place |
# | **randomness** | one global generator (`torch.manual_seed`) | explicit keys (`jax.random.PRNGKey`, `split`, `fold_in`) passed in | `nnx.Rngs` objects that hold and split keys |
# | **compilation** | none (eager); `torch.compile` optional | `jax.jit` on a pure function: traced per shape, then cached | `nnx.jit` (or `jax.jit` on `split` state) |
#
# * **State.** In PyTorch the same `W` object is read and written by the forward pass, `backward()`
#   and `optimizer.step()`; the loop is a sequence of mutations. In JAX the loop is
#   `params = step(params, batch)`: every version of the parameters is a separate value, which is
#   what lets `jit` compile the step, `grad` differentiate it and (later notebooks) `shard_map`
#   split it across devices.
# * **Randomness.** `torch.randn` reads and advances hidden global state, so the numbers depend on
#   everything that ran before. In JAX a random draw is a pure function of a key; the same key gives
#   the same numbers anywhere. That is also why the twins here share weights by *copying* them —
#   the two frameworks' random generators never produce the same numbers.
# * **What jit requires.** Pure functions (side effects happen once, at trace time), static shapes (a
#   new shape recompiles — pad or bucket instead), and no Python control flow on array values.
# * **Debugging.** PyTorch is eager: `print`, `pdb` and a stack trace point at the failing line.
#   Inside `jit` a `print` shows a tracer; use `jax.debug.print` / `jax.debug.breakpoint`, run the
#   function under `with jax.disable_jit():` to step through it eagerly, inspect what was traced
#   with `jax.make_jaxpr`, and turn on `jax.config.update("jax_debug_nans", True)` to find the first
#   NaN. Out-of-range indices do not raise in compiled code (they clamp), so `jaxllm` validates
#   inputs at the Python boundary.
