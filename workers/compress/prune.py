"""Pruning a whole ONNX model: find its weights, compute masks or neuron cuts, write them back."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

from schemas.params import PruneParams
from schemas.report import GroupReport, LayerReport
from schemas.vocabulary import Granularity
from workers.compress.structured import prune_channels
from workers.errors import InvalidModelError, UnsupportedModelError, cut_list
from workers.graph.held import HeldModel, hold
from workers.graph.load import parse_model
from workers.graph.walk import drop_unused_initializers, iter_graphs
from workers.graph.weights import WeightSlot, all_float_constants, find_weights
from workers.nn.masks import magnitude_masks


@dataclass
class PruneOutcome:
    model: ModelProto
    layers: list[LayerReport]
    params_before: int  # float parameters of the original, sparse initializers densified
    pruned: set[str] = field(default_factory=set)  # weights whose values changed
    notes: list[str] = field(default_factory=list)
    groups: list[GroupReport] | None = None  # structured: every channel group found
    held: HeldModel | None = None  # the file `model` is the skeleton of, pruned where it lies


def copy_model(model: ModelProto) -> ModelProto:
    clone = ModelProto()
    clone.CopyFrom(model)
    return clone


def densify_sparse_initializers(model: ModelProto) -> None:
    """Turn sparse_initializer entries into dense initializers, so one code path prunes them."""
    for graph, _ in iter_graphs(model.graph):
        for sparse in graph.sparse_initializer:
            values = numpy_helper.to_array(sparse.values)
            indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
            dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
            try:
                if indices.ndim == 1:
                    dense.reshape(-1)[indices] = values
                else:
                    dense[tuple(indices.T)] = values
            except (IndexError, ValueError) as exc:
                raise InvalidModelError(
                    f"sparse initializer {sparse.values.name!r} has indices outside its shape"
                ) from exc
            graph.initializer.append(numpy_helper.from_array(dense, sparse.values.name))
        del graph.sparse_initializer[:]


def layer_report(name: str, original_shape: tuple[int, ...], array: np.ndarray) -> LayerReport:
    return counted_layer(name, original_shape, array.shape, int(np.count_nonzero(array)))


def counted_layer(
    name: str, original_shape: tuple[int, ...], shape: tuple[int, ...], nonzero: int
) -> LayerReport:
    params = int(np.prod(original_shape))
    return LayerReport(
        name=name,
        original_shape=list(original_shape),
        shape=list(shape),
        params=params,
        nonzero=nonzero,
        sparsity=1.0 - nonzero / params if params else 0.0,
    )


class SlotValues(Sequence[np.ndarray]):
    """The weights' current values, each read from the model when indexed: a pass over them
    holds one tensor at a time, not a second copy of the model. With `keep_last`, the last
    one read is kept for `take`: the tensor a mask was just made from is the one it prunes."""

    def __init__(
        self, slots: list[WeightSlot], keep_last: bool = False, check_finite: bool = False
    ) -> None:
        self.slots = slots
        self.keep_last = keep_last
        self.last: tuple[int, np.ndarray] | None = None
        # With check_finite, each weight is refused on its first read if it is not finite:
        # checked on a read the pass makes anyway, rather than on one of its own.
        self.unchecked = set(range(len(slots))) if check_finite else set()

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        self.last = None  # the previous tensor let go before the next is read
        array = self.slots[index].read()
        if index in self.unchecked:
            _require_finite(self.slots[index], array)
            self.unchecked.discard(index)
        if self.keep_last:
            self.last = (index, array)
        return array

    def take(self, index: int) -> np.ndarray:
        """Weight `index` as last read, handed over (not kept here: its taker lets it go),
        or read again when another was read since."""
        last, self.last = self.last, None
        return last[1] if last is not None and last[0] == index else self.slots[index].read()


def prunable_slots(
    model: ModelProto,
    params: PruneParams,
    only: str | None,
    check_finite: bool = True,
    held: HeldModel | None = None,
) -> list[WeightSlot]:
    """The weights `params` choose (include/exclude; `only`: the one of that name), sparse
    initializers made dense first; refused when there are none or (with check_finite) when
    one is not finite."""
    densify_sparse_initializers(model)
    slots = find_weights(model, params.include, params.exclude)
    if only is not None:
        slots = [slot for slot in slots if slot.name == only]
    if not slots:
        raise UnsupportedModelError(_no_weights(model, params))
    if held is not None and not held.attach(slots):
        raise ValueError("a weight to prune is not held: prune the model parsed whole")
    if check_finite:
        for slot in slots:
            _require_finite(slot, slot.read())
    return slots


def _no_weights(model: ModelProto, params: PruneParams) -> str:
    """Why no weight was chosen, with what the caller can do about it."""
    stored = [slot.name for slot in all_float_constants(model)]
    if not stored:
        return (
            "the model has no prunable weights: it stores no float initializer or Constant node "
            "(its weights are computed inside the graph, e.g. by ConstantOfShape)"
        )
    chosen = "float constants feeding MatMul, Gemm, Conv or ConvTranspose directly"
    if params.include:
        chosen += f" or matching include {params.include}"
    if params.exclude:
        chosen += f", less exclude {params.exclude}"
    return cut_list(
        f"the model has no prunable weights ({chosen}); name the ones to prune with include, "
        f"among its {len(stored)} float constants: ",
        stored,
    )


def prune_model(
    model: ModelProto, params: PruneParams, only: str | None = None, held: HeldModel | None = None
) -> PruneOutcome:
    """Prune `model` in place by params.sparsity or params.threshold; `only` names the one
    prunable tensor to touch (a sensitivity scan), None touches them all. A caller that needs
    the original afterwards prunes a copy_model of it. `held`: `model` is its skeleton, and
    its weights are pruned where they lie in the held file (params as prunes_held allows)."""
    # Unstructured pruning refuses a weight that is not finite on its first read for the masks
    # (with scope layer, after the weights before it are written: the model is refused whole).
    check_finite = params.granularity != "unstructured"
    slots = prunable_slots(model, params, only, check_finite, held)
    # By position, not name: two If branches may each hold a Constant of the same name.
    # Weights are read one at a time, as each pass needs them: a 270 MB model must not cost
    # another 270 MB here.
    outcome = PruneOutcome(model, layers=[], params_before=float_param_count(model), held=held)
    GRANULARITIES[params.granularity](model, slots, params, outcome)
    return outcome


def record_layers(
    outcome: PruneOutcome, slots: list[WeightSlot], shapes: list[tuple[int, ...]]
) -> None:
    """A layer report per prunable weight against its shape before pruning; a weight whose
    shape changed (structured) counts as pruned."""
    for slot, shape in zip(slots, shapes, strict=True):
        array = slot.read()
        if array.shape != shape:
            outcome.pruned.add(slot.name)
        outcome.layers.append(layer_report(slot.name, shape, array))


def prune_weights(
    model: ModelProto, slots: list[WeightSlot], params: PruneParams, outcome: PruneOutcome
) -> None:
    """Unstructured: single weights set to zero, shapes unchanged; each layer reported as it
    is written."""
    values = SlotValues(slots, keep_last=True, check_finite=True)
    masks = magnitude_masks(
        values, sparsity=params.sparsity, threshold=params.threshold, scope=params.scope
    )
    # Slot i is written before i+1 is read, from the values its mask was made from, and
    # counted then: a 64 MB weight read out of protobuf twice less.
    emptied = []
    for index, (slot, keep) in enumerate(zip(slots, masks, strict=True)):
        if keep.all():
            outcome.layers.append(layer_report(slot.name, slot.shape, values.take(index)))
        else:
            nonzero = slot.write_masked(keep, values.take(index))
            outcome.layers.append(counted_layer(slot.name, slot.shape, slot.shape, nonzero))
            outcome.pruned.add(slot.name)
            if nonzero == 0:
                emptied.append(slot.name)
    if emptied:  # global scope or a threshold can take a whole layer: its output goes constant
        outcome.notes.append(
            cut_list(
                f"unstructured: {len(emptied)} weight(s) pruned to all zeros, so their layers "
                "pass only a bias, if any: ",
                emptied,
            )
        )


def prune_structured(
    model: ModelProto, slots: list[WeightSlot], params: PruneParams, outcome: PruneOutcome
) -> None:
    """Structured: whole channels, neurons and heads removed with their coupled slices, so
    the tensors shrink."""
    shapes = [slot.shape for slot in slots]
    found = prune_channels(
        model, slots, sparsity=params.sparsity, threshold=params.threshold, scope=params.scope
    )
    outcome.groups = found.groups
    outcome.notes += found.notes
    record_layers(outcome, slots, shapes)


# Each prunes the chosen weights in place and records what it changed in the outcome, a
# layer report per weight among it.
GRANULARITIES: dict[
    Granularity, Callable[[ModelProto, list[WeightSlot], PruneParams, PruneOutcome], None]
] = {
    "unstructured": prune_weights,
    "structured": prune_structured,
}


def _require_finite(slot: WeightSlot, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidModelError(f"weight {slot.name!r} holds NaN or infinite values")


def float_param_count(model: ModelProto) -> int:
    """Float parameters stored in the model, from their shapes: nothing is read."""
    return sum(math.prod(slot.shape) for slot in all_float_constants(model))


def float_params(model: ModelProto, held: HeldModel | None = None) -> tuple[int, int]:
    """(float parameters, nonzero float parameters) stored in the model (`held`: the file
    `model` is the skeleton of)."""
    total = nonzero = 0
    slots = all_float_constants(model)
    if held is not None:
        held.attach(slots)
    for slot in slots:
        array = slot.read()
        total += array.size
        nonzero += int(np.count_nonzero(array))
    return total, nonzero


def prunes_held(params: PruneParams) -> bool:
    """Whether `params` prune a held model (workers/graph/held.py) as they would the model
    parsed whole: single weights zeroed where they lie, written dense, once."""
    return (
        params.granularity == "unstructured"
        and params.encoding == "dense"
        and params.fine_tune is None
        and not params.calibrated
        and params.max_accuracy_drop is None  # a search or a scan prunes the original again
        and not params.sensitivity
    )


def parse_for_pruning(data: bytes, params: PruneParams) -> tuple[ModelProto, HeldModel | None]:
    """The model in `data` (checked as parse_model checks it), and, where pruning by `params`
    allows it, held: then the model is its skeleton. Held only when pruning writes the same
    file either way: no sparse initializers to make dense, no unused initializers for the job
    to drop, every weight to prune a plainly written initializer or Constant value of the main
    graph."""
    held = hold(data) if prunes_held(params) else None
    if held is None:
        return parse_model(data), None
    skeleton = held.skeleton
    whole = (
        any(graph.sparse_initializer for graph, _ in iter_graphs(skeleton.graph))
        or drop_unused_initializers(skeleton)
        or not held.attach(find_weights(skeleton, params.include, params.exclude))
    )
    if whole:  # checked already: parsed, not checked again
        del held, skeleton  # the skeleton goes before protobuf parses the model whole
        return onnx.load_model_from_string(data), None
    held.own()
    return skeleton, held


def refresh_layers(outcome: PruneOutcome) -> None:
    """Recount the layer report after the pruned weights changed (fine-tuning)."""
    slots = {slot.name: slot for slot in find_weights(outcome.model, include=[".*"])}
    for index, layer in enumerate(outcome.layers):
        array = slots[layer.name].read()
        outcome.layers[index] = layer_report(layer.name, tuple(layer.original_shape), array)
        outcome.pruned.add(layer.name)
