"""How weights are ranked for pruning (PruneParams.criterion): one entry per criterion in
each registry, CRITERIA for single weights and UNIT_CRITERIA for structured pruning's units.

An unstructured criterion sees every weight once up front (magnitude with scope global needs
them all) and returns the rule that gives one weight's keep-mask, in the weight's own layout,
from its values and, where the layer could be calibrated, its view and its inputs' Gram
matrices. A structured criterion scores the units of one channel group at a time.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, TensorProto, numpy_helper

from schemas.params import PruneParams
from schemas.vocabulary import Criterion
from workers.compress.calibration import (
    LayerBiases,
    LayerView,
    exposing,
    layer_view,
    node_positions,
    run_exposed,
)
from workers.compress.structured import UnitScorer, WeightMagnitude
from workers.evaluate.runtime import Feeds, session
from workers.graph.channels import ChannelGroup, Slice
from workers.graph.weights import find_weights
from workers.nn.masks import layer_masks, magnitude_masks
from workers.nn.reconstruct import ROWS_PER_CHUNK, LayerInputs, row_masks, wanda_scores

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


def weight_magnitude(model: ModelProto, runs: list[Feeds]) -> UnitScorer:
    """Structured magnitude: the RMS of each unit's coupled weights; needs no inputs."""
    return WeightMagnitude({slot.name for slot in find_weights(model)})


@dataclass
class OutputContribution:
    """Structured activation: a unit scores the output error its removal alone leaves in the
    layers that read it, on the calibration inputs of the original model:
    sqrt(Σ_readers ‖W[:, u] (X[u] - x̄[u])‖²), W[:, u] a reader's columns of unit u, X[u] the
    unit's input rows there (the im2col patches of its channels for a Conv) and x̄[u] their
    mean, which the re-fit of the reader's bias puts back (calibrated.py): FLAP's fluctuation
    metric with bias compensation (An et al., 2024), with the cross terms of a channel's
    kernel taps and a head's dimensions kept. A reader without a bias of its own to adjust
    loses the mean too, so there x̄ is 0. Only each unit's block of XᵀX is accumulated:
    ‖W_u X_u‖² = tr(W_u X_uᵀX_u W_uᵀ). A group none of whose readers can be calibrated (a
    grouped Conv, a weight used twice) is ranked by weight magnitude; `fallbacks` names them.
    """

    model: ModelProto
    runs: list[Feeds]
    fallbacks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._slots = {slot.name: slot for slot in find_weights(self.model)}
        self._positions = node_positions(self.model)
        self._magnitude = WeightMagnitude(set(self._slots))
        self._biases = LayerBiases(self.model)

    @property
    def wording(self) -> str:
        wording = (
            "the output error their removal alone causes in the layers that read them, "
            "‖W_u X_u‖ on the calibration inputs"
        )
        if self.fallbacks:
            wording += f" ({len(self.fallbacks)} groups with no calibrated reader: weight RMS)"
        return wording

    def __call__(self, group: ChannelGroup, constants: dict[str, TensorProto]) -> np.ndarray:
        readers = [
            (view, piece) for piece in group.slices if (view := self._reader(piece)) is not None
        ]
        if not readers:
            self.fallbacks.append(group.leading)
            return self._magnitude(group, constants)
        squares = np.zeros(group.units)
        for view, piece in readers:
            squares += self._removal_errors(view, piece, group.units, constants)
        # a centred quadratic form of a channel that barely varies can come out a rounding
        # error below zero: its error is zero, not NaN (which would rank anywhere)
        return np.sqrt(np.maximum(squares, 0.0))

    def _reader(self, piece: Slice) -> LayerView | None:
        """The view of the layer whose input channels `piece` slices, if it can be calibrated."""
        slot = self._slots.get(piece.tensor)
        if slot is None:
            return None  # a bias or a norm parameter, not a connection
        view = layer_view(slot, self.model, self._positions)
        if isinstance(view, str) or view.groups != 1 or view.input_axis != piece.axis:
            return None
        return view

    def _removal_errors(
        self, view: LayerView, piece: Slice, units: int, constants: dict[str, TensorProto]
    ) -> np.ndarray:
        """‖W_u X_u‖² of each unit for one reader: [units]."""
        matrix = view.matrix(numpy_helper.to_array(constants[piece.tensor]))  # [out, in]
        columns = view.width // view.slot.shape[view.input_axis]  # per channel: kh·kw or 1
        start = piece.span.offset * columns
        stop = start + int(piece.span.size) * columns
        block = (stop - start) // units
        weights = matrix[:, start:stop].astype(np.float64).reshape(len(matrix), units, block)
        centred = self._biases.of(view) is not None
        gram = self._block_gram(view, start, stop, units, centred)  # [units, block, block]
        return np.einsum("oub,ubc,ouc->u", weights, gram, weights)

    def _block_gram(
        self, view: LayerView, start: int, stop: int, units: int, centred: bool
    ) -> np.ndarray:
        """Each unit's block of XᵀX (of (X - x̄)ᵀ(X - x̄) when `centred`) over columns
        [start, stop) of the reader's input rows, one run's activation at a time."""
        block = (stop - start) // units
        gram = np.zeros((units, block, block))
        sums, count = np.zeros((units, block, 1)), 0
        runner = session(exposing(self.model, view.input_name))
        for feeds in self.runs:
            for rows in view.rows(run_exposed(runner, feeds), 0):
                for first in range(0, len(rows), ROWS_PER_CHUNK):
                    part = rows[first : first + ROWS_PER_CHUNK, start:stop].astype(np.float64)
                    per_unit = part.reshape(len(part), units, block).transpose(1, 0, 2)
                    gram += per_unit.transpose(0, 2, 1) @ per_unit  # [units, block, block]
                    sums += per_unit.sum(axis=1)[..., None]
                    count += len(part)
        if centred and count:
            gram -= sums @ sums.transpose(0, 2, 1) / count  # Σ(x - x̄)(x - x̄)ᵀ
        return gram


UNIT_CRITERIA: dict[Criterion, Callable[[ModelProto, list[Feeds]], UnitScorer]] = {
    "magnitude": weight_magnitude,
    "activation": OutputContribution,
}
