"""Cells of notebooks/02_logistic_mlp_cnn.ipynb (build with: python notebooks/build.py 02_logistic_mlp_cnn --execute)."""

# %% [markdown]
# # 02 · Logistic regression, an MLP and a CNN — PyTorch twins vs Flax
#
# Three classic models, each trained twice from **the same initial weights** on **the same
# batches**: by its PyTorch twin (`jaxllm.torch_ref`, written as the books write it) and by the Flax
# Linen model (`jaxllm.models`) with a pure, jitted train step. The MLP also gets a third run in
# Flax NNX.
#
# 1. Burkov ch. 1: logistic regression on the book's 12 "will buy" examples (age, income).
# 2. Raschka appendix A: the `NeuralNetwork` MLP on scikit-learn's bundled breast-cancer table,
#    next to a classical baseline.
# 3. A small CNN on scikit-learn's bundled 8×8 digits.

# %% parameters
# Sizes. The test suite runs this notebook with the values after "# test:".
LOGISTIC_EPOCHS = 1000  # test: 3
MLP_STEPS = 300  # test: 3
CNN_STEPS = 400  # test: 3
BATCH = 32  # test: 8
SEED = 0
TORCH_THREADS = 1  # tiny models gain nothing from more, and on a busy CPU idle OpenMP threads spin

# %%
import time
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import torch
from flax import nnx
from IPython.display import display
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression
from torch import nn

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bar; the text bar is fine
from jaxllm import interop
from jaxllm.data import tabular
from jaxllm.data.batches import ArrayBatches
from jaxllm.models import cnn, linear, mlp
from notebook_utils import overlay_losses, timing_table
from jaxllm.torch_ref import cnn as t_cnn, linear as t_linear, mlp as t_mlp
from jaxllm.training import OptimizerConfig, TrainState, make_optimizer, make_train_step
from jaxllm.training.losses import LOSSES

torch.set_num_threads(TORCH_THREADS)

# %% [markdown]
# ## One pair of training loops for every model
#
# The PyTorch loop is the textbook's five steps. The JAX loop calls the library's
# `make_train_step(loss_fn, optimizer)`, whose core is one pure function, jitted once with the old
# state's buffers donated:
#
# ```python
# def train_step(state, batch):
#     key = jax.random.fold_in(state.key, state.step)      # this step's randomness (dropout)
#     (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
#     updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
#     params = optax.apply_updates(state.params, updates)
#     return state.replace(params=params, opt_state=opt_state, step=state.step + 1), {"loss": loss, **aux}
# ```
#
# Both loops time each step; `float(...)` / `.item()` wait for the result, so the times are honest.

# %%
def run_torch(model, optimizer, loss_fn, batches):
    """The five steps, eagerly. batches: [(x, y) numpy arrays] -> (losses, seconds per step)."""
    model.train()
    losses, times = [], []
    for x, y in batches:
        start = time.perf_counter()
        loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y))  # predict, loss
        loss.backward()                                                   # gradient
        optimizer.step()                                                  # update
        optimizer.zero_grad()                                             # reset
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    return losses, times


def run_jax(config, loss_name, optimizer, params, batches):
    """The same batches through a jitted pure step -> (final params, losses, seconds per step)."""
    train_step = make_train_step(LOSSES[loss_name](config.apply), optimizer)
    # The step donates its input state (its buffers are reused for the output), so it gets a copy:
    # `params` itself stays usable by the caller.
    state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer, jax.random.PRNGKey(SEED))
    losses, times = [], []
    for x, y in batches:
        start = time.perf_counter()
        state, metrics = train_step(state, {"x": x, "y": y})
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - start)
    return state.params, losses, times


def accuracy(predicted, labels):
    return float(np.mean(np.asarray(predicted) == np.asarray(labels)))

# %% [markdown]
# ## 1. Logistic regression (Burkov ch. 1)
#
# The book's model is `nn.Sequential(nn.Linear(2, 1), nn.Sigmoid())` trained with `BCELoss` and
# `SGD(lr=0.001)` on raw (unscaled) features. We train on the logits with `BCEWithLogitsLoss` (the
# numerically stable form: a sigmoid followed by a log saturates on raw incomes of 25–95) and keep
# the book's sigmoid for prediction. The Flax model is `LogisticRegression`, whose only layer is
# named `"0"` so that `interop` maps it to the twin's `0.weight` / `0.bias`.

# %%
x_buy, y_buy = tabular.will_buy()
torch.manual_seed(SEED)
book_model = t_linear.logistic_regression(2)                 # Linear(2, 1) -> Sigmoid
logistic_config = linear.LogisticConfig(num_inputs=2)
logistic_params = interop.from_torch(logistic_config, book_model.state_dict())
print("torch:", {k: tuple(v.shape) for k, v in book_model.state_dict().items()})
print("flax: ", jax.tree_util.tree_map(jnp.shape, logistic_params))

full_batch = [(x_buy, y_buy)] * LOGISTIC_EPOCHS             # full-batch gradient descent, as the book


def bce_on_logits(logits, y):
    return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float())


book_logits = book_model[:-1]                                # everything but the final Sigmoid
torch_losses, torch_times = run_torch(book_logits, torch.optim.SGD(book_model.parameters(), lr=0.001),
                                      bce_on_logits, full_batch)
jax_params, jax_losses, jax_times = run_jax(logistic_config, "binary", make_optimizer(OptimizerConfig("sgd", lr=0.001)),
                                            logistic_params, full_batch)
np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-4)

# %%
overlay_losses({"PyTorch nn.Sequential + SGD": torch_losses, "Flax LogisticRegression + optax": jax_losses},
               title="logistic regression, will-buy data", xlabel="epoch", log_y=True)
plt.show()
with torch.no_grad():
    torch_proba = book_model(torch.from_numpy(x_buy))[:, 0].numpy()    # the book's model: sigmoid outputs
jax_proba = np.asarray(linear.predict_proba(jax.jit(logistic_config.apply)(jax_params, x_buy)))
print(" age income  bought   P(buy) torch   P(buy) jax")
for (age, income), label, pt, pj in zip(x_buy, y_buy, torch_proba, jax_proba):
    print(f"{age:4.0f} {income:6.0f} {label:7d} {pt:14.4f} {pj:12.4f}")
print(f"accuracy: torch {accuracy(torch_proba > 0.5, y_buy):.3f}, jax {accuracy(jax_proba > 0.5, y_buy):.3f}")
display(timing_table({"PyTorch (eager)": torch_times, "JAX (jit)": jax_times}))

# %% [markdown]
# ## 2. An MLP (Raschka appendix A), in three styles
#
# `NeuralNetwork(30, 2)`: `Linear(30, 30) → ReLU → Linear(30, 20) → ReLU → Linear(20, 2)` on the
# breast-cancer table (569 rows, 30 standardised features, 80/20 stratified split). The mini-batches
# are drawn once by `ArrayBatches` (a seeded shuffle) and fed to every style, so the three runs see
# the same numbers in the same order.

# %%
(x_train, y_train), (x_test, y_test) = tabular.breast_cancer(seed=SEED)
batcher = ArrayBatches({"x": x_train, "y": y_train}, BATCH, seed=SEED)
mlp_batches = [(b["x"], b["y"]) for b in (batcher.next() for _ in range(MLP_STEPS))]
print(f"train {x_train.shape}, test {x_test.shape}; {MLP_STEPS} steps of {BATCH} rows "
      f"({MLP_STEPS / batcher.steps_per_epoch:.1f} epochs)")

torch.manual_seed(SEED)
torch_mlp = t_mlp.NeuralNetwork(30, 2)
mlp_config = mlp.raschka_appendix_a(30, 2)
mlp_params = interop.from_torch(mlp_config, torch_mlp.state_dict())   # layers.0.weight -> layers_0/kernel (transposed)

torch_mlp_losses, torch_mlp_times = run_torch(
    torch_mlp, torch.optim.SGD(torch_mlp.parameters(), lr=0.1, momentum=0.9), nn.functional.cross_entropy,
    [(x, y.astype(np.int64)) for x, y in mlp_batches])
jax_mlp_params, jax_mlp_losses, jax_mlp_times = run_jax(
    mlp_config, "softmax", make_optimizer(OptimizerConfig("sgd", lr=0.1, momentum=0.9)), mlp_params, mlp_batches)

# %% [markdown]
# **NNX.** The same network written the PyTorch way — layers built in `__init__`, weights stored on
# the object — and trained with `nnx.Optimizer`. Under `nnx.jit` the module is split into a static
# graph and a pytree of arrays, the pure step runs, and the new arrays are written back into the
# object. Its state tree has the same leaves as the Linen params, under different names.

# %%
class NNXNeuralNetwork(nnx.Module):
    def __init__(self, num_inputs, num_outputs, *, rngs):
        widths = (num_inputs, 30, 20, num_outputs)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])

    def __call__(self, x):
        *hidden, last = self.layers
        for layer in hidden:
            x = jax.nn.relu(layer(x))
        return last(x)


nnx_mlp = NNXNeuralNetwork(30, 2, rngs=nnx.Rngs(SEED))
for i, layer in enumerate(nnx_mlp.layers):                  # the same start as the twins
    layer.kernel[...] = mlp_params[f"layers_{2 * i}"]["kernel"]
    layer.bias[...] = mlp_params[f"layers_{2 * i}"]["bias"]
print("torch state_dict:", list(torch_mlp.state_dict()))
print("Linen params:    ", [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(mlp_params)[0]])
print("NNX state:       ", [jax.tree_util.keystr(p) for p, _ in
                            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(nnx_mlp, nnx.Param)))[0]])

nnx_optimizer = nnx.Optimizer(nnx_mlp, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)


@nnx.jit
def nnx_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


nnx_mlp_losses, nnx_mlp_times = [], []
for x, y in mlp_batches:
    start = time.perf_counter()
    nnx_mlp_losses.append(float(nnx_step(nnx_mlp, nnx_optimizer, x, y)))
    nnx_mlp_times.append(time.perf_counter() - start)

# %%
overlay_losses({"PyTorch NeuralNetwork + SGD": torch_mlp_losses, "Linen MLP + optax": jax_mlp_losses,
                "NNX + nnx.Optimizer": nnx_mlp_losses},
               title="MLP on breast cancer (SGD, momentum 0.9)", log_y=True)
plt.show()
print("max |loss gap|: linen", np.max(np.abs(np.subtract(jax_mlp_losses, torch_mlp_losses))),
      " nnx", np.max(np.abs(np.subtract(nnx_mlp_losses, torch_mlp_losses))))
np.testing.assert_allclose(jax_mlp_losses[:10], torch_mlp_losses[:10], rtol=1e-4)  # the parity tests' bar
np.testing.assert_allclose(nnx_mlp_losses[:10], torch_mlp_losses[:10], rtol=1e-4)

with torch.no_grad():
    torch_pred = torch_mlp(torch.from_numpy(x_test)).argmax(-1).numpy()
baseline = SklearnLogisticRegression(max_iter=1000).fit(x_train, y_train)
print(f"test accuracy: PyTorch {accuracy(torch_pred, y_test):.3f}, "
      f"Linen {accuracy(jax.jit(mlp_config.apply)(jax_mlp_params, x_test).argmax(-1), y_test):.3f}, "
      f"NNX {accuracy(nnx_mlp(x_test).argmax(-1), y_test):.3f}; "
      f"classical baseline (scikit-learn logistic regression) {baseline.score(x_test, y_test):.3f}")
display(timing_table({"PyTorch (eager)": torch_mlp_times, "Linen (jit)": jax_mlp_times,
                      "NNX (nnx.jit)": nnx_mlp_times}))

# %% [markdown]
# ## 3. A small CNN on 8×8 digits
#
# `conv(1→16, 3×3) → ReLU → max-pool → conv(16→32) → ReLU → max-pool → Linear(128, 64) → ReLU →
# Linear(64, 10)`, AdamW (learning rate 1e-3, weight decay 0.01 passed explicitly to both: optax
# and torch have different defaults). PyTorch convolutions are NCHW with weights
# `(out, in, kh, kw)`; Flax's are NHWC with kernels `(kh, kw, in, out)`. `interop` permutes the
# kernels, and the Flax model moves channels first before flattening so `fc1` sees features in the
# twin's order.

# %%
(digits_train, digits_train_y), (digits_test, digits_test_y) = tabular.digits8x8(seed=SEED)
digit_batcher = ArrayBatches({"x": digits_train, "y": digits_train_y}, BATCH, seed=SEED)
cnn_batches = [(b["x"], b["y"]) for b in (digit_batcher.next() for _ in range(CNN_STEPS))]

cnn_config = cnn.digits8x8()
torch.manual_seed(SEED)
torch_cnn = t_cnn.from_config(cnn_config)
cnn_params = interop.from_torch(cnn_config, torch_cnn.state_dict())
print("conv1: torch", tuple(torch_cnn.conv1.weight.shape), "(out, in, kh, kw) -> flax",
      cnn_params["conv1"]["kernel"].shape, "(kh, kw, in, out)")

adamw = OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)
torch_cnn_losses, torch_cnn_times = run_torch(
    torch_cnn, torch.optim.AdamW(torch_cnn.parameters(), lr=1e-3, weight_decay=0.01), nn.functional.cross_entropy,
    [(x, y.astype(np.int64)) for x, y in cnn_batches])
jax_cnn_params, jax_cnn_losses, jax_cnn_times = run_jax(cnn_config, "softmax", make_optimizer(adamw), cnn_params,
                                                        cnn_batches)

# %% [markdown]
# The first ten steps agree to 1e-4 (the bar of the repository's parity tests; the gradients at the
# start agree to ~1e-8). Over hundreds of steps the gap grows: XLA and PyTorch add up float32 sums in
# different orders, and training amplifies those last-bit differences — a pre-activation near 0
# flips a ReLU, and Adam divides small gradients by their small running RMS. The curves still lie on
# top of each other; the right panel shows by how much they do not.

# %%
overlay_losses({"PyTorch ConvNet + AdamW": torch_cnn_losses, "Flax CNN + optax.adamw": jax_cnn_losses},
               title="CNN on 8x8 digits", log_y=True)
plt.show()
print("max |loss gap|:", np.max(np.abs(np.subtract(jax_cnn_losses, torch_cnn_losses))))
np.testing.assert_allclose(jax_cnn_losses[:10], torch_cnn_losses[:10], rtol=1e-4)
torch_cnn.eval()
with torch.no_grad():
    torch_digits = torch_cnn(torch.from_numpy(digits_test)).argmax(-1).numpy()
jax_digits = jax.jit(cnn_config.apply)(jax_cnn_params, digits_test).argmax(-1)
print(f"test accuracy on {len(digits_test)} digits: PyTorch {accuracy(torch_digits, digits_test_y):.3f}, "
      f"JAX {accuracy(jax_digits, digits_test_y):.3f}; predictions differ on "
      f"{int(np.sum(torch_digits != np.asarray(jax_digits)))} images")
display(timing_table({"PyTorch (eager)": torch_cnn_times, "JAX (jit)": jax_cnn_times}))

# %% [markdown]
# ## What differs, concretely
#
# * **Where state lives.** The PyTorch twins keep weights in modules and AdamW's moments inside the
#   optimiser object, keyed by parameter identity; `model.train()` / `model.eval()` flip a flag on
#   the module. The Flax runs keep everything in one `TrainState` pytree (`params`, `opt_state`,
#   `step`, `key`) that the step takes and returns — you can print it, save it with orbax, or
#   compare it leaf by leaf with the twin's `state_dict` through `interop.to_torch`. NNX sits in
#   between: state on objects, converted to pytrees at each `nnx.jit` call.
# * **How randomness flows.** The twins' weights come from `torch.manual_seed` and are *copied* to
#   Flax; the batches come from a seeded NumPy shuffle, drawn once and fed to both. Inside
#   `make_train_step` the step's key is `fold_in(state.key, state.step)`, so a resumed run draws
#   the same dropout masks (none here) as an uninterrupted one.
# * **What jit requires.** Every batch has the same shape (`ArrayBatches` drops the last partial
#   batch), so the step compiles once; the first-call column of the tables is that compilation. A
#   last batch of a different size would compile a second program — pad, or drop it.
# * **Layouts.** Same numbers, different memory layouts: `nn.Linear.weight` is `(out, in)` and a
#   Flax kernel `(in, out)`; conv weights are OIHW vs HWIO. `jaxllm.interop` converts by one naming
#   rule, and the curves above coincide because the converted weights are the same function.
# * **Debugging.** For an eager model, `print(x.shape)` inside `forward` works. For a Flax model, the
#   quickest checks are outside the compiled step: `model.apply(params, x)` runs un-jitted,
#   `jax.eval_shape` gives every output shape without computing anything, and
#   `jax.tree_util.tree_map(jnp.shape, params)` shows the parameter tree. The gap plots show how far
#   float32 round-off lets the twins drift: ~1e-7 at first, growing where training amplifies it
#   (the CNN under AdamW much more than the MLP under SGD here).
