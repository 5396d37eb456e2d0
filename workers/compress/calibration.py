"""Calibration inputs of each prunable layer: run the model in onnxruntime and accumulate
H = XᵀX of the tensor each weight multiplies, never holding more than one run's activation.

A layer's input is made a graph output of a copy of the model (its only output, so onnxruntime
drops every node it does not need), the copy is run on each calibration run in turn, and each
run's activation is folded into H (workers/nn/reconstruct.py) before the next run: memory is
one run's activation of one layer plus H, whatever the number of runs or layers.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, NodeProto, ValueInfoProto, numpy_helper
from onnxruntime import InferenceSession

from workers.compress.prune import copy_model
from workers.errors import InvalidDataError, first_line
from workers.evaluate.runtime import Feeds, session
from workers.graph.load import serialize
from workers.graph.walk import attribute, readers
from workers.graph.weights import WeightSlot, all_float_constants, find_weights
from workers.nn.reconstruct import LayerInputs, accumulate_gram, im2col

IM2COL_BYTES = 1 << 26  # patches of one chunk of a Conv input: 64 MiB, however large the image


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]


@dataclass(frozen=True)
class LayerView:
    """A weight seen as matrices W [out, in] acting on rows of its node's input, one matrix per
    group (a grouped Conv's group g maps its channels to its own outputs)."""

    slot: WeightSlot
    node: NodeProto
    position: int  # the node's index in the main graph: layers are calibrated in this order
    input_name: str
    transposed: bool  # the stored array is [in, out] (MatMul, Gemm without transB)
    transposed_input: bool  # Gemm transA: the input is [in, n]
    conv: ConvGeometry | None = None
    groups: int = 1

    def matrix(self, array: np.ndarray) -> np.ndarray:
        """[out, in]: MatMul's [in, out] transposed, a Conv's [O, C/g, kh, kw] flattened."""
        if self.conv is not None:
            return array.reshape(array.shape[0], -1)
        return array.T if self.transposed else array

    def restore(self, matrix: np.ndarray) -> np.ndarray:
        """The inverse of matrix(), in the slot's shape."""
        if self.conv is not None:
            return matrix.reshape(self.slot.shape)
        return matrix.T if self.transposed else matrix

    @property
    def input_axis(self) -> int:
        """The stored axis of the weight's input channels: [in, out] MatMul, [O, C, kh, kw] Conv."""
        return 0 if self.transposed and self.conv is None else 1

    @property
    def width(self) -> int:
        """Columns of one group's matrix."""
        shape = self.slot.shape
        if self.conv is not None:
            return int(np.prod(shape[1:]))
        return shape[0] if self.transposed else shape[1]

    def images_per_chunk(self, activation: np.ndarray) -> int:
        """Images of `activation` whose im2col fits IM2COL_BYTES (at least one): an im2col of a
        whole batch of images can be kh·kw times the activation."""
        if self.conv is None:
            return max(1, len(activation))
        per_image = self.width * activation.shape[2] * activation.shape[3] * activation.itemsize
        return max(1, IM2COL_BYTES // max(per_image, 1))

    def rows(
        self, activation: np.ndarray, group: int, images: int | None = None
    ) -> Iterable[np.ndarray]:
        """The input rows [n, in] of group `group`, in chunks of `images` images for a Conv
        (default: images_per_chunk); a MatMul's rows come whole."""
        if self.conv is None:
            if self.transposed_input:
                activation = activation.T
            yield activation.reshape(-1, self.width)
            return
        channels = activation.shape[1] // self.groups
        part = activation[:, group * channels : (group + 1) * channels]
        geometry = self.conv
        step = images or self.images_per_chunk(activation)
        for start in range(0, len(part), step):
            yield im2col(
                part[start : start + step],
                geometry.kernel,
                geometry.strides,
                geometry.pads,
                geometry.dilations,
            )


def _conv_geometry(node: NodeProto, slot: WeightSlot) -> tuple[ConvGeometry, int] | str:
    """The Conv's geometry and groups, or why it cannot be calibrated."""
    if len(slot.shape) != 4:
        return "only 2-D convolutions are calibrated"
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad {auto_pad} is not calibrated; explicit pads are"
    kh, kw = (int(k) for k in slot.shape[2:])
    sh, sw = (int(v) for v in attribute(node, "strides", (1, 1)))
    top, left, bottom, right = (int(v) for v in attribute(node, "pads", (0, 0, 0, 0)))
    dh, dw = (int(v) for v in attribute(node, "dilations", (1, 1)))
    geometry = ConvGeometry((kh, kw), (sh, sw), (top, left, bottom, right), (dh, dw))
    return geometry, int(attribute(node, "group", 1))


def node_positions(model: ModelProto) -> dict[str, int]:
    """First output name -> index of each main-graph node (protobuf wrappers have no stable
    identity to key on; output names are unique in a valid graph)."""
    return {node.output[0]: index for index, node in enumerate(model.graph.node) if node.output}


def layer_view(slot: WeightSlot, model: ModelProto, positions: dict[str, int]) -> LayerView | str:
    """How `slot` multiplies its input, or why it cannot be calibrated (then it is pruned by
    magnitude alone). `positions`: node_positions(model)."""
    if len(slot.uses) != 1:
        return "used by several nodes (or none)"
    node = slot.uses[0]
    position = positions.get(node.output[0] if node.output else "")
    if position is None or model.graph.node[position] != node:
        return "inside a subgraph (If/Loop/Scan body)"
    if node.op_type == "MatMul":
        if len(slot.shape) != 2 or node.input[1] != slot.name:
            return "a MatMul weight calibrates only as the right-hand [in, out] matrix"
        return LayerView(slot, node, position, node.input[0], True, False)
    if node.op_type == "Gemm":
        if len(slot.shape) != 2 or node.input[1] != slot.name:
            return "a Gemm weight calibrates only as its B input"
        transposed = not attribute(node, "transB", 0)
        transposed_input = bool(attribute(node, "transA", 0))
        return LayerView(slot, node, position, node.input[0], transposed, transposed_input)
    if node.op_type == "Conv":
        found = _conv_geometry(node, slot)
        if isinstance(found, str):
            return found
        geometry, groups = found
        return LayerView(slot, node, position, node.input[0], False, False, geometry, groups)
    return f"{node.op_type} weights are not calibrated"


class LayerBiases:
    """Each layer's own bias, with the model's readers and float constants indexed once."""

    def __init__(self, model: ModelProto) -> None:
        self._readers = readers(model.graph)
        self._constants = {
            slot.name: slot for slot in all_float_constants(model) if slot.graph is model.graph
        }

    def of(self, view: LayerView) -> WeightSlot | None:
        """The constant added to the layer's outputs one value per output channel: Gemm's C
        (when alpha equals beta) or Conv's B, or the constant of the one Add that reads a
        MatMul's output. None when there is none, or when it is shaped otherwise or read by
        other nodes too (then it is not the layer's alone to adjust)."""
        node = view.node
        if node.op_type == "Gemm" and attribute(node, "alpha", 1.0) != attribute(node, "beta", 1.0):
            return None  # alpha·W·X + beta·C: C is not a column of W on an input of 1
        bias = node.input[2] if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 else ""
        if node.op_type == "MatMul":
            after = self._readers.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type == "Add":
                bias = next((name for name in after[0].input if name != node.output[0]), "")
        slot = self._constants.get(bias)
        outputs = view.slot.shape[1 - view.input_axis]
        if slot is None or len(self._readers.get(bias, [])) != 1:
            return None
        if int(np.prod(slot.shape)) != outputs or max(slot.shape, default=1) != outputs:
            return None
        return slot


# Readers whose bias is an optional input: one of zeros changes nothing the model computes.
BIAS_INPUT = {"Conv": 2, "Gemm": 2}


@dataclass(frozen=True)
class AddedBias:
    node: NodeProto
    name: str


def add_zero_biases(model: ModelProto) -> list[AddedBias]:
    """A zero bias for every main-graph Conv, and Gemm whose alpha equals its beta, that reads
    a weight and has none: the re-fit after a structured cut then has somewhere to put the
    removed channels' means back (FLAP's compensation), as exporters that follow each Conv with
    a BatchNormalization leave the Conv without one. drop_zero_biases takes back those the
    re-fit left at zero."""
    taken = {name for node in model.graph.node for name in (*node.input, *node.output)}
    taken |= {tensor.name for tensor in model.graph.initializer}
    added = []
    for slot in find_weights(model):
        node = slot.uses[0] if len(slot.uses) == 1 else None
        if node is None or slot.graph is not model.graph or node.op_type not in BIAS_INPUT:
            continue
        if len(node.input) != BIAS_INPUT[node.op_type] or node.input[1] != slot.name:
            continue
        if node.op_type == "Gemm" and attribute(node, "alpha", 1.0) != attribute(node, "beta", 1.0):
            continue
        transposed = node.op_type == "Conv" or bool(attribute(node, "transB", 0))
        outputs = slot.shape[0] if transposed else slot.shape[-1]
        name = next(
            f"{slot.name}_bias{suffix}"
            for suffix in ("", *map(str, range(len(taken))))
            if f"{slot.name}_bias{suffix}" not in taken
        )
        taken.add(name)
        model.graph.initializer.append(
            numpy_helper.from_array(np.zeros(outputs, dtype=slot.dtype), name)
        )
        node.input.append(name)
        added.append(AddedBias(node, name))
    return added


def drop_zero_biases(model: ModelProto, added: list[AddedBias]) -> None:
    """Remove each bias add_zero_biases added that is still all zeros."""
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    unused = set()
    for bias in added:
        if not np.any(numpy_helper.to_array(tensors[bias.name])):
            del bias.node.input[BIAS_INPUT[bias.node.op_type]]
            unused.add(bias.name)
    initializers = model.graph.initializer
    for index in reversed(range(len(initializers))):
        if initializers[index].name in unused:
            del initializers[index]


def exposing(model: ModelProto, name: str) -> bytes:
    """A copy of `model` whose only output is tensor `name`: onnxruntime then runs only the
    nodes that tensor needs."""
    copy = copy_model(model)
    del copy.graph.output[:]
    copy.graph.output.append(ValueInfoProto(name=name))
    return serialize(copy)


def run_exposed(runner: InferenceSession, feeds: Feeds) -> np.ndarray:
    """The one output of a session made from exposing(), on one calibration run."""
    try:
        return runner.run(None, feeds)[0]
    except Exception as exc:  # onnxruntime's errors are untyped
        raise InvalidDataError(
            f"onnxruntime could not run the model on the calibration data: {first_line(exc)}"
        ) from exc


def input_statistics(
    model: ModelProto, original: ModelProto, views: list[LayerView], runs: list[Feeds]
) -> list[LayerInputs]:
    """Per group, the Gram matrices of the input the views share over every run: X̃ from
    `model` (pruned so far), X from `original`, on the same rows."""
    view = views[0]
    size = (view.groups, view.width, view.width)
    gram = np.zeros(size)
    if view.input_name in {value.name for value in model.graph.input}:
        for feeds in runs:
            for group in range(view.groups):
                for rows in view.rows(np.asarray(feeds[view.input_name]), group):
                    accumulate_gram(gram[group], rows)
        return [LayerInputs.unchanged(part) for part in gram]
    cross, dense = np.zeros(size), np.zeros(size)
    pruned = session(exposing(model, view.input_name))
    before = session(exposing(original, view.input_name))
    for feeds in runs:
        now, then = run_exposed(pruned, feeds), run_exposed(before, feeds)
        if now.dtype.kind != "f":
            raise InvalidDataError(f"input {view.input_name!r} of a weight is not float")
        for group in range(view.groups):
            pairs = zip(view.rows(now, group), view.rows(then, group), strict=True)
            for rows, original_rows in pairs:
                accumulate_gram(gram[group], rows)
                accumulate_gram(cross[group], rows, original_rows)
                accumulate_gram(dense[group], original_rows)
        del now, then  # before the next run's: one run at a time
    return [LayerInputs(*parts) for parts in zip(gram, cross, dense, strict=True)]
