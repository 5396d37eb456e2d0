"""Pruning with calibration inputs (issue 16): masks by a criterion that may look at each
layer's inputs (Wanda), and layer-wise reconstruction of the surviving weights.

Layers go in graph order, as SparseGPT does: each layer's inputs X̃ come from running the model
as pruned (and reconstructed) so far. Its target is its output in the original model, W X, not
SparseGPT's W X̃, so a layer also corrects for what the layers before it lost (held-out accuracy
of the digits MLP at 80%: 96.5% against 94.6%; bench/frontier.py). Layers that read one input
tensor (an attention block's Q, K and V) share one calibration run.

Structured pruning removes channels as plain structured pruning does, then, with reconstruct,
as ThiNet (Luo et al., 2017) and He et al. (2017) do, re-fits each layer that read removed
channels by least squares over its remaining inputs: min ‖W X - Ŵ X̃‖ with W, X the layer and
its inputs in the original model (its surviving output rows only) and X̃ its narrower inputs in
the model as pruned and re-fitted so far, the layer's bias fitted with its weights. With
criterion activation the units are ranked by the output error their removal alone causes in
the layers that read them (criteria.py OutputContribution), measured on the original model,
all groups at once; without reconstruct only those layers' biases are re-fitted.
"""

import time
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from schemas.params import PruneParams
from schemas.report import CalibratedLayer, CalibrationReport
from workers.compress.calibration import (
    LayerBiases,
    LayerView,
    add_zero_biases,
    drop_zero_biases,
    exposing,
    input_statistics,
    layer_view,
    node_positions,
    run_exposed,
)
from workers.compress.criteria import CRITERIA, UNIT_CRITERIA, MaskRule
from workers.compress.prune import (
    PruneOutcome,
    SlotValues,
    copy_model,
    float_param_count,
    prunable_slots,
    record_layers,
)
from workers.compress.structured import prune_channels
from workers.errors import cut_list
from workers.evaluate.runtime import Feeds, session
from workers.graph.weights import WeightSlot, find_weights
from workers.nn.reconstruct import (
    LayerInputs,
    accumulate_gram,
    damping,
    output_errors,
    reconstruct,
    relative,
)


def prune_calibrated(
    model: ModelProto, params: PruneParams, runs: list[Feeds], only: str | None = None
) -> tuple[PruneOutcome, CalibrationReport]:
    """Prune `model` in place by params.criterion (single weights, or units with granularity
    structured), reconstructing the surviving weights when params.reconstruct; `runs` are the
    calibration inputs (the eval_data's). `only` as in prune_model."""
    started = time.perf_counter()
    if params.granularity == "structured":
        return _prune_structured(model, params, runs, only, started)
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

    record_layers(outcome, slots, shapes)
    if skipped:
        outcome.notes.append(cut_list("pruned by magnitude alone, without calibration: ", skipped))
    uncalibrated = [slots[index].name for index in range(len(slots)) if index not in views]
    calibrated = [layers[index] for index in sorted(layers)]
    return outcome, _report(params, runs, started, calibrated, uncalibrated)


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


def _prune_structured(
    model: ModelProto, params: PruneParams, runs: list[Feeds], only: str | None, started: float
) -> tuple[PruneOutcome, CalibrationReport]:
    """Structured pruning with units ranked by params.criterion, then the readers of removed
    channels re-fitted in graph order: weights and bias with reconstruct, else the bias."""
    params_before = float_param_count(model)  # before the zero biases, which add none
    slots = prunable_slots(model, params, only)  # before them too: `include` may not pick them
    shapes = [slot.shape for slot in slots]
    added = add_zero_biases(model)
    outcome = PruneOutcome(model, layers=[], params_before=params_before)
    original = copy_model(model)
    scorer = UNIT_CRITERIA[params.criterion](original, runs)
    found = prune_channels(
        model,
        slots,
        sparsity=params.sparsity,
        threshold=params.threshold,
        scope=params.scope,
        scorer=scorer,
    )
    outcome.groups = found.groups
    outcome.notes += found.notes
    # calibrated: reconstruct, or criterion activation, whose scores assume the bias
    # compensation a re-fit of the bias alone makes
    layers, skipped = _refit_consumers(
        model, original, found.removed, runs, outcome, solve=params.reconstruct
    )
    drop_zero_biases(model, added)
    record_layers(outcome, slots, shapes)
    if skipped:
        named = [f"{name} ({why})" for name, why in skipped]
        outcome.notes.append(cut_list("structured: not re-fitted after the cut: ", named))
    return outcome, _report(params, runs, started, layers, [name for name, _ in skipped])


def _report(
    params: PruneParams,
    runs: list[Feeds],
    started: float,
    layers: list[CalibratedLayer],
    uncalibrated: list[str],
) -> CalibrationReport:
    return CalibrationReport(
        criterion=params.criterion,
        reconstructed=params.reconstruct,
        runs=len(runs),
        samples=sum(_rows(feeds) for feeds in runs),
        seconds=time.perf_counter() - started,
        layers=layers,
        uncalibrated=uncalibrated,
    )


def _refit_consumers(
    model: ModelProto,
    original: ModelProto,
    removed: dict[str, dict[int, np.ndarray]],
    runs: list[Feeds],
    outcome: PruneOutcome,
    solve: bool,
) -> tuple[list[CalibratedLayer], list[tuple[str, str]]]:
    """Re-fit every weight whose input channels were cut, in graph order (its bias alone
    unless `solve`); the layers re-fitted and (name, why) for the cut weights left as they
    are."""
    positions, before_positions = node_positions(model), node_positions(original)
    before_slots = {slot.name: slot for slot in find_weights(original)}
    biases, before_biases = LayerBiases(model), LayerBiases(original)
    consumers: list[tuple[LayerView, LayerView, WeightSlot | None]] = []
    skipped: list[tuple[str, str]] = []
    for slot in find_weights(model):
        cut = removed.get(slot.name, {})
        view = layer_view(slot, model, positions)
        if isinstance(view, str):
            if cut:
                skipped.append((slot.name, view))
            continue
        if view.input_axis not in cut:
            continue  # its inputs are whole: nothing before it changed what it reads
        before = layer_view(before_slots[slot.name], original, before_positions)
        if isinstance(before, str):
            skipped.append((slot.name, before))
            continue
        bias = biases.of(view)
        if not solve and bias is None:
            continue  # criterion activation without reconstruct re-fits biases only
        if view.groups != 1 or before.groups != 1:
            # a grouped Conv's groups change width with the cut: no one-matrix least squares
            skipped.append((slot.name, "a grouped Conv is not re-fitted"))
            continue
        consumers.append((view, before, bias))
    layers = []
    for view, before, bias in sorted(consumers, key=lambda found: found[0].position):
        original_bias = before_biases.of(before) if bias is not None else None
        refit = Refit(view, before, bias, original_bias)
        layers.append(_refit(model, original, refit, removed, runs, outcome, solve))
    return layers, skipped


@dataclass(frozen=True)
class Refit:
    """A layer that read removed channels: its view in the pruned model and in the original,
    and its own bias in each (None: it has none to adjust)."""

    view: LayerView
    before: LayerView
    bias: WeightSlot | None
    original_bias: WeightSlot | None


def _refit(
    model: ModelProto,
    original: ModelProto,
    refit: Refit,
    removed: dict[str, dict[int, np.ndarray]],
    runs: list[Feeds],
    outcome: PruneOutcome,
    solve: bool,
) -> CalibratedLayer:
    """Ŵ = argmin ‖W X - Ŵ X̃‖² + λ‖Ŵ - W'‖² row by row, W' the weights as cut (SparseGPT's
    dampening, pulling toward them rather than toward zero): Ŵ = (W XᵀX̃ + λW')(X̃ᵀX̃ + λI)⁻¹. A
    layer's own bias is one more column of W, on an input that is always 1, so it is fitted
    with the weights; without `solve` only that column is (the mean of what the cut removed
    added back: FLAP's bias compensation). A row the dampened solve would make worse keeps its
    cut weights, so the error never goes up."""
    view, before, bias = refit.view, refit.before, refit.bias
    cut = removed[view.slot.name]
    output_axis = 1 - view.input_axis
    target_array = before.slot.read()
    if output_axis in cut:  # this layer's own outputs were cut too: match the surviving ones
        target_array = np.delete(target_array, cut[output_axis], axis=output_axis)
    target = before.matrix(target_array).astype(np.float64)  # W [out, in before the cut]
    current = view.matrix(view.slot.read()).astype(np.float64)  # W' [out, in after]
    if bias is not None:  # [W | b]: the bias is the weight of a constant input 1
        assert refit.original_bias is not None
        original_bias = refit.original_bias.read()  # [out] or [1, out]
        for axis, positions in removed.get(bias.name, {}).items():
            original_bias = np.delete(original_bias, positions, axis=axis)
        target = np.column_stack([target, original_bias.reshape(-1).astype(np.float64)])
        current = np.column_stack([current, bias.read().reshape(-1).astype(np.float64)])
    inputs = _paired_inputs(model, original, view, before, runs, ones=bias is not None)
    if solve:
        # λ from the inputs alone: the ones column's n would swamp a narrow layer's small ones
        weights_only = inputs.gram[:-1, :-1] if bias is not None else inputs.gram
        damp = damping(weights_only)
        right = target @ inputs.cross.T + damp * current
        solved = np.linalg.solve(inputs.gram + damp * np.eye(len(inputs.gram)), right.T).T
    else:  # the bias alone: _refit_consumers skips readers without one when not solving
        assert bias is not None
        solved = current.copy()
        rows = inputs.gram[-1, -1]  # Σ 1·1
        solved[:, -1] = (target @ inputs.cross[-1] - current[:, :-1] @ inputs.gram[-1, :-1]) / rows
    lost_before = output_errors(target, current, inputs)
    lost_after = output_errors(target, solved, inputs)
    worse = lost_after > lost_before
    solved[worse] = current[worse]
    if bias is not None:
        bias.write(solved[:, -1].reshape(bias.shape))
        solved = solved[:, :-1]
    _write(view.slot, view.restore(solved), outcome)
    base = float(output_errors(target, np.zeros_like(current), inputs).sum())
    method = "least_squares" if solve else "bias"
    return CalibratedLayer(
        name=view.slot.name,
        op=view.node.op_type,
        method=method,
        error_before=relative(float(lost_before.sum()), base),
        error_after=relative(float(np.minimum(lost_before, lost_after).sum()), base),
    )


def _paired_inputs(
    model: ModelProto,
    original: ModelProto,
    view: LayerView,
    before: LayerView,
    runs: list[Feeds],
    ones: bool,
) -> LayerInputs:
    """X̃ᵀX̃ [in', in'], X̃ᵀX [in', in] and XᵀX [in, in] of the layer's input in the model as
    re-fitted so far (X̃, narrower) and in the original (X), on the same rows, each row
    extended by a 1 when `ones` (one more in). One run's activations at a time, as
    input_statistics."""
    extra = int(ones)
    gram = np.zeros((view.width + extra, view.width + extra))
    cross = np.zeros((view.width + extra, before.width + extra))
    dense = np.zeros((before.width + extra, before.width + extra))
    pruned = session(exposing(model, view.input_name))
    dense_runner = session(exposing(original, before.input_name))
    for feeds in runs:
        now, then = run_exposed(pruned, feeds), run_exposed(dense_runner, feeds)
        # both in chunks of the same images, sized by the wider (original) layer
        images = min(view.images_per_chunk(now), before.images_per_chunk(then))
        pairs = zip(view.rows(now, 0, images), before.rows(then, 0, images), strict=True)
        for rows, original_rows in pairs:
            if ones:
                rows, original_rows = _with_ones(rows), _with_ones(original_rows)
            accumulate_gram(gram, rows)
            accumulate_gram(cross, rows, original_rows)
            accumulate_gram(dense, original_rows)
        del now, then  # before the next run's: one run at a time
    return LayerInputs(gram, cross, dense)


def _with_ones(rows: np.ndarray) -> np.ndarray:
    """rows [n, in] -> [n, in + 1], the last column 1: the input a bias multiplies."""
    return np.column_stack([rows, np.ones(len(rows), rows.dtype)])
