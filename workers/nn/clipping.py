"""Gradient clipping: small pure functions, one mode each (after optax).

Each takes the list of gradient arrays and returns a list. A gradient the mode leaves alone is
returned as the very same array object, so `clipped[i] is grads[i]` tells whether clipping
changed it: that is how training counts clipped steps without comparing arrays.
Weights are laid out as in ONNX MatMul, [in, out]: an output unit is a column.

Every mode has one signature, (grads, threshold, total_norm, params, out), so the registry
CLIPPERS maps a mode's name straight to its function; each uses what it needs of the rest.
`total_norm` is the global norm of `grads`, computed once by clip_gradients; `params` are the
weights (adaptive clipping only).

`out`, where a function uses it, lends memory for the clipped tensors: value, norm and global
norm write a clipped tensor into out[i] (the training loop lends views of the gradients' own
memory, so scaling rewrites cache lines it has just read instead of filling new ones); the
returned list is always the result.
"""

from collections.abc import Callable, Sequence

import numpy as np

from schemas.vocabulary import ClipMode

GLOBAL_NORM_EPS = 1e-6  # PyTorch clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)
ADAPTIVE_EPS = 1e-3  # optax adaptive_grad_clip: units with tiny weights still get a budget
DIVISION_EPS = 1e-6  # optax unitwise_clip: guards the division, never engages in practice

Grads = Sequence[np.ndarray]
Arrays = list[np.ndarray]
Params = Sequence[np.ndarray] | None  # the weights, laid out as the gradients
Out = Sequence[np.ndarray] | None  # one array per gradient, or None: NumPy allocates


def global_norm(grads: Sequence[np.ndarray]) -> float:
    """2-norm of the per-tensor 2-norms: the norm of all gradients as one vector."""
    return float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads)))


def no_clip(grads: Grads, threshold: float, total_norm: float, params: Params, out: Out) -> Arrays:
    """Gradients as they are."""
    return list(grads)


def clip_by_value(
    grads: Grads, threshold: float, total_norm: float, params: Params, out: Out
) -> Arrays:
    """Every element into [-threshold, threshold] (PyTorch clip_grad_value_)."""
    return [
        np.clip(g, -threshold, threshold, out=o)
        if np.max(np.abs(g), initial=0.0) > threshold
        else g
        for g, o in zip(grads, out or [None] * len(grads), strict=True)
    ]


def clip_by_norm(
    grads: Grads, threshold: float, total_norm: float, params: Params, out: Out
) -> Arrays:
    """Each tensor whose 2-norm exceeds threshold scaled down to norm threshold (Keras clipnorm)."""
    clipped = []
    for g, o in zip(grads, out or [None] * len(grads), strict=True):
        norm = float(np.sqrt(np.vdot(g, g)))
        clipped.append(np.multiply(g, threshold / norm, out=o) if norm > threshold else g)
    return clipped


def clip_by_global_norm(
    grads: Grads, threshold: float, total_norm: float, params: Params, out: Out
) -> Arrays:
    """All tensors scaled by min(1, threshold / (total_norm + 1e-6)) (PyTorch clip_grad_norm_)."""
    coef = threshold / (total_norm + GLOBAL_NORM_EPS)
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
    grads: Grads, threshold: float, total_norm: float, params: Params, out: Out
) -> Arrays:
    """Each unit's gradient norm capped at threshold * max(|unit weights|, 1e-3)
    (Brock et al. 2021; optax adaptive_grad_clip). Makes its own arrays."""
    if params is None:
        raise ValueError("adaptive clipping needs params: the weights of each gradient")
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


Clipper = Callable[[Grads, float, float, Params, Out], Arrays]
CLIPPERS: dict[ClipMode, Clipper] = {
    "none": no_clip,
    "value": clip_by_value,
    "norm": clip_by_norm,
    "global_norm": clip_by_global_norm,
    "adaptive": adaptive_clip,
}


def clip_gradients(
    grads: Grads,
    mode: ClipMode,
    threshold: float,
    params: Params = None,
    out: Out = None,
) -> tuple[Arrays, float]:
    """Clip `grads` by `mode`; returns (clipped, global 2-norm of grads before clipping).

    `params` (the weights, same layout as grads) is needed by mode "adaptive" only; `out` lends
    memory for clipped tensors (see the module docstring; adaptive makes its own).
    """
    clip = CLIPPERS[mode]  # an unknown mode raises KeyError before any work
    total_norm = global_norm(grads)
    return clip(grads, threshold, total_norm, params, out), total_norm
