"""Unstructured pruning with calibration inputs (issue 16): masks by a criterion that may look at
each layer's inputs (Wanda), and layer-wise reconstruction of the surviving weights.

Layers go in graph order, as SparseGPT does: each layer's inputs X̃ come from running the model
as pruned (and reconstructed) so far. Its target is its output in the original model, W X, not
SparseGPT's W X̃, so a layer also corrects for what the layers before it lost (held-out accuracy
of the digits MLP at 80%: 96.5% against 94.6%; bench/frontier.py). Layers that read one input
tensor (an attention block's Q, K and V) share one calibration run.

Structured pruning does not come through here yet: ranking channel groups by activation and
least squares on the consumer of removed channels (ThiNet) plug in once its channel groups
settle; PruneParams refuses the combination until then.
"""

import time

import numpy as np
from onnx import ModelProto

from schemas.params import PruneParams
from schemas.report import CalibratedLayer, CalibrationReport
from workers.compress.calibration import LayerView, input_statistics, layer_view, node_positions
from workers.compress.criteria import CRITERIA, MaskRule
from workers.compress.prune import (
    PruneOutcome,
    SlotValues,
    copy_model,
    float_param_count,
    layer_report,
    prunable_slots,
)
from workers.errors import cut_list
from workers.evaluate.runtime import Feeds
from workers.graph.weights import WeightSlot
from workers.nn.reconstruct import LayerInputs, output_errors, reconstruct, relative


def prune_calibrated(
    model: ModelProto, params: PruneParams, runs: list[Feeds], only: str | None = None
) -> tuple[PruneOutcome, CalibrationReport]:
    """Prune `model` in place (unstructured) by params.criterion, reconstructing the surviving
    weights when params.reconstruct; `runs` are the calibration inputs (the eval_data's).
    `only` as in prune_model."""
    started = time.perf_counter()
    slots = prunable_slots(model, params, only)
    shapes = [slot.shape for slot in slots]
    outcome = PruneOutcome(model, layers=[], params_before=float_param_count(model))
    original = copy_model(model)  # each layer's target: its outputs in the original model
    rule = CRITERIA[params.criterion](SlotValues(slots), params)
    positions = node_positions(model)
    views: dict[int, LayerView] = {}
    skipped: list[str] = []
    for index, slot in enumerate(slots):
        found = layer_view(slot, model, positions)
        if isinstance(found, str):
            skipped.append(f"{slot.name} ({found})")
            # First, so the calibrated layers see the model as it will be returned.
            weight = slot.read()
            _write(slot, np.where(rule(index, weight, None, None), weight, 0), outcome)
        else:
            views[index] = found

    layers: dict[int, CalibratedLayer] = {}
    for group in _shared_inputs(views):
        inputs = input_statistics(model, original, [views[index] for index in group], runs)
        for index in group:
            layers[index] = _prune_layer(index, views[index], inputs, rule, params, outcome)

    for slot, shape in zip(slots, shapes, strict=True):
        outcome.layers.append(layer_report(slot.name, shape, slot.read()))
    if skipped:
        outcome.notes.append(cut_list("pruned by magnitude alone, without calibration: ", skipped))
    report = CalibrationReport(
        criterion=params.criterion,
        reconstructed=params.reconstruct,
        runs=len(runs),
        samples=sum(_rows(feeds) for feeds in runs),
        seconds=time.perf_counter() - started,
        layers=[layers[index] for index in sorted(layers)],
        uncalibrated=[slots[index].name for index in range(len(slots)) if index not in views],
    )
    return outcome, report


def _shared_inputs(views: dict[int, LayerView]) -> list[list[int]]:
    """Indices of the views grouped by the input rows they multiply, groups in graph order.
    A group's input is computed before its first node, so from layers earlier in the order."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for index in sorted(views, key=lambda index: views[index].position):
        view = views[index]
        key = (view.input_name, view.transposed_input, view.conv, view.groups, view.width)
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _prune_layer(
    index: int,
    view: LayerView,
    inputs: list[LayerInputs],
    rule: MaskRule,
    params: PruneParams,
    outcome: PruneOutcome,
) -> CalibratedLayer:
    """Mask one layer, reconstruct it if asked, write it back; its errors on the calibration
    inputs, summed over a grouped Conv's groups."""
    weight = view.slot.read()
    keep = view.matrix(rule(index, weight, view, inputs))  # [out, in]
    matrix = view.matrix(weight).astype(np.float64)
    new = np.where(keep, matrix, 0.0)
    per_group = len(matrix) // view.groups
    base = lost_before = lost_after = 0.0
    methods = set()
    for g in range(view.groups):
        rows = slice(g * per_group, (g + 1) * per_group)
        if params.reconstruct:
            done = reconstruct(matrix[rows], inputs[g], keep[rows])
            new[rows] = done.weight
            methods.add(done.method)
            base += done.base
            lost_before += done.lost_before
            lost_after += done.lost_after
        else:
            zero = np.zeros_like(matrix[rows])
            base += float(output_errors(matrix[rows], zero, inputs[g]).sum())
            lost_before += float(output_errors(matrix[rows], new[rows], inputs[g]).sum())
            lost_after = lost_before
    _write(view.slot, view.restore(new), outcome)
    return CalibratedLayer(
        name=view.slot.name,
        op=view.node.op_type,
        method="+".join(sorted(methods)) if methods else None,
        error_before=relative(lost_before, base),
        error_after=relative(lost_after, base),
    )


def _write(slot: WeightSlot, array: np.ndarray, outcome: PruneOutcome) -> None:
    slot.write(array)  # cast back to the stored dtype by the slot
    outcome.pruned.add(slot.name)


def _rows(feeds: Feeds) -> int:
    first = next(iter(feeds.values()), np.empty(()))
    return len(first) if np.ndim(first) else 1
