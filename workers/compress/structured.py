"""Structured pruning: whole channels, neurons and attention heads removed together with every
parameter slice coupled to them, so tensors, the file and the latency shrink.

The groups come from the channel dependency graph (workers/graph/channels.py). Each group's
units are ranked by the root-mean-square of all their coupled weight slices (the producing
layer's rows, the consuming layers' columns, across residual branches): RMS rather than the
norm so that `global` scope compares groups of different fan-in and unit size on one scale.

Removing a unit deletes its block from every slice, shrinks the counts that name the width
(Reshape targets, Conv `group`, Split sizes) and drops stale value_info. What the pruned model
computes is exactly the original with those channels zeroed where they are consumed: every op
on the way treats channels on their own, so the kept channels see the same values, and the
removed ones no longer reach any consumer. (A removed channel's bias or BatchNorm shift is not
folded into the consumer's bias, as Torch-Pruning does not either: the reference for exactness
is the channel zeroed at its consumers' inputs, not at its producer.)
"""

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper

from schemas.report import GroupReport
from schemas.vocabulary import Scope
from workers.errors import UnsupportedModelError, cut_list, one_line
from workers.graph.channels import ChannelGraph, ChannelGroup, Slice, shape_error
from workers.graph.walk import iter_graphs
from workers.graph.weights import FLOAT_TYPES, WeightSlot, find_weights
from workers.nn.masks import magnitude_masks

# onnxruntime's convolutions work on blocks of channels (NCHWc): a conv net pruned to odd
# widths ran slower than the original (PicoDet at 30%: 134 -> 138 ms, p50 on one thread),
# rounded to fours faster (-> 107 ms; eights 103 ms, but 16 channels would keep 8, not 11).
# As Torch-Pruning's round_to, conv groups of 8 or more channels keep a multiple of 4.
ROUND_TO = 4
ROUNDED_OPS = frozenset({"Conv", "ConvTranspose"})
MAX_GROUP_NOTES = 12  # notes naming groups left whole; the report's groups list has them all
CHUNK = 1 << 20  # elements squared at a time: float64 temporaries stay a few MB


@dataclass
class StructuredOutcome:
    """What structured pruning did: every group found, and notes in plain words."""

    groups: list[GroupReport]
    notes: list[str]
    # tensor -> axis -> the original indices deleted along it: calibrated.py re-fits the
    # consumers of removed channels against the original's surviving output rows
    removed: dict[str, dict[int, np.ndarray]]


def _squares_per_index(array: np.ndarray, piece: Slice) -> tuple[np.ndarray, int]:
    """Sum of squares of each index of the slice along its axis ([size], float64), and the
    elements each index holds. Chunked, so a 64 MB weight costs no 128 MB float64 copy."""
    along = np.moveaxis(array, piece.axis, 0)  # a view
    size = int(piece.span.size)
    view = along[piece.span.offset : piece.span.offset + size]
    width = int(np.prod(view.shape[1:]))
    rows = max(1, CHUNK // max(width, 1))
    sums = np.empty(size)
    for start in range(0, size, rows):
        part = view[start : start + rows].reshape(-1, width).astype(np.float64)
        sums[start : start + rows] = np.einsum("ij,ij->i", part, part)
    return sums, width


def unit_scores(
    group: ChannelGroup, constants: dict[str, TensorProto], weights: set[str]
) -> np.ndarray:
    """RMS of each unit's coupled weights: [units]. Biases and norm statistics are not
    magnitudes of a connection, so only weights count (all slices if the group has none)."""
    pieces = [piece for piece in group.slices if piece.tensor in weights] or group.slices
    squares = np.zeros(group.units)
    elements = 0
    for piece in pieces:
        sums, width = _squares_per_index(numpy_helper.to_array(constants[piece.tensor]), piece)
        per_unit = sums.reshape(group.units, -1)  # [units, indices of one unit]
        squares += per_unit.sum(axis=1)
        elements += per_unit.shape[1] * width
    return np.sqrt(squares / max(elements, 1))


class UnitScorer(Protocol):
    """Ranks one group's units: higher is kept first. `wording` says how, for the notes."""

    @property
    def wording(self) -> str: ...

    def __call__(self, group: ChannelGroup, constants: dict[str, TensorProto]) -> np.ndarray:
        """One score per unit: [units]."""
        ...


@dataclass
class WeightMagnitude:
    """The magnitude criterion of structured pruning: unit_scores over the model's weights."""

    weights: set[str]
    wording: str = "the RMS of all their coupled weights"

    def __call__(self, group: ChannelGroup, constants: dict[str, TensorProto]) -> np.ndarray:
        return unit_scores(group, constants, self.weights)


def _indices(offset: int, size: int, units: int, removed: np.ndarray) -> np.ndarray:
    """Positions along an axis of the removed units' blocks."""
    per = size // units
    return (offset + removed[:, None] * per + np.arange(per)[None, :]).reshape(-1)


def _cut_slices(
    cuts: list[tuple[ChannelGroup, np.ndarray]], constants: dict[str, TensorProto]
) -> dict[str, dict[int, np.ndarray]]:
    """Delete every removed block from every constant, all groups at once (a Concat's consumer
    is cut by several groups, each at its own offset); the positions deleted, by tensor and
    axis."""
    doomed: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for group, removed in cuts:
        for piece in group.slices:
            positions = _indices(piece.span.offset, int(piece.span.size), group.units, removed)
            doomed[(piece.tensor, piece.axis)].append(positions)
    by_tensor: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for (name, axis), parts in doomed.items():
        by_tensor[name][axis] = np.unique(np.concatenate(parts))
    for name, axes in by_tensor.items():
        holder = constants[name]
        array = numpy_helper.to_array(holder)
        for axis, positions in axes.items():
            array = np.delete(array, positions, axis=axis)
        holder.CopyFrom(numpy_helper.from_array(array, holder.name))
    return by_tensor


def _shrink_counts(
    model: ModelProto,
    cuts: list[tuple[ChannelGroup, np.ndarray]],
    constants: dict[str, TensorProto],
) -> None:
    """Lower every integer that counts removed channels: a Reshape target's element, Resize
    sizes, Split sizes (inputs: rewritten as a new initializer for that node alone, as
    exporters share small constants), a Conv's group or Split's split (attributes)."""
    drops: dict[tuple[int, int | None, str | None], dict[int | None, int]] = defaultdict(
        lambda: defaultdict(int)
    )
    for group, removed in cuts:
        for count in group.counts:
            key = (count.node, count.input, count.attr)
            drops[key][count.element] += int(count.size * len(removed) / group.units)
    graph = model.graph
    replaced = []
    for (position, input_index, attr), elements in drops.items():
        node = graph.node[position]
        if input_index is None:
            _lower_attribute(node, attr or "", elements)
            continue
        replaced.append(node.input[input_index])
        _lower_input(graph, node, input_index, elements, constants)
    _remove_unread(graph, set(replaced))


def _lower_input(
    graph: GraphProto,
    node: NodeProto,
    input_index: int,
    elements: dict[int | None, int],
    constants: dict[str, TensorProto],
) -> None:
    old = node.input[input_index]
    array = numpy_helper.to_array(constants[old]).copy()
    for element, drop in elements.items():
        array.reshape(-1)[element or 0] -= drop
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    name = f"{old}_pruned"
    while name in taken:
        name += "_"
    graph.initializer.append(numpy_helper.from_array(array, name))
    constants[name] = graph.initializer[-1]
    node.input[input_index] = name


def _lower_attribute(node: NodeProto, name: str, elements: dict[int | None, int]) -> None:
    attr = next(a for a in node.attribute if a.name == name)
    for element, drop in elements.items():
        if element is None:
            attr.i -= drop
        else:
            attr.ints[element] -= drop


def _remove_unread(graph: GraphProto, names: set[str]) -> None:
    """Constants that a rewritten count replaced and nothing reads any more. Deleted in place:
    rebuilding the initializer list would copy every weight of the model once more."""
    if not names:
        return
    read = {name for inner, _ in iter_graphs(graph) for n in inner.node for name in n.input}
    gone = names - read - {value.name for value in graph.output}
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in gone:
            del graph.initializer[index]
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if node.op_type == "Constant" and node.output[0] in gone:
            del graph.node[index]


def _drop_value_info(model: ModelProto, names: set[str]) -> None:
    """Shapes recorded for the narrowed values are stale; onnxruntime infers them again."""
    kept = [info for info in model.graph.value_info if info.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _report(group: ChannelGroup, kept_units: int | None, note: str | None) -> GroupReport:
    kept = group.channels if kept_units is None else kept_units * group.unit
    return GroupReport(
        leading=group.leading,
        node=group.node,
        op=group.op,
        channels=group.channels,
        kept=kept,
        unit=group.unit if not group.blocked else 1,
        tensors=len(group.slices),
        note=note,
    )


def _refusal(groups: list[ChannelGroup], notes: dict[int, str]) -> UnsupportedModelError:
    first = next(iter(notes.items()), None)
    why = (
        f" ({groups[first[0]].leading}: {one_line(first[1], 140)})"
        if first
        else " (no Conv, Gemm or MatMul in the main graph has a constant weight and 2 or more "
        "output channels; weights inside If/Loop/Scan bodies are not pruned by channel)"
    )
    return UnsupportedModelError(
        one_line(
            "structured pruning found no channel group it can remove channels from safely"
            f"{why}; use granularity=unstructured"
        )
    )


def prune_channels(
    model: ModelProto,
    candidates: list[WeightSlot],
    *,
    sparsity: float | None,
    threshold: float | None,
    scope: Scope,
    scorer: UnitScorer | None = None,
) -> StructuredOutcome:
    """Remove the weakest units of every prunable group in place, ranked by `scorer` (default:
    WeightMagnitude). A group is prunable when its channels could be followed everywhere and
    its leading weight is a candidate (include / exclude); the others are reported with the
    reason they were left whole."""
    channel_graph = ChannelGraph(model)
    groups = channel_graph.groups()
    chosen = {slot.name for slot in candidates}
    notes: dict[int, str] = {}
    taken: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    for index, group in enumerate(groups):
        if group.blocked:
            notes[index] = group.blocked
        elif group.leading not in chosen:
            notes[index] = "its weight is not among the prunable tensors (include/exclude)"
        elif overlap := _overlapping(group, taken):
            notes[index] = f"it shares {overlap!r} with an earlier group"
    live = [index for index in range(len(groups)) if index not in notes]
    if not live:
        raise _refusal(groups, notes)
    constants = channel_graph.constants
    scorer = scorer or WeightMagnitude({slot.name for slot in find_weights(model)})
    scores = [scorer(groups[index], constants) for index in live]
    masks = magnitude_masks(scores, sparsity=sparsity, threshold=threshold, scope=scope)
    cuts = []
    kept_units: dict[int, int] = {}
    for index, score, keep in zip(live, scores, masks, strict=True):
        if not keep.any():  # a group of width 0 is not a model: keep its strongest unit
            keep[np.argmax(score)] = True
        keep = _rounded(groups[index], keep, score)
        kept_units[index] = int(keep.sum())
        removed = np.flatnonzero(~keep)
        if removed.size:
            cuts.append((groups[index], removed))
    consistent = shape_error(model) is None  # some exports fail strict inference as they are
    deleted = _cut_slices(cuts, constants)
    _shrink_counts(model, cuts, constants)
    # the shapes an export recorded for the narrowed values and weights (PyTorch writes one
    # per tensor, 2.10's exporter for initializers too) go before the check, which would
    # otherwise compare against them
    narrowed = {dim.value for group, _ in cuts for dim in group.dims}
    narrowed |= {piece.tensor for group, _ in cuts for piece in group.slices}
    _drop_value_info(model, narrowed)
    if consistent and (error := shape_error(model)):
        # a rule got a pattern wrong: refuse rather than hand back a model that cannot run
        raise UnsupportedModelError(
            one_line(
                f"structured pruning left the graph inconsistent ({error}); use "
                "granularity=unstructured"
            )
        )
    reports = [_report(g, kept_units.get(i), notes.get(i)) for i, g in enumerate(groups)]
    share = _share_note([groups[index] for index in live], constants)
    notes = _notes(reports, len(live), scorer.wording)
    return StructuredOutcome(reports, notes + share, deleted)


def _overlapping(group: ChannelGroup, taken: dict[tuple[str, int], list[tuple[int, int]]]) -> str:
    """A constant this group would slice where an earlier group already does ('' if none),
    else record its ranges. The walk makes coupled channels one group, so this is a guard: two
    groups deleting the same indices would corrupt the tensor."""
    ranges = [
        ((piece.tensor, piece.axis), (piece.span.offset, piece.span.offset + int(piece.span.size)))
        for piece in group.slices
    ]
    for key, (start, end) in ranges:
        if any(start < other_end and other_start < end for other_start, other_end in taken[key]):
            return key[0]
    for key, bounds in ranges:
        taken[key].append(bounds)
    return ""


def _rounded(group: ChannelGroup, keep: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The strongest units, as many as `keep` holds rounded to ROUND_TO channels (half up,
    at least ROUND_TO), for conv groups of plain channels wide enough to round."""
    if group.op not in ROUNDED_OPS or group.unit != 1 or group.channels < 2 * ROUND_TO:
        return keep
    count = int(np.floor(keep.sum() / ROUND_TO + 0.5)) * ROUND_TO
    count = min(group.channels, max(ROUND_TO, count))
    rounded = np.zeros_like(keep)
    rounded[np.argsort(-score, kind="stable")[:count]] = True
    return rounded


def _share_note(live: list[ChannelGroup], constants: dict[str, TensorProto]) -> list[str]:
    """Why the file shrinks less than the sparsity, when most bytes sit outside the groups (a
    transformer's vocabulary embedding, a residual width left whole)."""
    sizes = {
        name: int(np.prod(tensor.dims))
        for name, tensor in constants.items()
        if tensor.data_type in FLOAT_TYPES
    }
    total = sum(sizes.values())
    touched = {piece.tensor for group in live for piece in group.slices}
    share = sum(sizes[name] for name in touched) / max(total, 1)
    if share >= 0.6:
        return []
    largest = max((name for name in sizes if name not in touched), key=sizes.__getitem__)
    return [
        one_line(
            f"structured: the pruned groups' tensors hold {share:.0%} of the float parameters; "
            f"the rest stays as it was (largest: {largest!r}, {sizes[largest] / total:.0%}, "
            "e.g. an embedding or a width left whole), so the file shrinks less than the sparsity"
        )
    ]


def _notes(reports: list[GroupReport], prunable: int, wording: str) -> list[str]:
    removed = sum(r.channels - r.kept for r in reports)
    total = sum(r.channels for r in reports if r.note is None)
    # global scope may take nothing from a prunable group: count the groups that lost channels
    cut = sum(r.kept < r.channels for r in reports)
    notes = [
        f"structured: {removed} of {total} channels removed from {cut} of the {prunable} "
        f"prunable channel groups ({len(reports)} in all); units ranked by {wording}"
    ]
    whole = [r for r in reports if r.note is not None]
    for report in whole[:MAX_GROUP_NOTES]:
        notes.append(
            one_line(f"structured: kept every output channel of {report.leading}: {report.note}")
        )
    if len(whole) > MAX_GROUP_NOTES:
        rest = [r.leading for r in whole[MAX_GROUP_NOTES:]]
        notes.append(cut_list("structured: also left whole (see groups): ", rest))
    return notes
