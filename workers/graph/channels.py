"""The channel dependency graph of an ONNX model: which parameter slices go together when one
output channel of a Conv, Gemm or MatMul is removed (DepGraph, Fang et al. CVPR 2023, as
Torch-Pruning builds it for PyTorch modules; here over ONNX nodes).

A group starts at a layer's output channels and follows them through the graph, forwards to
every reader and backwards to every producer, until each path ends where the channels are
consumed (the next layer's input slice) or cannot be followed. Each operator kind has one rule
(RULES) that, given the axis of one of its tensors the channels run along, says which axes of its
other tensors run with them. A rule ends the group with `Blocked` when the channels mix (a
normalisation over them, a reduction, a model output): such a group is left whole.

Positions along an axis are a `Span`: the group's C base channels (the leading layer's) cover
`size` indices from `offset`, base channel j the block [offset + j*size/C, offset + (j+1)*size/C).
`size` may be smaller than C (an attention reshape puts C channels into C/d heads), so the
group's unit, what selection removes at once, is whatever makes every span whole: a head, a
conv group, a depthwise channel with its multiplier.
"""

import itertools
import math
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from onnx import (
    GraphProto,
    ModelProto,
    NodeProto,
    TensorProto,
    helper,
    numpy_helper,
    shape_inference,
)

from workers.errors import one_line
from workers.graph.walk import attribute, iter_graphs, node_subgraphs
from workers.graph.weights import FLOAT_TYPES

Shape = tuple[int | None, ...]  # None: a dim not known before run time (batch, sequence)


class Blocked(Exception):
    """The channels cannot be followed through this node: the group is left whole."""


@dataclass(frozen=True)
class Span:
    """Where the group's channels sit along one axis (see the module docstring)."""

    offset: int
    size: Fraction

    def scaled(self, factor: Fraction) -> "Span":
        offset = self.offset * factor
        if offset.denominator != 1:
            raise Blocked(f"channels start at {self.offset}, inside a block of {1 / factor}")
        return Span(int(offset), self.size * factor)

    def shifted(self, delta: int) -> "Span":
        return Span(self.offset + delta, self.size)


@dataclass(frozen=True)
class Port:
    """One tensor of a node: input or output `index`."""

    output: bool
    index: int


@dataclass(frozen=True)
class Link:
    """A rule's answer: the group's channels also run along `axis` of the node's tensor `port`."""

    port: Port
    axis: int
    span: Span


@dataclass(frozen=True)
class Count:
    """An integer of the graph that counts the group's channels and shrinks with them: element
    `element` of the node's input `input` (a Reshape target, Resize sizes, Split sizes), or of
    its attribute `attr` (a Conv's group, Split's split) when `input` is None."""

    node: int  # position in graph.node
    input: int | None
    attr: str | None
    element: int | None  # None: the attribute is a scalar
    size: Fraction  # how much the integer counts when the group is whole


@dataclass(frozen=True)
class Dim:
    """An activation axis the group runs along."""

    value: str
    axis: int
    span: Span


@dataclass(frozen=True)
class Slice:
    """A constant's slice that goes with the group (weights, biases, norm parameters)."""

    tensor: str
    axis: int
    span: Span


@dataclass
class ChannelGroup:
    """Coupled channels: removing unit j removes its block from every slice, dim and count."""

    leading: str  # the weight whose output channels started the group
    node: str  # the node that weight feeds
    op: str  # its op_type
    channels: int  # C: the leading layer's output channels
    dims: list[Dim] = field(default_factory=list)
    slices: list[Slice] = field(default_factory=list)
    counts: list[Count] = field(default_factory=list)
    blocked: str | None = None  # why the group is left whole

    @property
    def unit(self) -> int:
        """Base channels removed together: the least that makes every span a whole number of
        indices (1 for plain channels, the head size for attention, groups for grouped conv)."""
        sizes = [part.span.size for part in (*self.dims, *self.slices)]
        sizes += [count.size for count in self.counts]
        return math.lcm(1, *((Fraction(size) / self.channels).denominator for size in sizes))

    @property
    def units(self) -> int:
        return self.channels // self.unit


@dataclass
class RuleContext:
    """What rules may ask about the graph: shapes, constants, opset."""

    graph: GraphProto
    opset: int
    shapes: dict[str, Shape]
    constants: dict[str, TensorProto]
    positions: dict[int, int]  # id(node) -> position in graph.node
    producers: dict[str, NodeProto]
    readers: dict[str, list[NodeProto]]

    def shape(self, name: str) -> Shape:
        found = self.shapes.get(name)
        if found is None:
            raise Blocked(f"the shape of {name!r} is not known")
        return found

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def ints(self, node: NodeProto, attr: str, input_index: int) -> list[int] | None:
        """An integer list given as an attribute (older opsets) or a constant input (newer)."""
        value = attribute(node, attr, None)
        if value is not None:
            return [int(v) for v in np.atleast_1d(value)]
        if input_index < len(node.input) and node.input[input_index]:
            array = self.constant(node.input[input_index])
            if array is None:
                raise Blocked(f"its {attr} input is computed at run time")
            return [int(v) for v in array.reshape(-1)]
        return None

    def position(self, node: NodeProto) -> int:
        return self.positions[id(node)]


Found = list["Link | Count"]
Rule = Callable[[RuleContext, NodeProto, Port, int, Span], Found]


def _port_name(node: NodeProto, port: Port) -> str:
    names = node.output if port.output else node.input
    return names[port.index] if port.index < len(names) else ""


def _dim(ctx: RuleContext, node: NodeProto, port: Port, axis: int) -> int | None:
    return ctx.shape(_port_name(node, port))[axis]


IN0, OUT0 = Port(False, 0), Port(True, 0)


# ------------------------------------------------------------------------------------- rules


def same_axis(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Input 0 and output 0 run channel for channel (activations, Cast, Dropout, Clip...)."""
    if port not in (IN0, OUT0):
        raise Blocked(f"channels reach its input {port.index}, not the data input")
    return [Link(IN0, axis, span), Link(OUT0, axis, span)]


def broadcast(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Elementwise with numpy broadcasting (Add, Mul, Where...): axes align from the end; an
    input that has the axis at size 1, or not at all, is the same for every channel."""
    from_end = ctx.rank(_port_name(node, port)) - axis
    links: Found = []
    ports = [Port(False, i) for i, name in enumerate(node.input) if name]
    for other in [*ports, OUT0]:
        shape = ctx.shape(_port_name(node, other))
        if from_end > len(shape):
            continue
        other_axis = len(shape) - from_end
        size = shape[other_axis]
        if size == 1 and span.size != 1:
            continue
        if size is None:
            raise Blocked(f"cannot tell whether input {_port_name(node, other)!r} broadcasts")
        links.append(Link(other, other_axis, span))
    return links


def batch_norm(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Per-channel scale, shift, mean and variance: sliced with the channels (inference mode)."""
    if attribute(node, "training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise Blocked("it runs in training mode")
    links = same_axis(ctx, node, port, axis, span)
    if axis == 1:
        links += [Link(Port(False, i), 0, span) for i in range(1, len(node.input))]
    return links


def instance_norm(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Statistics per sample and channel, over the spatial axes: channels stay independent."""
    if axis != 1:
        raise Blocked("it normalises over this axis")
    params = [Link(Port(False, i), 0, span) for i in (1, 2)]
    return [*same_axis(ctx, node, port, axis, span), *params]


def normalised_over(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """LayerNormalization from `axis` on: removing a channel there changes the mean and variance
    every other channel is divided by, so it is not exact."""
    rank = ctx.rank(_port_name(node, port))
    if axis >= attribute(node, "axis", -1) % rank:
        raise Blocked("it normalises over the channels (pruning across it is not exact)")
    return same_axis(ctx, node, port, axis, span)


def softmax(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    rank = ctx.rank(_port_name(node, port))
    default = -1 if ctx.opset >= 13 else 1
    along = attribute(node, "axis", default) % rank
    if axis == along or (ctx.opset < 13 and axis > along):
        raise Blocked("it normalises over the channels")
    return same_axis(ctx, node, port, axis, span)


def reduce(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """A reduction over other axes passes the channels; over them it mixes them."""
    rank = ctx.rank(node.input[0])
    axes = ctx.ints(node, "axes", 1)
    if not axes:
        if attribute(node, "noop_with_empty_axes", 0):
            return same_axis(ctx, node, port, axis, span)
        raise Blocked("it reduces over every axis")
    axes = [a % rank for a in axes]
    keep = attribute(node, "keepdims", 1)
    kept = list(range(rank)) if keep else [a for a in range(rank) if a not in axes]
    in_axis = kept[axis] if port.output else axis
    if in_axis in axes:
        raise Blocked("it reduces over the channels")
    return [Link(IN0, in_axis, span), Link(OUT0, kept.index(in_axis), span)]


def pool(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Pooling works on each channel's spatial plane alone."""
    if axis not in (0, 1) or len([o for o in node.output if o]) > 1:
        raise Blocked("it pools over this axis or also returns indices")
    return same_axis(ctx, node, port, axis, span)


def pad(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    rank = ctx.rank(node.input[0])
    if len(node.input) > 3 and node.input[3]:
        raise Blocked("it pads selected axes")
    pads = ctx.ints(node, "pads", 1)
    if pads is None or pads[axis] or pads[axis + rank]:
        raise Blocked("it pads the channel axis")
    return same_axis(ctx, node, port, axis, span)


def resize(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Upsampling scales the spatial axes; the channel axis passes when its scale is 1 (or its
    target size, which then shrinks with the channels)."""
    if attribute(node, "axes", None) is not None:
        raise Blocked("it resizes selected axes")
    links = same_axis(ctx, node, port, axis, span)
    if len(node.input) > 3 and node.input[3]:
        sizes = ctx.ints(node, "sizes", 3)
        if sizes is None or sizes[axis] != _dim(ctx, node, IN0, axis):
            raise Blocked("it resizes the channel axis")
        return [*links, Count(ctx.position(node), 3, None, axis, span.size)]
    scales_at = 1 if node.op_type == "Upsample" or ctx.opset < 11 else 2
    scales = ctx.constant(node.input[scales_at]) if len(node.input) > scales_at else None
    if scales is None:
        scales = attribute(node, "scales", None)
    if scales is None or float(np.asarray(scales).reshape(-1)[axis]) != 1.0:
        raise Blocked("it scales the channel axis, or its scales are computed at run time")
    return links


def transpose(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    rank = ctx.rank(node.input[0])
    perm = list(attribute(node, "perm", list(reversed(range(rank)))))
    in_axis = perm[axis] if port.output else axis
    return [Link(IN0, in_axis, span), Link(OUT0, perm.index(in_axis), span)]


def _kept_axes(ctx: RuleContext, node: NodeProto, rank: int, squeeze: bool) -> list[int]:
    """Of the larger side (Squeeze's input, Unsqueeze's output), the axes the smaller has."""
    axes = ctx.ints(node, "axes", 1)
    if axes is None:
        if not squeeze:
            raise Blocked("it has no axes")
        axes = [a for a, size in enumerate(ctx.shape(node.input[0])) if size == 1]
    axes = [a % rank for a in axes]
    return [a for a in range(rank) if a not in axes]


def squeeze(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    kept = _kept_axes(ctx, node, ctx.rank(node.input[0]), squeeze=True)
    in_axis = kept[axis] if port.output else axis
    if in_axis not in kept:
        raise Blocked("it squeezes the channel axis")
    return [Link(IN0, in_axis, span), Link(OUT0, kept.index(in_axis), span)]


def unsqueeze(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    kept = _kept_axes(ctx, node, ctx.rank(node.output[0]), squeeze=False)
    out_axis = axis if port.output else kept[axis]
    if out_axis not in kept:
        raise Blocked("the channels reach an inserted axis")
    return [Link(IN0, kept.index(out_axis), span), Link(OUT0, out_axis, span)]


def _every_port(node: NodeProto, axis: int, span: Span) -> Found:
    ports = [Port(False, i) for i, name in enumerate(node.input) if name]
    ports += [Port(True, i) for i, name in enumerate(node.output) if name]
    return [Link(port, axis, span) for port in ports]


def _starts(ctx: RuleContext, names: list[str], axis: int) -> list[int]:
    """Offsets of consecutive tensors along `axis`, and the end."""
    starts = [0]
    for name in names:
        size = ctx.shape(name)[axis]
        if size is None:
            raise Blocked(f"the size of {name!r} along the axis is not known")
        starts.append(starts[-1] + size)
    return starts


def _holder(starts: list[int], span: Span) -> int:
    """Which of the consecutive ranges holds the whole span."""
    for index, (start, end) in enumerate(itertools.pairwise(starts)):
        if start <= span.offset and span.offset + span.size <= end:
            return index
    raise Blocked("the channels span several of its parts")


def concat(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Along the concat axis each input holds its own offset range of the output."""
    along = attribute(node, "axis", 0) % ctx.rank(node.output[0])
    if axis != along:
        return _every_port(node, axis, span)
    starts = _starts(ctx, list(node.input), along)
    index = _holder(starts, span) if port.output else port.index
    inner = span.shifted(-starts[index]) if port.output else span
    return [Link(Port(False, index), axis, inner), Link(OUT0, axis, inner.shifted(starts[index]))]


def split(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Along the split axis each output takes its own offset range of the input; its size
    (attribute or input) shrinks with the channels."""
    along = attribute(node, "axis", 0) % ctx.rank(node.input[0])
    if axis != along:
        return _every_port(node, axis, span)
    if ctx.ints(node, "split", 1) is None:
        raise Blocked("it splits into equal parts (no explicit sizes to shrink)")
    starts = _starts(ctx, list(node.output), along)
    index = port.index if port.output else _holder(starts, span)
    inner = span if port.output else span.shifted(-starts[index])
    in_attr = attribute(node, "split", None) is not None
    count = Count(
        ctx.position(node),
        None if in_attr else 1,
        "split" if in_attr else None,
        index,
        span.size,
    )
    return [
        Link(IN0, axis, inner.shifted(starts[index])),
        Link(Port(True, index), axis, inner),
        count,
    ]


def _inner(shape: Shape, axis: int) -> int | None:
    """Elements after `axis`, or None when one of them is unknown."""
    rest = shape[axis + 1 :]
    return None if any(size is None for size in rest) else math.prod(rest)  # type: ignore[arg-type]


def regroup(source: Shape, target: Shape, axis: int, span: Span) -> tuple[int, Span]:
    """Where `axis` of `source` goes when the same elements are viewed as `target` (Reshape,
    Flatten): the target axis that covers exactly the same outer extent, so channel blocks map
    to contiguous blocks (a flatten widens each channel to its HxW block; a head split narrows
    C channels to C/d heads)."""
    size, inner = source[axis], _inner(source, axis)
    if size is None or inner is None:
        raise Blocked("the sizes after the channel axis are not known")
    matches = []
    for other, other_size in enumerate(target):
        other_inner = _inner(target, other)
        if other_size is None or other_inner is None or other_size < 2:
            continue
        if other_size * other_inner == size * inner:
            matches.append((other_size, other, other_inner))
    if not matches:
        raise Blocked("it spreads the channels over several axes")
    _, other, other_inner = max(matches)
    return other, span.scaled(Fraction(inner, other_inner))


@dataclass(frozen=True)
class _Element:
    """One element of a Reshape target: its value when known, and where it is stored."""

    value: int | None
    node: int | None = None  # the node whose input holds it, when it is a constant
    input: int = 1
    element: int = 0


def _target(ctx: RuleContext, node: NodeProto) -> list[_Element]:
    """A Reshape's target shape: a constant, or a Concat of pieces (PyTorch's exporter writes
    batch and sequence as Shape->Gather pieces and the head sizes as constants)."""
    name = node.input[1]
    array = ctx.constant(name)
    if array is not None:
        where = ctx.position(node)
        return [_Element(int(v), where, 1, i) for i, v in enumerate(array.reshape(-1))]
    maker = ctx.producers.get(name)
    while maker is not None and maker.op_type in PASS_THROUGH:  # tf2onnx casts it to int64
        maker = ctx.producers.get(maker.input[0])
    if maker is None or maker.op_type != "Concat":
        raise Blocked("its target shape is computed at run time")
    elements: list[_Element] = []
    for index, piece in enumerate(maker.input):
        reader, position = maker, index
        caster = ctx.producers.get(piece)
        if caster is not None and caster.op_type in PASS_THROUGH:  # Paddle casts constants
            reader, position = caster, 0
        values = ctx.constant(reader.input[position])
        if values is not None:
            where = ctx.position(reader)
            elements += [_Element(int(v), where, position, i) for i, v in enumerate(values.ravel())]
            continue
        length = ctx.shape(piece)
        if len(length) != 1 or length[0] is None:
            raise Blocked("its target shape is computed at run time")
        elements += [_Element(None)] * length[0]
    return elements


def reshape(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """A view change: the channels move to the target axis that spans the same elements (a
    head split [B, S, 384] -> [B, S, 12, 32] makes heads the unit); the target's explicit size
    for that axis shrinks with them."""
    source = ctx.shape(node.input[0])
    elements = _target(ctx, node)
    inferred = ctx.shapes.get(node.output[0]) or (None,) * len(elements)
    if len(inferred) != len(elements):
        raise Blocked("its target shape does not match its output")
    copies = not attribute(node, "allowzero", 0)
    target = tuple(
        inferred[i]
        if e.value is None or e.value < 0
        else (source[i] if e.value == 0 and copies else e.value)
        for i, e in enumerate(elements)
    )
    if port.output:
        out_axis, out_span = axis, span
        in_axis, in_span = regroup(target, source, axis, span)
    else:
        in_axis, in_span = axis, span
        out_axis, out_span = regroup(source, target, axis, span)
    links: Found = [Link(IN0, in_axis, in_span), Link(OUT0, out_axis, out_span)]
    element = elements[out_axis]
    if element.value is None:
        raise Blocked("the target size of the channel axis is computed at run time")
    if element.value > 0 and element.node is not None:
        links.append(Count(element.node, element.input, None, element.element, out_span.size))
    elif element.value == 0 and in_axis != out_axis:
        raise Blocked("its target copies a different axis")
    return links


def flatten(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """[N, C, H, W] -> [N, C*H*W]: each channel owns its H*W block of the flattened row."""
    source = ctx.shape(node.input[0])
    at = attribute(node, "axis", 1) % max(len(source), 1)
    lead, rest = source[:at], source[at:]
    target: Shape = (
        None if None in lead else math.prod(lead),  # type: ignore[arg-type]
        None if None in rest else math.prod(rest),  # type: ignore[arg-type]
    )
    if port.output:
        in_axis, in_span = regroup(target, source, axis, span)
        return [Link(IN0, in_axis, in_span), Link(OUT0, axis, span)]
    out_axis, out_span = regroup(source, target, axis, span)
    return [Link(IN0, axis, span), Link(OUT0, out_axis, out_span)]


def conv(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Output channel c is weight row c and bias c. With group 1 the input channels are the
    layer's inputs (weight column c); grouped and depthwise convs pass whole groups through,
    their `group` shrinking with them."""
    if axis != 1 or port.index > 0:
        raise Blocked("the channels reach its weight, bias or batch axis")
    weight = ctx.shape(node.input[1])
    groups = int(attribute(node, "group", 1))
    if port == IN0 and groups == 1:
        return [Link(Port(False, 1), 1, span)]
    per_in, per_out = Fraction(weight[1]), Fraction(weight[0], groups)  # type: ignore[arg-type]
    if port.output:
        out_span, in_span = span, span.scaled(per_in / per_out)
    else:
        in_span, out_span = span, span.scaled(per_out / per_in)
    links: Found = [Link(OUT0, 1, out_span), Link(Port(False, 1), 0, out_span)]
    if len(node.input) > 2 and node.input[2]:
        links.append(Link(Port(False, 2), 0, out_span))
    if groups > 1:
        group_count = Count(ctx.position(node), None, "group", None, out_span.size / per_out)
        links += [Link(IN0, 1, in_span), group_count]
    return links


def conv_transpose(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Weight [C_in, C_out, kH, kW]: input channel c is weight row c, output channel c column c."""
    if axis != 1 or port.index > 0 or int(attribute(node, "group", 1)) != 1:
        raise Blocked("grouped, or the channels reach its weight or batch axis")
    if port == IN0:
        return [Link(Port(False, 1), 0, span)]
    links: Found = [Link(OUT0, 1, span), Link(Port(False, 1), 1, span)]
    if len(node.input) > 2 and node.input[2]:
        links.append(Link(Port(False, 2), 0, span))
    return links


def gemm(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Y = A·B (+ C): A's columns meet B's rows (transB: columns); Y's columns are B's columns
    and C's entries."""
    if attribute(node, "transA", 0):
        raise Blocked("it transposes its input (transA)")
    trans_b = attribute(node, "transB", 0)
    if port == IN0 and axis == 1:
        return [Link(Port(False, 1), 1 if trans_b else 0, span)]
    if port == OUT0 and axis == 1:
        links: Found = [Link(OUT0, 1, span), Link(Port(False, 1), 0 if trans_b else 1, span)]
        if len(node.input) > 2 and node.input[2]:
            bias = ctx.shape(node.input[2])
            if bias and bias[-1] != 1:
                links.append(Link(Port(False, 2), len(bias) - 1, span))
        return links
    raise Blocked("the channels reach its weight, bias or batch axis")


# MatMul A[..., M, K] · B[..., K, N] -> [..., M, N]: for (operand, axis from the end), the
# other operand axis it runs with. 0 = A, 1 = B, 2 = output.
MATMUL_AXES: dict[tuple[int, int], tuple[int, int]] = {
    (0, 1): (1, 2),  # K of A with K of B: contracted, the consumer's input rows
    (1, 2): (0, 1),
    (0, 2): (2, 2),  # M runs from A to the output
    (2, 2): (0, 2),
    (1, 1): (2, 1),  # N runs from B to the output: a layer's output columns
    (2, 1): (1, 1),
}


def matmul(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """A·B: K couples A and B, M runs from A and N from B to the output; batch axes (attention
    heads) run through all three, aligned from the end."""
    names = [node.input[0], node.input[1], node.output[0]]
    ranks = [ctx.rank(name) for name in names]
    if min(ranks[:2]) < 2:
        raise Blocked("it multiplies a vector")
    ports = [Port(False, 0), Port(False, 1), OUT0]
    which = 2 if port.output else port.index
    from_end = ranks[which] - axis
    if from_end <= 2:
        other, other_end = MATMUL_AXES[(which, from_end)]
        return [Link(ports[other], ranks[other] - other_end, span)]
    links: Found = []
    for other in range(3):
        if from_end <= ranks[other]:
            other_axis = ranks[other] - from_end
            if ctx.shape(names[other])[other_axis] != 1:
                links.append(Link(ports[other], other_axis, span))
    return links


PASS_THROUGH = frozenset({"Cast", "Identity"})  # shape arithmetic that keeps the values


def _readers_past(ctx: RuleContext, value: str) -> list[NodeProto]:
    """The readers of `value`, looking through Cast and Identity to the nodes that use it."""
    found = []
    for reader in ctx.readers.get(value, []):
        if reader.op_type in PASS_THROUGH:
            found += _readers_past(ctx, reader.output[0])
        else:
            found.append(reader)
    return found


def _shape_positions(ctx: RuleContext, reader: NodeProto, length: int) -> set[int] | None:
    """Which elements of a shape vector of `length` a Gather or a Slice (constant indices,
    step 1) takes; None when it cannot tell."""
    if reader.op_type == "Gather":
        index = ctx.constant(reader.input[1])
        return None if index is None else {int(i) % length for i in np.ravel(index)}
    if reader.op_type != "Slice" or len(reader.input) < 3:
        return None
    bounds = [ctx.constant(name) for name in reader.input[1:3]]
    steps = ctx.constant(reader.input[4]) if len(reader.input) > 4 and reader.input[4] else None
    if any(b is None or b.size != 1 for b in bounds) or (steps is not None and steps.item() != 1):
        return None
    start, end = (int(b.item()) for b in bounds)  # type: ignore[union-attr]
    return set(range(length)[slice(start, end)])


def shape_of(ctx: RuleContext, node: NodeProto, port: Port, axis: int, span: Span) -> Found:
    """Shape only reads sizes: harmless while nothing reads the channel count it reports
    (PyTorch and Paddle exports take the batch and sequence sizes from it)."""
    rank = ctx.rank(node.input[0])
    start = attribute(node, "start", 0) % rank
    end = attribute(node, "end", rank)
    end = rank if end >= rank else end % rank
    if not start <= axis < end:
        return []
    for reader in _readers_past(ctx, node.output[0]):
        taken = _shape_positions(ctx, reader, end - start)
        if taken is None or axis - start in taken:
            raise Blocked(f"{reader.op_type} node {reader.name!r} reads its channel count")
    return []


UNARY = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Gelu", "Erf", "Identity", "Cast", "Abs", "Neg", "Sqrt", "Exp",
    "Log", "Reciprocal", "Clip", "Dropout", "Mish", "Sin", "Cos", "Floor", "Ceil", "Round",
    "Sign", "ThresholdedRelu", "Not", "IsNaN", "IsInf",
)  # fmt: skip
BROADCAST = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
)  # fmt: skip
POOLS = (
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
)  # fmt: skip
REDUCTIONS = (
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp",
)  # fmt: skip

# op_type -> the rule that follows channels through it. An op not here ends the group.
RULES: dict[str, Rule] = {
    **dict.fromkeys(UNARY, same_axis),
    **dict.fromkeys(BROADCAST, broadcast),
    **dict.fromkeys(POOLS, pool),
    **dict.fromkeys(REDUCTIONS, reduce),
    "BatchNormalization": batch_norm,
    "InstanceNormalization": instance_norm,
    "LayerNormalization": normalised_over,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    "Pad": pad,
    "Resize": resize,
    "Upsample": resize,
    "Transpose": transpose,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Concat": concat,
    "Split": split,
    "Reshape": reshape,
    "Flatten": flatten,
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": matmul,
    "Shape": shape_of,
}

# Ops that start a group at their output channels: op_type -> the weight's input position.
LEADERS: dict[str, int] = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
LEADING_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})


# ----------------------------------------------------------------------------- the graph walk


def _constants(graph: GraphProto) -> dict[str, TensorProto]:
    found = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = attr.t
    return found


SMALL = 1024  # elements: constants up to this size stay in the skeleton (shapes, scalars)


def _large(tensor: TensorProto) -> bool:
    return tensor.data_type in FLOAT_TYPES and math.prod(tensor.dims) > SMALL


def _skeleton(model: ModelProto) -> ModelProto:
    """The model without its large float tensors, which become graph inputs of their type and
    shape: onnx's shape inference copies the model it is given, and a 270 MB model must not
    cost another 270 MB (and its time) here. Integer constants stay for constant propagation."""
    light = ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
    light.functions.extend(model.functions)
    source, graph = model.graph, light.graph
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    declared = {value.name for value in source.input}

    def as_input(name: str, tensor: TensorProto) -> None:
        if name not in declared:
            graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))

    for tensor in source.initializer:
        if _large(tensor):
            as_input(tensor.name, tensor)
        else:
            graph.initializer.append(tensor)
    for node in source.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and _large(value):
            as_input(node.output[0], value)
        else:
            graph.node.append(node)
    return light


def _shapes(model: ModelProto, constants: dict[str, TensorProto]) -> dict[str, Shape]:
    """Every value's shape as far as onnx's inference (with constant propagation) knows it."""
    try:
        inferred = shape_inference.infer_shapes(_skeleton(model), strict_mode=False, data_prop=True)
    except Exception:  # inference only helps: without a shape the rules block
        inferred = model
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(
                dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
                for dim in tensor_type.shape.dim
            )
    shapes.update({name: tuple(t.dims) for name, t in constants.items()})
    return shapes


def shape_error(model: ModelProto) -> str | None:
    """What onnx's strict shape inference finds wrong with the model (None if nothing): a check
    that a rewrite left every tensor consistent with the nodes that read it."""
    try:
        shape_inference.infer_shapes(_skeleton(model), strict_mode=True)
    except Exception as exc:  # onnx raises InferenceError, or others for odd graphs
        return one_line(str(exc), 160)
    return None


def _opset(model: ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _readers(graph: GraphProto) -> tuple[dict[str, list[NodeProto]], set[str]]:
    """Readers of each value in the graph, and the values read inside subgraphs."""
    found: dict[str, list[NodeProto]] = defaultdict(list)
    nested: set[str] = set()
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            if name:
                found[name].append(node)
        for sub in node_subgraphs(node):
            for inner, _ in iter_graphs(sub):
                nested.update(name for n in inner.node for name in n.input)
    return found, nested


def _read_counts(graph: GraphProto) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for inner, _ in iter_graphs(graph):
        for node in inner.node:
            for name in set(node.input):
                counts[name] += 1
    return counts


def _broadcast_shape(shapes: list[Shape]) -> Shape:
    """numpy broadcasting of known-rank shapes; a dim is None where no input fixes it."""
    rank = max(len(shape) for shape in shapes)
    padded = [(1,) * (rank - len(shape)) + tuple(shape) for shape in shapes]
    result: list[int | None] = []
    for sizes in zip(*padded, strict=True):
        fixed = {size for size in sizes if size is not None and size != 1}
        if len(fixed) > 1:
            raise Blocked(f"sizes {sorted(fixed)} do not broadcast")
        known = fixed or ({1} if all(size == 1 for size in sizes) else set())
        result.append(next(iter(known)) if known else None)
    return tuple(result)


def _inferred(ctx: RuleContext, node: NodeProto) -> Shape | None:
    """The output shape of a node onnx's inference left unknown, from its inputs' shapes and
    constant pieces (tf2onnx and Paddle build Reshape targets from Shape at run time)."""
    inputs = [ctx.shapes.get(name) for name in node.input if name]
    if node.op_type in UNARY and inputs and inputs[0] is not None:
        return inputs[0]
    if node.op_type in BROADCAST and inputs and all(shape is not None for shape in inputs):
        return _broadcast_shape(inputs)  # type: ignore[arg-type]
    if node.op_type == "Reshape" and inputs and inputs[0] is not None:
        copies = not attribute(node, "allowzero", 0)
        elements = [e.value for e in _target(ctx, node)]
        return tuple(
            inputs[0][i] if value == 0 and copies else (value if value and value > 0 else None)
            for i, value in enumerate(elements)
        )
    return None


def _fill_shapes(ctx: RuleContext) -> None:
    """Shapes onnx's inference could not tell, in graph order, where the node tells them."""
    for node in ctx.graph.node:
        if not node.output or not node.output[0] or node.output[0] in ctx.shapes:
            continue
        try:
            shape = _inferred(ctx, node)
        except (Blocked, IndexError):
            continue
        if shape is not None:
            ctx.shapes[node.output[0]] = shape


class ChannelGraph:
    """The main graph's channel dependencies. Subgraphs (If/Loop/Scan bodies) are not pruned:
    a group whose channels reach into one is left whole."""

    def __init__(self, model: ModelProto) -> None:
        graph = model.graph
        self.constants = _constants(graph)
        readers, self.nested = _readers(graph)
        self.ctx = RuleContext(
            graph=graph,
            opset=_opset(model),
            shapes=_shapes(model, self.constants),
            constants=self.constants,
            positions={id(node): index for index, node in enumerate(graph.node)},
            producers={name: node for node in graph.node for name in node.output if name},
            readers=readers,
        )
        _fill_shapes(self.ctx)
        self.outputs = {value.name for value in graph.output}
        self.inputs = {value.name for value in graph.input}
        self.reads = _read_counts(graph)  # a constant read twice cannot be cut for one reader

    def groups(self) -> list[ChannelGroup]:
        """Every group, in graph order of its leading layer; blocked ones included."""
        claimed: set[tuple[str, int]] = set()
        found = []
        for node in self.ctx.graph.node:
            start = self._start(node)
            if start is None or (start.value, start.axis) in claimed:
                continue
            group = self._follow(node, start)
            claimed.update((dim.value, dim.axis) for dim in group.dims)
            found.append(group)
        return found

    def _start(self, node: NodeProto) -> Dim | None:
        """The output channels of a layer with a constant float weight, if it has two or more."""
        if node.domain not in ("", "ai.onnx") or node.op_type not in LEADERS:
            return None
        at = LEADERS[node.op_type]
        tensor = self.constants.get(node.input[at]) if len(node.input) > at else None
        shape = self.ctx.shapes.get(node.output[0])
        if tensor is None or tensor.data_type not in LEADING_TYPES or not shape or len(shape) < 2:
            return None
        axis = len(shape) - 1 if node.op_type == "MatMul" else 1
        size = shape[axis]
        if size is None or size < 2:
            return None
        return Dim(node.output[0], axis, Span(0, Fraction(size)))

    def _follow(self, node: NodeProto, start: Dim) -> ChannelGroup:
        weight = node.input[LEADERS[node.op_type]]
        group = ChannelGroup(weight, node.name, node.op_type, int(start.span.size))
        try:
            self._walk(group, start)
        except Blocked as exc:
            group.blocked = one_line(str(exc), 220)
        return group

    def _walk(self, group: ChannelGroup, start: Dim) -> None:
        """Breadth-first over every axis the channels reach, forwards and backwards."""
        seen: set[Dim] = {start}
        queue = deque([start])
        slices: set[Slice] = set()
        counts: set[Count] = set()
        while queue:
            dim = queue.popleft()
            group.dims.append(dim)
            for node, port in self._touching(dim.value):
                for found in self._apply(node, port, dim):
                    if isinstance(found, Count):
                        counts.add(found)
                        continue
                    name = _port_name(node, found.port)
                    if not name:
                        continue
                    if name in self.constants:
                        slices.add(self._slice(name, found, node))
                        continue
                    nxt = Dim(name, found.axis, found.span)
                    if nxt not in seen:
                        seen.add(nxt)
                        queue.append(nxt)
        group.slices = sorted(slices, key=lambda s: (s.tensor, s.axis, s.span.offset))
        group.counts = sorted(counts, key=lambda c: (c.node, str(c.input), str(c.element)))

    def _touching(self, value: str) -> Iterator[tuple[NodeProto, Port]]:
        """The node that makes `value` and every node that reads it, with the port."""
        if value in self.outputs:
            raise Blocked(f"{value!r} is a graph output: its channels stay")
        if value in self.nested:
            raise Blocked(f"{value!r} is read inside a subgraph")
        producer = self.ctx.producers.get(value)
        if producer is None:
            raise Blocked(f"{value!r} is a graph input")
        yield producer, Port(True, list(producer.output).index(value))
        for reader in self.ctx.readers.get(value, []):
            for index, name in enumerate(reader.input):
                if name == value:
                    yield reader, Port(False, index)

    def _apply(self, node: NodeProto, port: Port, dim: Dim) -> Found:
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        where = f"{node.op_type} node {node.name!r}"
        if rule is None:
            raise Blocked(f"{where}: channels are not followed through {node.op_type}")
        try:
            found = rule(self.ctx, node, port, dim.axis, dim.span)
        except Blocked as exc:
            raise Blocked(f"{where}: {exc}") from None
        except (IndexError, KeyError, ValueError, TypeError, ZeroDivisionError) as exc:
            raise Blocked(f"{where}: not understood ({type(exc).__name__})") from None
        return [f for f in found if not (isinstance(f, Link) and f.port == port)]

    def _slice(self, name: str, link: Link, node: NodeProto) -> Slice:
        if name in self.inputs:
            raise Blocked(f"{name!r} is also a graph input (a caller may override it)")
        if self.reads[name] != 1:
            raise Blocked(f"constant {name!r} is shared by several nodes")
        shape = tuple(self.constants[name].dims)
        if len(shape) <= link.axis or shape[link.axis] < link.span.offset + link.span.size:
            raise Blocked(f"{node.op_type} node {node.name!r}: {name!r} has shape {list(shape)}")
        return Slice(name, link.axis, link.span)
