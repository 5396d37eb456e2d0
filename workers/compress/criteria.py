"""How weights are ranked for pruning (PruneParams.criterion): one entry per criterion.

A criterion sees every weight once up front (magnitude with scope global needs them all) and
returns the rule that gives one weight's keep-mask, in the weight's own layout, from its
values and, where the layer could be calibrated, its view and its inputs' Gram matrices.
"""

from collections.abc import Callable, Sequence

import numpy as np

from schemas.params import PruneParams
from schemas.vocabulary import Criterion
from workers.compress.calibration import LayerView
from workers.nn.masks import layer_masks, magnitude_masks
from workers.nn.reconstruct import LayerInputs, row_masks, wanda_scores

# (index of the weight, its values, its view or None, its inputs per group or None) -> keep-mask
MaskRule = Callable[[int, np.ndarray, LayerView | None, list[LayerInputs] | None], np.ndarray]


def magnitude(weights: Sequence[np.ndarray], params: PruneParams) -> MaskRule:
    """Today's masks, exactly: the smallest |w| per tensor or across all, or |w| <= threshold.
    They do not depend on the inputs, so they are found before any layer changes."""
    masks = list(
        magnitude_masks(
            weights, sparsity=params.sparsity, threshold=params.threshold, scope=params.scope
        )
    )
    return lambda index, weight, view, inputs: masks[index]


def activation(weights: Sequence[np.ndarray], params: PruneParams) -> MaskRule:
    """Wanda: |W_rj| · ‖x_j‖₂ (x: the inputs in the model pruned so far), the lowest `sparsity`
    share dropped within each output row (each group's rows against its own inputs). A weight
    that could not be calibrated falls back to its tensor's smallest |w|."""
    sparsity = params.sparsity
    assert sparsity is not None  # PruneParams: activation takes sparsity, not threshold

    def rule(
        index: int, weight: np.ndarray, view: LayerView | None, inputs: list[LayerInputs] | None
    ) -> np.ndarray:
        if view is None or inputs is None:
            return next(layer_masks([weight], sparsity))
        matrix = view.matrix(weight)  # [out, in]
        rows = len(matrix) // view.groups
        scores = [
            wanda_scores(matrix[g * rows : (g + 1) * rows], inputs[g].gram)
            for g in range(view.groups)
        ]
        keep = np.concatenate([row_masks(part, sparsity) for part in scores])
        return view.restore(keep)

    return rule


CRITERIA: dict[Criterion, Callable[[Sequence[np.ndarray], PruneParams], MaskRule]] = {
    "magnitude": magnitude,
    "activation": activation,
}
