"""Sliding next-token windows over a token stream (Raschka ch. 2, ``GPTDatasetV1``).

The result is a dict of arrays that ``ArrayBatches(windows, batch_size, seed=...)`` shuffles
deterministically and resumes from a saved position.
"""

from __future__ import annotations

import numpy as np

from jaxllm.validate import check_token_ids


def lm_windows(ids, context: int, stride: int, *, vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """``{"inputs": int32[n, context], "targets": int32[n, context]}`` from ``ids: int[length]``.

    Window ``k`` starts at ``i = k * stride``: ``inputs = ids[i:i + context]`` and
    ``targets = ids[i + 1:i + context + 1]`` (inputs shifted by one), for every ``i`` with
    ``i + context < length``, so ``n = (length - context - 1) // stride + 1``. With
    ``vocab_size`` the ids must lie in ``[0, vocab_size)``. The arrays are read-only views
    of one copy of ``ids`` (``ArrayBatches`` copies the rows of each batch).
    """
    if context < 1 or stride < 1:
        raise ValueError(f"context and stride must be >= 1, got context={context}, stride={stride}")
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {ids.shape}")
    if vocab_size is not None:
        ids = check_token_ids(ids, vocab_size)
    elif ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if len(ids) <= context:
        raise ValueError(
            f"context {context} needs at least {context + 1} tokens (inputs plus the shifted target), "
            f"but the data has {len(ids)} tokens"
        )
    # Read-only strided views into one int32 copy of the stream, not n copies of each window:
    # stride 1 over a million tokens would otherwise take gigabytes. Batching gathers copies.
    rows = np.lib.stride_tricks.sliding_window_view(ids.astype(np.int32), context + 1)[::stride]
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
