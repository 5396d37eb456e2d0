"""Magnitude pruning masks: pure NumPy, no ONNX.

A mask is a boolean array shaped like its weight, True where the weight survives. The same
functions rank single weights (unstructured) and whole neurons by their norm (structured).
"""

from collections.abc import Sequence

import numpy as np

from schemas.params import Scope


def _prune_k_smallest(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """A flat mask that prunes exactly the k smallest magnitudes (ties broken by position)."""
    pruned = np.zeros(magnitudes.size, dtype=bool)
    if k <= 0:
        return pruned
    if k >= magnitudes.size:
        pruned[:] = True
        return pruned
    kth = np.partition(magnitudes, k - 1)[k - 1]
    np.less(magnitudes, kth, out=pruned)
    missing = k - int(np.count_nonzero(pruned))
    pruned[np.flatnonzero(magnitudes == kth)[:missing]] = True
    return pruned


def count_to_prune(sparsity: float, size: int) -> int:
    """round(sparsity * size), halves rounded up: the count is exact to the nearest weight."""
    return int(np.floor(sparsity * size + 0.5))


def magnitude_masks(
    weights: Sequence[np.ndarray],
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    scope: Scope = "layer",
) -> list[np.ndarray]:
    """Keep-masks for `weights`: either the `sparsity` fraction with the smallest |w| is pruned
    (per tensor for scope "layer", across all tensors for "global"), or every |w| <= threshold.
    """
    if (sparsity is None) == (threshold is None):
        raise ValueError("give exactly one of sparsity, threshold")
    if threshold is not None:
        return [np.abs(w) > threshold for w in weights]
    assert sparsity is not None
    if scope == "layer":
        return [
            ~_prune_k_smallest(np.abs(w).ravel(), count_to_prune(sparsity, w.size)).reshape(w.shape)
            for w in weights
        ]
    magnitudes = np.concatenate([np.abs(w).ravel() for w in weights])  # [total]
    pruned = _prune_k_smallest(magnitudes, count_to_prune(sparsity, magnitudes.size))
    bounds = np.cumsum([0] + [w.size for w in weights])
    return [
        ~pruned[start:stop].reshape(w.shape)
        for w, start, stop in zip(weights, bounds[:-1], bounds[1:], strict=True)
    ]
