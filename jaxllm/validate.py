"""Checks at the Python boundary, before anything is jitted.

Compiled JAX code cannot raise on values and silently clamps or drops out-of-range indices, so
every public entry point checks its inputs here and raises a ``ValueError`` that names what was
expected.
"""

from __future__ import annotations

import numpy as np


def check_features(x, num_features: int, *, name: str = "x") -> np.ndarray:
    """``x`` must be a finite float array of shape ``[batch, num_features]``."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != num_features:
        raise ValueError(
            f"{name} must have shape [batch, {num_features}] (the model was built for "
            f"{num_features} features), got shape {tuple(x.shape)}"
        )
    return check_finite(x, name=name)


def check_images(x, height: int, width: int, *, name: str = "images") -> np.ndarray:
    """``x`` must be finite grayscale images ``[batch, height, width]`` or ``[batch, height, width, 1]``."""
    x = np.asarray(x)
    ok = (x.ndim == 3 and x.shape[1:] == (height, width)) or (
        x.ndim == 4 and x.shape[1:] == (height, width, 1)
    )
    if not ok:
        raise ValueError(
            f"{name} must have shape [batch, {height}, {width}] or [batch, {height}, {width}, 1] "
            f"(grayscale, channels last), got shape {tuple(x.shape)}"
        )
    return check_finite(x, name=name)


def check_finite(x, *, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); inputs must be finite")
    return x


def check_labels(y, num_classes: int, *, name: str = "labels", batch: int | None = None) -> np.ndarray:
    """``y`` must be integer class ids in ``[0, num_classes)`` (for binary: 0 or 1)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class ids, got shape {tuple(y.shape)}")
    if batch is not None and y.shape[0] != batch:
        raise ValueError(f"{name} has {y.shape[0]} entries but the inputs have {batch} rows")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name} must be whole numbers in [0, {num_classes - 1}], got non-integers")
    elif not np.issubdtype(y.dtype, np.integer) and y.dtype != bool:
        raise ValueError(f"{name} must be integer class ids, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes - 1}] ({num_classes} classes), "
            f"got values from {y.min()} to {y.max()}"
        )
    return y.astype(np.int32)


def check_targets(y, num_outputs: int, *, name: str = "targets", batch: int | None = None) -> np.ndarray:
    """Regression targets: finite floats ``[batch, num_outputs]`` (a 1-D array is taken as one output)."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim == 1 and num_outputs == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != num_outputs:
        raise ValueError(f"{name} must have shape [batch, {num_outputs}], got {tuple(y.shape)}")
    if batch is not None and y.shape[0] != batch:
        raise ValueError(f"{name} has {y.shape[0]} rows but the inputs have {batch}")
    return check_finite(y, name=name)


def check_token_ids(ids, vocab_size: int, *, name: str = "token ids") -> np.ndarray:
    """Token ids must be integers in ``[0, vocab_size)``: a Flax ``Embed`` would return NaN for
    an id >= vocab and silently wrap a negative one, so out-of-range ids are refused here."""
    ids = np.asarray(ids)
    if ids.size == 0:
        raise ValueError(f"{name} are empty")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{name} must lie in [0, {vocab_size - 1}] (vocabulary of {vocab_size}), got values from {lo} to {hi}"
        )
    return ids.astype(np.int32)


def check_token_batch(tokens, vocab_size: int, *, max_time: int | None = None) -> np.ndarray:
    """A language model's input: int ids ``[batch, time]`` in ``[0, vocab_size)`` (and ``time <=
    max_time`` when the model has a context limit); returns int32."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, time], got shape {tuple(tokens.shape)}")
    if max_time is not None and tokens.shape[1] > max_time:
        raise ValueError(f"{tokens.shape[1]} tokens exceed the context_length of {max_time}")
    return check_token_ids(tokens, vocab_size, name="tokens")


def check_concrete_token_ids(tokens, vocab_size: int, *, name: str = "tokens") -> None:
    """A model's ``__call__`` check: concrete token ids must be integers in ``[0, vocab_size)``.

    Traced ids (inside ``jit``, ``vmap``, ``eval_shape``...) are the caller's promise and pass
    unchecked: compiled code cannot raise on values, and XLA silently clamps (or, for a Flax
    ``Embed``, returns NaN for) an out-of-range lookup. Concrete arrays are read on the host in their
    own dtype, before any cast, so an int64 ``2**32 + 1`` is refused rather than wrapped to 1."""
    import jax

    if isinstance(tokens, jax.core.Tracer):
        return
    ids = np.asarray(tokens)
    if ids.size == 0 and np.issubdtype(ids.dtype, np.integer):
        return
    check_token_ids(ids, vocab_size, name=name)

