"""Magnitude pruning masks: pure NumPy, no ONNX.

A mask is a boolean array shaped like its weight, True where the weight survives. The same
functions rank single weights (unstructured) and whole neurons by their norm (structured).

The k smallest magnitudes are found without holding them all at once: a 67M-parameter model's
magnitudes are as large as the model, and pruning must fit in a small multiple of its size.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from schemas.vocabulary import Scope

CHUNK = 1 << 20  # elements per step of a pass: temporaries stay a few MB, whatever the model
BUCKET_BITS = 16


@dataclass(frozen=True)
class Cut:
    """Prunes every magnitude below `value`, and the first `ties` magnitudes equal to it in
    the order the weights are visited: exactly k, ties broken by position."""

    value: float
    ties: int


def count_to_prune(sparsity: float, size: int) -> int:
    """round(sparsity * size), halves rounded up: the count is exact to the nearest weight."""
    return int(np.floor(sparsity * size + 0.5))


def _flat_chunks(weight: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """|w| of one weight, flat, CHUNK elements at a time, with where each chunk starts."""
    flat = weight.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        yield start, np.abs(flat[start : start + CHUNK])


def _chunks(weights: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    """|w| of every weight, flat, in order, CHUNK elements at a time."""
    for weight in weights:
        for _, magnitudes in _flat_chunks(weight):
            yield magnitudes


def _buckets(magnitudes: np.ndarray) -> np.ndarray:
    """The leading bits of each magnitude's float32 pattern. For floats >= 0 the pattern orders
    as the value does, and rounding to float32 keeps that order (never reverses it), so bucket b
    holds only magnitudes smaller than those of bucket b + 1. Float32 weights, nearly all of
    them, are viewed without a copy; a float64 beyond float32's range becomes inf, the top
    bucket, where it still orders above every finite one."""
    with np.errstate(over="ignore"):
        patterns = magnitudes.astype(np.float32, copy=False).view(np.uint32)
    return patterns >> (32 - BUCKET_BITS)


def smallest_cut(weights: Sequence[np.ndarray], sparsity: float) -> Cut:
    """The cut that prunes exactly the `sparsity` share of all |w| across `weights`, smallest
    first (finite values).

    Two passes over the weights: a histogram of magnitude buckets finds the bucket holding the
    k-th smallest, then only that bucket's magnitudes are gathered and partitioned.
    """
    counts = np.zeros(1 << BUCKET_BITS, dtype=np.int64)
    for chunk in _chunks(weights):
        counts += np.bincount(_buckets(chunk), minlength=counts.size)
    k = count_to_prune(sparsity, int(counts.sum()))
    if k <= 0:
        return Cut(value=0.0, ties=0)  # no magnitude is below 0
    if k >= counts.sum():
        return Cut(value=np.inf, ties=0)  # every finite magnitude is below inf
    at_or_below = np.cumsum(counts)
    bucket = int(np.searchsorted(at_or_below, k))  # the first bucket reaching k
    below = int(at_or_below[bucket] - counts[bucket])
    inside = np.concatenate([chunk[_buckets(chunk) == bucket] for chunk in _chunks(weights)])
    value = np.partition(inside, k - below - 1)[k - below - 1]
    smaller = below + int(np.count_nonzero(inside < value))
    return Cut(value=value, ties=k - smaller)


def _mask(weight: np.ndarray, cut: Cut, ties: int) -> tuple[np.ndarray, int]:
    """The keep-mask of one weight, pruning at most `ties` of its |w| == cut.value (the first
    ones); and how many ties it pruned. Made CHUNK elements at a time: the mask is a quarter of
    a float32 weight, its magnitudes would be all of it."""
    keep = np.empty(weight.shape, dtype=bool)
    flat_keep, tied = keep.reshape(-1), 0
    for start, magnitudes in _flat_chunks(weight):
        piece = flat_keep[start : start + magnitudes.size]
        np.greater_equal(magnitudes, cut.value, out=piece)
        if tied < ties:
            at_cut = np.flatnonzero(magnitudes == cut.value)[: ties - tied]
            piece[at_cut] = False
            tied += at_cut.size
    return keep, tied


def _above(weight: np.ndarray, threshold: float) -> np.ndarray:
    """|w| > threshold, CHUNK elements at a time."""
    keep = np.empty(weight.shape, dtype=bool)
    flat_keep = keep.reshape(-1)
    for start, magnitudes in _flat_chunks(weight):
        np.greater(magnitudes, threshold, out=flat_keep[start : start + magnitudes.size])
    return keep


def _masks_under(weights: Sequence[np.ndarray], cut: Cut) -> Iterator[np.ndarray]:
    """Keep-masks of `weights` under one cut, visited in order (ties broken by position). Only
    the mask outlives each step, so a lazy `weights` holds one tensor at a time."""
    ties_left = cut.ties
    for index in range(len(weights)):
        keep, tied = _mask(weights[index], cut, ties_left)
        ties_left -= tied
        yield keep


def layer_masks(weights: Sequence[np.ndarray], sparsity: float) -> Iterator[np.ndarray]:
    """The `sparsity` share of each tensor's smallest |w|, tensor by tensor."""
    for weight in weights:  # each tensor is read once: its passes reuse it
        yield from _masks_under([weight], smallest_cut([weight], sparsity))


def global_masks(weights: Sequence[np.ndarray], sparsity: float) -> Iterator[np.ndarray]:
    """The `sparsity` share of the smallest |w| across all tensors, under one cut."""
    yield from _masks_under(weights, smallest_cut(weights, sparsity))


SCOPES: dict[Scope, Callable[[Sequence[np.ndarray], float], Iterator[np.ndarray]]] = {
    "layer": layer_masks,
    "global": global_masks,
}


def magnitude_masks(
    weights: Sequence[np.ndarray],
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    scope: Scope = "layer",
) -> Iterator[np.ndarray]:
    """Keep-masks for `weights`, one at a time in order: either the `sparsity` fraction with the
    smallest |w| is pruned (per tensor for scope "layer", across all tensors for "global"), or
    every |w| <= threshold.

    `weights` is read again on each pass, so it may be a sequence that loads each tensor when
    indexed: then only one tensor is in memory at a time.
    """
    if (sparsity is None) == (threshold is None):
        raise ValueError("give exactly one of sparsity, threshold")
    if threshold is not None:
        return (_above(w, threshold) for w in weights)
    assert sparsity is not None
    return SCOPES[scope](weights, sparsity)
