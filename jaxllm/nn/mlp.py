"""The transformer's position-wise feed-forward block, with Burkov's parameter names.

* ``relu`` (Burkov ch. 4): ``relu(x @ W_1 + B_1) @ W_2 + B_2``.
* ``swiglu`` (Llama): ``(silu(x @ W_1 + B_1) * (x @ W_3 + B_3)) @ W_2 + B_2`` -- ``W_1`` is the
  gate, ``W_3`` the up projection, ``W_2`` the down projection (Meta's ``w1``/``w3``/``w2``).

All matrices are raw x@W-layout params (``(in, out)``, no transpose in ``interop``), initialised
xavier-uniform; biases ``B_*`` exist only when ``use_bias`` and start at 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxllm.nn.ops import matmul

xavier_uniform = nn.initializers.xavier_uniform()

ACTIVATIONS = ("relu", "swiglu")


class FeedForward(nn.Module):
    """x float[..., D] -> float[..., D] through a ``hidden``-wide layer."""

    hidden: int
    kind: str = "relu"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"mlp kind must be one of {ACTIVATIONS}, got {self.kind!r}")
        d = x.shape[-1]

        def linear(w_name, b_name, fan_in, fan_out, inp):
            out = matmul(inp, self.param(w_name, xavier_uniform, (fan_in, fan_out)))
            if self.use_bias:
                out = out + self.param(b_name, nn.initializers.zeros, (fan_out,))
            return out

        h = linear("W_1", "B_1", d, self.hidden, x)
        if self.kind == "relu":
            h = jax.nn.relu(h)
        else:
            h = jax.nn.silu(h) * linear("W_3", "B_3", d, self.hidden, x)
        return linear("W_2", "B_2", self.hidden, d, h)
