"""The five steps by hand, functional style: the twin of ``torch_ref.linear.fit_by_hand``.

predict, loss, gradient (``jax.grad`` instead of ``loss.backward()``), update (a pure
``p - lr * g`` instead of ``W -= lr * W.grad``) and reset (nothing to reset: gradients are
values returned by a function, not state accumulated on tensors).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mse(params, x, y):
    pred = x @ params["W"] + params["b"]          # 1. predict
    return jnp.mean((pred - y) ** 2)              # 2. loss


@jax.jit
def _sgd_step(params, x, y, lr):
    loss, grads = jax.value_and_grad(mse)(params, x, y)                       # 3. gradient
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), loss  # 4. update


def fit_by_hand(x, y, W, b, *, lr: float, epochs: int):
    """x: float32[n, in], y: float32[n, out], W: [in, out], b: [out] -> (W, b, losses per epoch)."""
    params = {"W": jnp.asarray(W, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    losses = []
    for _ in range(epochs):
        params, loss = _sgd_step(params, x, y, lr)  # 5. reset: nothing to do
        losses.append(loss)
    return params["W"], params["b"], [float(v) for v in jax.device_get(losses)]
