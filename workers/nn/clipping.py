"""Gradient clipping: small pure functions, one mode each (after optax).

Each takes the list of gradient arrays and returns a list. A gradient the mode leaves alone is
returned as the very same array object, so `clipped[i] is grads[i]` tells whether clipping
changed it: that is how training counts clipped steps without comparing arrays.

Every mode has one signature, (grads, threshold, total_norm, params, unit_axes, out), so the
registry CLIPPERS maps a mode's name straight to its function; each uses what it needs of the
rest. `total_norm` is the global norm of `grads`, computed once by clip_gradients; `params` are
the weights and `unit_axes` the axis of each weight's output units (adaptive clipping only).
Output units sit where the operator that reads the weight puts them: the last axis of an ONNX
MatMul weight [in, out] (the default, and the MLP's layout), but axis 0 of a Conv weight
[out, in, kh, kw] or of a Gemm weight with transB=1 [out, in].

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
UnitAxes = Sequence[int] | None  # per weight, the axis of its output units; None: the last axis
MATMUL_UNIT_AXIS = -1  # ONNX MatMul weights are [in, out]: a unit is a column
Out = Sequence[np.ndarray] | None  # one array per gradient, or None: NumPy allocates


def global_norm(grads: Sequence[np.ndarray]) -> float:
    """2-norm of the per-tensor 2-norms: the norm of all gradients as one vector."""
    return float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads)))


def no_clip(
    grads: Grads,
    threshold: float,
    total_norm: float,
    params: Params,
    unit_axes: UnitAxes,
    out: Out,
) -> Arrays:
    """Gradients as they are."""
    return list(grads)


def clip_by_value(
    grads: Grads,
    threshold: float,
    total_norm: float,
    params: Params,
    unit_axes: UnitAxes,
    out: Out,
) -> Arrays:
    """Every element into [-threshold, threshold] (PyTorch clip_grad_value_)."""
    return [
        np.clip(g, -threshold, threshold, out=o)
        if np.max(np.abs(g), initial=0.0) > threshold
        else g
        for g, o in zip(grads, out or [None] * len(grads), strict=True)
    ]


def clip_by_norm(
    grads: Grads,
    threshold: float,
    total_norm: float,
    params: Params,
    unit_axes: UnitAxes,
    out: Out,
) -> Arrays:
    """Each tensor whose 2-norm exceeds threshold scaled down to norm threshold (Keras clipnorm)."""
    clipped = []
    for g, o in zip(grads, out or [None] * len(grads), strict=True):
        norm = float(np.sqrt(np.vdot(g, g)))
        clipped.append(np.multiply(g, threshold / norm, out=o) if norm > threshold else g)
    return clipped


def clip_by_global_norm(
    grads: Grads,
    threshold: float,
    total_norm: float,
    params: Params,
    unit_axes: UnitAxes,
    out: Out,
) -> Arrays:
    """All tensors scaled by min(1, threshold / (total_norm + 1e-6)) (PyTorch clip_grad_norm_)."""
    coef = threshold / (total_norm + GLOBAL_NORM_EPS)
    if coef >= 1.0:
        return list(grads)
    return [
        np.multiply(g, np.asarray(coef, dtype=g.dtype), out=o)
        for g, o in zip(grads, out or [None] * len(grads), strict=True)
    ]


def unitwise_norm(x: np.ndarray, unit_axis: int) -> np.ndarray:
    """Norm of each output unit, broadcast to x's shape: the units are the slices along
    `unit_axis`, each normed over all other axes; a tensor that is a vector once squeezed
    (a bias, a norm scale, a weight with one input or one output) is one unit, as in optax."""
    if np.squeeze(x).ndim <= 1:
        squared = np.sum(x * x, keepdims=True)
    else:
        within_unit = tuple(axis for axis in range(x.ndim) if axis != unit_axis % x.ndim)
        squared = np.sum(x * x, axis=within_unit, keepdims=True)
    return np.broadcast_to(np.sqrt(squared), x.shape)


def adaptive_clip(
    grads: Grads,
    threshold: float,
    total_norm: float,
    params: Params,
    unit_axes: UnitAxes,
    out: Out,
) -> Arrays:
    """Each unit's gradient norm capped at threshold * max(|unit weights|, 1e-3)
    (Brock et al. 2021; optax adaptive_grad_clip), a unit being the slice of a weight along its
    entry of `unit_axes`. Makes its own arrays."""
    if params is None:
        raise ValueError("adaptive clipping needs params: the weights of each gradient")
    axes = [MATMUL_UNIT_AXIS] * len(grads) if unit_axes is None else unit_axes
    clipped = []
    for g, p, axis in zip(grads, params, axes, strict=True):
        g_norm = unitwise_norm(g, axis)
        max_norm = threshold * np.maximum(unitwise_norm(p, axis), ADAPTIVE_EPS)
        keep = g_norm < max_norm
        if keep.all():
            clipped.append(g)
            continue
        scaled = g * (max_norm / np.maximum(g_norm, DIVISION_EPS))
        clipped.append(np.where(keep, g, scaled).astype(g.dtype, copy=False))
    return clipped


Clipper = Callable[[Grads, float, float, Params, UnitAxes, Out], Arrays]
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
    unit_axes: UnitAxes = None,
) -> tuple[Arrays, float]:
    """Clip `grads` by `mode`; returns (clipped, global 2-norm of grads before clipping).

    `params` (the weights, same layout as grads) is needed by mode "adaptive" only, and so is
    `unit_axes` (the axis of each weight's output units; None: the last axis, as in MatMul
    [in, out]); `out` lends memory for clipped tensors (see the module docstring; adaptive makes
    its own).
    """
    clip = CLIPPERS[mode]  # an unknown mode raises KeyError before any work
    total_norm = global_norm(grads)
    return clip(grads, threshold, total_norm, params, unit_axes, out), total_norm
