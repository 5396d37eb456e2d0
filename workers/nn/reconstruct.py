"""Calibration maths in NumPy: input statistics, the Wanda mask and layer-wise reconstruction.

Every layer is seen the same way here, whatever op holds it: a weight matrix W [out, in] that
maps an input row x [in] to W x, and the calibration inputs X [n, in] of that layer. A Conv is
the same after im2col (in = channels/groups x kh x kw, one row per output pixel), one matrix
per group.

Only H = XᵀX [in, in] (float64) is kept, accumulated chunk by chunk: every quantity below
(Wanda's ‖x_j‖₂ = sqrt(H_jj), the error ‖(W - Ŵ) X‖² = Σ_r d_r H d_rᵀ, the least-squares
normal equations, SparseGPT's inverse Hessian) needs nothing else.

References: Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs");
SparseGPT (Frantar & Alistarh, 2023, "Massive Language Models Can Be Accurately Pruned in
One-Shot"), whose dampening (λ = 0.01 · mean diag H) and column-block OBS update are used as
published.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from workers.nn.masks import count_to_prune

ROWS_PER_CHUNK = 4096  # rows of X cast to float64 at a time: 4096 x in x 8 bytes
DAMP_FRACTION = 0.01  # SparseGPT's default percdamp
OBS_BLOCK = 128  # SparseGPT's column block (lazy batch updates)
# Conjugate gradients stop when each row's residual is below LSTSQ_TOLERANCE of its right-hand
# side, or after LSTSQ_ITERATIONS: the error converges long before the residual does (MiniLM's
# 1536-wide FFN output at 30%: relative error 0.00270 after 50 iterations, 0.00267 after 100
# and after 800, where the residual first reaches 1e-10), and each iteration costs 2·out·in²
# flops.
LSTSQ_TOLERANCE = 1e-6
# Least squares by conjugate gradients costs at most LSTSQ_ITERATIONS · 2·out·in² flops,
# SparseGPT's OBS about in³ + out·in²; above LSTSQ_MAX_FLOPS least squares is traded for OBS
# (a minute of one core).
LSTSQ_ITERATIONS = 100
LSTSQ_MAX_FLOPS = 1e12


def accumulate_gram(gram: np.ndarray, left: np.ndarray, right: np.ndarray | None = None) -> None:
    """gram [in, in] += leftᵀ right (right defaults to left) for rows [n, in], in float64,
    ROWS_PER_CHUNK rows at a time: the float64 copy of a large activation never exists whole."""
    for start in range(0, len(left), ROWS_PER_CHUNK):
        chunk = left[start : start + ROWS_PER_CHUNK].astype(np.float64)
        other = chunk if right is None else right[start : start + ROWS_PER_CHUNK].astype(np.float64)
        gram += chunk.T @ other


def im2col(
    x: np.ndarray,
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    pads: tuple[int, ...],
    dilations: tuple[int, ...],
) -> np.ndarray:
    """Patches of a 2-D convolution's input x [N, C, H, W] as rows [N·oh·ow, C·kh·kw], columns in
    the order of a weight [O, C, kh, kw] reshaped to [O, C·kh·kw]. pads: ONNX order (top, left,
    bottom, right)."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    top, left, bottom, right = pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, height, width = padded.shape
    oh = (height - dh * (kh - 1) - 1) // sh + 1
    ow = (width - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, oh, ow, c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh,
                            j * dw : j * dw + sw * (ow - 1) + 1 : sw]  # fmt: skip
            cols[..., i, j] = window.transpose(0, 2, 3, 1)  # [N, oh, ow, C]
    return cols.reshape(n * oh * ow, c * kh * kw)


def damping(gram: np.ndarray, fraction: float = DAMP_FRACTION) -> float:
    """λ = fraction · mean(diag H), SparseGPT's percdamp (positive even for an all-zero H)."""
    diagonal = np.diag(gram)
    return max(fraction * float(diagonal.mean()) if diagonal.size else 0.0, 1e-300)


def damped(gram: np.ndarray, fraction: float = DAMP_FRACTION) -> np.ndarray:
    """H + λI: keeps the solves well posed when inputs are collinear or rarely active."""
    return gram + np.eye(len(gram)) * damping(gram, fraction)


def wanda_scores(weight: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """|W_rj| · ‖x_j‖₂ [out, in]: a weight matters as much as it moves its output on the
    calibration inputs, not as large as it is (an input that is always near zero makes its
    weights cheap to drop, a large-norm input makes even small weights costly)."""
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    return np.abs(weight.astype(np.float64)) * norms[None, :]


def row_masks(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask [out, in]: each row drops its round(sparsity · in) lowest scores, ties broken by
    position (a stable sort), so every output keeps the same count as Wanda compares weights
    within each output row."""
    out, width = scores.shape
    k = count_to_prune(sparsity, width)
    keep = np.ones((out, width), dtype=bool)
    if k:
        lowest = np.argsort(scores, axis=1, kind="stable")[:, :k]
        np.put_along_axis(keep, lowest, False, axis=1)
    return keep


def relative(lost: float, base: float) -> float:
    """sqrt(lost / base): ‖W X - Ŵ X‖ / ‖W X‖ from the squared norms."""
    return float(np.sqrt(max(lost, 0.0) / base)) if base > 0 else 0.0


def least_squares(
    weight: np.ndarray,
    gram: np.ndarray,
    keep: np.ndarray,
    fraction: float = DAMP_FRACTION,
    tolerance: float = LSTSQ_TOLERANCE,
    iterations: int = LSTSQ_ITERATIONS,
) -> np.ndarray:
    """Per output row r, the exact minimiser of (w_r - ŵ_r)(H + λI)(w_r - ŵ_r)ᵀ with ŵ_r zero
    off its kept inputs S_r: ((H + λI) ŵ_r)_S = ((H + λI) w_r)_S. The dampened H is SparseGPT's
    objective: ‖(w_r - ŵ_r) X‖² plus λ‖w_r - ŵ_r‖², which pulls toward the original weights, not
    toward zero. Returns Ŵ [out, in] float64.

    Solved by conjugate gradients preconditioned by diag(H + λI), every row at once: an
    iteration is one [out, in] x [in, in] product, where a direct solve per row would factor
    `out` different submatrices H_SS (minutes for a 1536-wide layer). The damping bounds the
    condition number, so the error converges in tens of iterations; it stops when every row's
    residual is below `tolerance` of its right-hand side (exact in at most `in` steps in exact
    arithmetic) or after `iterations`."""
    w = weight.astype(np.float64)
    hessian = damped(gram, fraction)
    diagonal = np.diag(hessian)
    solution = np.where(keep, w, 0.0)
    residual = np.where(keep, (w - solution) @ hessian, 0.0)  # b - A x on the kept inputs
    scale = np.linalg.norm(np.where(keep, w @ hessian, 0.0), axis=1)  # ‖b_r‖
    direction = residual / diagonal
    product = np.einsum("ri,ri->r", residual, direction)
    for _ in range(iterations):
        if (np.linalg.norm(residual, axis=1) <= tolerance * scale).all():
            break
        moved = np.where(keep, direction @ hessian, 0.0)  # A p
        curvature = np.einsum("ri,ri->r", direction, moved)
        step = np.divide(product, curvature, out=np.zeros_like(product), where=curvature > 0)
        solution += step[:, None] * direction
        residual -= step[:, None] * moved
        preconditioned = residual / diagonal
        updated = np.einsum("ri,ri->r", residual, preconditioned)
        ratio = np.divide(updated, product, out=np.zeros_like(product), where=product > 0)
        direction = preconditioned + ratio[:, None] * direction
        product = updated
    return solution


def obs_update(
    weight: np.ndarray,
    gram: np.ndarray,
    keep: np.ndarray,
    fraction: float = DAMP_FRACTION,
    block: int = OBS_BLOCK,
) -> np.ndarray:
    """SparseGPT's sequential OBS reconstruction for a fixed mask: columns left to right, each
    pruned weight's error spread over the row's later columns through the upper Cholesky factor
    of H⁻¹ (lazy updates per block of columns). Returns Ŵ [out, in] float64, zero off `keep`."""
    w = weight.astype(np.float64).copy()
    hessian = damped(gram, fraction)
    dead = np.diag(gram) == 0  # inputs that are always zero: their weights do nothing
    w[:, dead] = 0.0
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T  # H⁻¹ = Uᵀ U
    width = w.shape[1]
    for start in range(0, width, block):
        end = min(start + block, width)
        part = w[:, start:end].copy()  # [out, b]
        errors = np.zeros_like(part)
        factor = upper[start:end, start:end]
        for i in range(end - start):
            column = part[:, i]
            pruned = np.where(keep[:, start + i], column, 0.0)
            error = (column - pruned) / factor[i, i]  # [out]
            part[:, i:] -= np.outer(error, factor[i, i:])
            part[:, i] = pruned
            errors[:, i] = error
        w[:, start:end] = part
        w[:, end:] -= errors @ upper[start:end, end:]
    return np.where(keep, w, 0.0)


def _lstsq_flops(keep: np.ndarray) -> float:
    out, width = keep.shape
    return LSTSQ_ITERATIONS * 2.0 * out * width * width


Reconstructor = Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]


def choose_reconstructor(keep: np.ndarray) -> tuple[str, Reconstructor]:
    """Exact per-row least squares where it is affordable, else SparseGPT's OBS update."""
    if _lstsq_flops(keep) <= LSTSQ_MAX_FLOPS:
        return "least_squares", least_squares
    return "obs", obs_update


@dataclass(frozen=True)
class LayerInputs:
    """A layer's calibration inputs as Gram matrices [in, in] (float64): X̃ its inputs in the
    model as pruned so far, X its inputs in the original model, on the same rows."""

    gram: np.ndarray  # X̃ᵀX̃
    cross: np.ndarray  # X̃ᵀX
    dense: np.ndarray  # XᵀX

    @classmethod
    def unchanged(cls, gram: np.ndarray) -> "LayerInputs":
        """Inputs nothing before the layer has changed (X̃ = X): the graph's own inputs."""
        return cls(gram, gram, gram)


def output_errors(weight: np.ndarray, new: np.ndarray, inputs: LayerInputs) -> np.ndarray:
    """‖W X - Ŵ X̃‖² per row [out]: what the layer's outputs in the pruned model lose against
    the original's, = w H wᵀ - 2 ŵ C wᵀ + ŵ H̃ ŵᵀ."""
    w = weight.astype(np.float64)
    original = ((w @ inputs.dense) * w).sum(axis=1)
    crossed = ((new @ inputs.cross) * w).sum(axis=1)
    return original - 2 * crossed + ((new @ inputs.gram) * new).sum(axis=1)


def corrected_target(weight: np.ndarray, inputs: LayerInputs, fraction: float) -> np.ndarray:
    """W* [out, in], the dense weights whose outputs on X̃ come closest to W's on X: row by row
    the minimiser of ‖X w - X̃ w*‖² + λ‖w - w*‖², w* = (w Cᵀ + λ w)(H̃ + λI)⁻¹. Then that
    objective for a masked ŵ is (w* - ŵ)(H̃ + λI)(w* - ŵ)ᵀ plus a constant, so the solvers
    above, given W*, minimise it: each layer also makes up for what the layers before it
    lost, where SparseGPT's ‖W X̃ - Ŵ X̃‖ leaves that error in place."""
    w = weight.astype(np.float64)
    right = w @ inputs.cross.T + damping(inputs.gram, fraction) * w  # [out, in]
    return np.linalg.solve(damped(inputs.gram, fraction), right.T).T


@dataclass(frozen=True)
class Reconstruction:
    """Squared norms rather than ratios, so the groups of a grouped Conv add up."""

    weight: np.ndarray  # Ŵ [out, in] float64, zero off the mask
    method: str  # "least_squares" or "obs"
    base: float  # ‖WX‖²
    lost_before: float  # ‖WX - (W⊙M)X̃‖²: the mask alone
    lost_after: float  # ‖WX - ŴX̃‖²


def reconstruct(
    weight: np.ndarray, inputs: LayerInputs, keep: np.ndarray, fraction: float = DAMP_FRACTION
) -> Reconstruction:
    """The surviving weights of one layer updated to minimise ‖W X - Ŵ X̃‖: its outputs in the
    pruned model against the original's. The dampened solve minimises a slightly different
    objective, so a row whose error it would raise keeps its masked weights: the layer error
    never goes up."""
    method, solver = choose_reconstructor(keep)
    masked = np.where(keep, weight.astype(np.float64), 0.0)
    target = weight
    if inputs.cross is not inputs.gram:
        target = corrected_target(weight, inputs, fraction)
    solved = solver(target, inputs.gram, keep, fraction)
    before, after = output_errors(weight, masked, inputs), output_errors(weight, solved, inputs)
    worse = after > before
    solved[worse] = masked[worse]
    zero = np.zeros_like(masked)
    return Reconstruction(
        weight=solved,
        method=method,
        base=float(output_errors(weight, zero, inputs).sum()),
        lost_before=float(before.sum()),
        lost_after=float(np.minimum(before, after).sum()),
    )
