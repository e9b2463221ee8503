"""Mixed precision as a transform of the loss function.

``mixed_precision(loss_fn, "bfloat16")`` returns a loss function that casts every floating
parameter (and the model's floating inputs) to bfloat16 on entry, so the model's matmuls and
activations run in bfloat16, and casts the loss and its metrics back to float32 on exit. The
*master* weights stay float32: the train step differentiates with respect to the float32
params, and the gradient of a cast is a cast back, so gradients, the optimiser state and the
update all stay float32. Nothing else in the train step changes.

Integer arrays (token ids, labels) are never touched. What needs float32's precision gets it:
the norms compute in float32 and cast back, and the outputs of the outermost Flax module (the
logits) are cast to float32 on their way out of ``apply`` (a ``flax.linen.intercept_methods``
hook, active only while the loss function is traced, that also casts that module's float
inputs to bfloat16), so the softmax, the cross-entropy and the target counts that weigh means
across devices and micro-batches are all float32.

bfloat16 keeps float32's exponent range, so unlike float16 it needs no loss scaling.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name) -> jnp.dtype:
    """``"float32" | "bfloat16"`` (or such a dtype) -> the jnp dtype; ``ValueError`` otherwise.
    (float16 would need loss scaling, which this module does not do.)"""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
        return jnp.dtype(DTYPES[name])
    dtype = jnp.dtype(name)
    if dtype not in [jnp.dtype(d) for d in DTYPES.values()]:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype}")
    return dtype


def cast_floats(tree, dtype):
    """Every floating-point leaf of ``tree`` cast to ``dtype``; other leaves (ints, bools, keys) unchanged."""
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree_util.tree_map(cast, tree)


def _model_boundary(dtype):
    """A ``flax.linen.intercept_methods`` hook for the outermost module's ``__call__`` (the one
    whose parent is a Scope, not a Module): float arguments in ``dtype``, float outputs in float32.
    Inner modules are untouched."""
    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or isinstance(context.module.parent, nn.Module):
            return next_fun(*args, **kwargs)
        return cast_floats(next_fun(*cast_floats(args, dtype), **cast_floats(kwargs, dtype)), jnp.float32)

    return intercept


def mixed_precision(loss_fn: Callable, dtype="bfloat16") -> Callable:
    """``loss_fn(params, batch, key) -> (loss, aux)`` computed in ``dtype``, answered in float32.

    params: the float32 pytree, cast to ``dtype`` on entry (so gradients come back float32);
    batch: passed through unchanged -- the float inputs of the Flax model applied inside are cast
    to ``dtype`` at its ``__call__`` and its outputs come back float32 (see the module docstring),
    so targets keep their precision; returns ``(float32[] loss, aux)`` with every float in
    ``aux`` float32. With ``dtype`` float32 the loss function is returned unchanged.
    """
    dtype = compute_dtype(dtype)
    if dtype == jnp.float32:
        return loss_fn
    boundary = _model_boundary(dtype)

    def low_precision_loss(params, batch, key):
        with nn.intercept_methods(boundary):  # active while tracing: costs nothing at run time
            loss, aux = loss_fn(cast_floats(params, dtype), batch, key)
        return cast_floats(loss, jnp.float32), cast_floats(aux, jnp.float32)

    return low_precision_loss
