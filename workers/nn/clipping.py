"""Gradient clipping: small pure functions, one mode each (after optax).

Each takes the list of gradient arrays and returns a list. A gradient the mode leaves alone is
returned as the very same array object, so `clipped[i] is grads[i]` tells whether clipping
changed it: that is how training counts clipped steps without comparing arrays.
Weights are laid out as in ONNX MatMul, [in, out]: an output unit is a column.

`out`, where a function takes it, lends memory for the clipped tensors: value, norm and global
norm write a clipped tensor into out[i] (the training loop lends views of the gradients' own
memory, so scaling rewrites cache lines it has just read instead of filling new ones); the
returned list is always the result.
"""

from collections.abc import Sequence
from typing import Literal

import numpy as np

ClipMode = Literal["none", "value", "norm", "global_norm", "adaptive"]

GLOBAL_NORM_EPS = 1e-6  # PyTorch clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)
ADAPTIVE_EPS = 1e-3  # optax adaptive_grad_clip: units with tiny weights still get a budget
DIVISION_EPS = 1e-6  # optax unitwise_clip: guards the division, never engages in practice

Arrays = list[np.ndarray]
Out = Sequence[np.ndarray] | None  # one array per gradient, or None: NumPy allocates


def global_norm(grads: Sequence[np.ndarray]) -> float:
    """2-norm of the per-tensor 2-norms: the norm of all gradients as one vector."""
    return float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads)))


def clip_by_value(grads: Sequence[np.ndarray], threshold: float, out: Out = None) -> Arrays:
    """Every element into [-threshold, threshold] (PyTorch clip_grad_value_)."""
    return [
        np.clip(g, -threshold, threshold, out=o)
        if np.max(np.abs(g), initial=0.0) > threshold
        else g
        for g, o in zip(grads, out or [None] * len(grads), strict=True)
    ]


def clip_by_norm(grads: Sequence[np.ndarray], threshold: float, out: Out = None) -> Arrays:
    """Each tensor whose 2-norm exceeds threshold scaled down to norm threshold (Keras clipnorm)."""
    clipped = []
    for g, o in zip(grads, out or [None] * len(grads), strict=True):
        norm = float(np.sqrt(np.vdot(g, g)))
        clipped.append(np.multiply(g, threshold / norm, out=o) if norm > threshold else g)
    return clipped


def clip_by_global_norm(
    grads: Sequence[np.ndarray],
    threshold: float,
    total_norm: float | None = None,
    out: Out = None,
) -> Arrays:
    """All tensors scaled by min(1, threshold / (total_norm + 1e-6)) (PyTorch clip_grad_norm_)."""
    total = global_norm(grads) if total_norm is None else total_norm
    coef = threshold / (total + GLOBAL_NORM_EPS)
    if coef >= 1.0:
        return list(grads)
    return [
        np.multiply(g, np.asarray(coef, dtype=g.dtype), out=o)
        for g, o in zip(grads, out or [None] * len(grads), strict=True)
    ]


def unitwise_norm(x: np.ndarray) -> np.ndarray:
    """Norm of each output unit, broadcast to x's shape: a vector is one unit; an [in, out]
    matrix has a unit per column; a 4-D conv kernel (HWIO) one per output channel."""
    if np.squeeze(x).ndim <= 1:
        squared = np.sum(x * x, keepdims=True)
    elif x.ndim in (2, 3):
        squared = np.sum(x * x, axis=0, keepdims=True)
    elif x.ndim == 4:
        squared = np.sum(x * x, axis=(0, 1, 2), keepdims=True)
    else:
        raise ValueError(f"adaptive clipping takes tensors of 1 to 4 dimensions, got {x.shape}")
    return np.broadcast_to(np.sqrt(squared), x.shape)


def adaptive_clip(
    grads: Sequence[np.ndarray], params: Sequence[np.ndarray], threshold: float
) -> Arrays:
    """Each unit's gradient norm capped at threshold * max(|unit weights|, 1e-3)
    (Brock et al. 2021; optax adaptive_grad_clip)."""
    clipped = []
    for g, p in zip(grads, params, strict=True):
        g_norm = unitwise_norm(g)
        max_norm = threshold * np.maximum(unitwise_norm(p), ADAPTIVE_EPS)
        keep = g_norm < max_norm
        if keep.all():
            clipped.append(g)
            continue
        scaled = g * (max_norm / np.maximum(g_norm, DIVISION_EPS))
        clipped.append(np.where(keep, g, scaled).astype(g.dtype, copy=False))
    return clipped


def clip_gradients(
    grads: Sequence[np.ndarray],
    mode: ClipMode,
    threshold: float,
    params: Sequence[np.ndarray] | None = None,
    out: Out = None,
) -> tuple[Arrays, float]:
    """Clip `grads` by `mode`; returns (clipped, global 2-norm of grads before clipping).

    `params` (the weights, same layout as grads) is needed by mode "adaptive" only; `out` lends
    memory for clipped tensors (see the module docstring; adaptive makes its own).
    """
    total_norm = global_norm(grads)
    if mode == "none":
        return list(grads), total_norm
    if mode == "value":
        return clip_by_value(grads, threshold, out), total_norm
    if mode == "norm":
        return clip_by_norm(grads, threshold, out), total_norm
    if mode == "global_norm":
        return clip_by_global_norm(grads, threshold, total_norm, out), total_norm
    if mode == "adaptive":
        if params is None:
            raise ValueError("adaptive clipping needs params: the weights of each gradient")
        return adaptive_clip(grads, params, threshold), total_norm
    raise ValueError(f"unknown clipping mode {mode!r}")
