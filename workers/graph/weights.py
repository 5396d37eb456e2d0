"""Finding the weights of an ONNX model, wherever the exporter put them.

A weight reaches its operator as a graph initializer, as the output of a Constant node, or (for
the ai.onnx.ml linear models) as a node attribute; the operator may sit in the main graph or in an
If/Loop/Scan subgraph that refers to a weight of an enclosing graph by name. Each weight found is
a WeightSlot that reads and writes the tensor in place in the ModelProto.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper

from schemas.params import name_pattern
from workers.errors import InvalidModelError
from workers.graph.walk import node_subgraphs

# op_type -> input positions that carry the weight (the first constant one is taken).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (1, 0),
    "Gemm": (1,),
    "Conv": (1,),
    "ConvTranspose": (1,),
}
# ai.onnx.ml linear models (scikit-learn's linear estimators through skl2onnx) hold their
# weights as a float-list attribute laid out [targets, features].
WEIGHT_ATTRIBUTES: dict[str, str] = {
    "LinearClassifier": "coefficients",
    "LinearRegressor": "coefficients",
}

FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
)


@dataclass(eq=False)
class WeightSlot:
    """One float tensor stored in the model: an initializer, a Constant's value or an attribute."""

    name: str
    holder: TensorProto | AttributeProto
    shape: tuple[int, ...]
    graph: GraphProto  # the graph that stores it
    uses: list[NodeProto] = field(default_factory=list)  # nodes that take it as a weight
    # its values where they lie in a held model's file (workers/graph/held.py): read and
    # written there, not in `holder`
    held: np.ndarray | None = None

    @property
    def dtype(self) -> np.dtype:
        if isinstance(self.holder, TensorProto):
            return np.dtype(numpy_helper.helper.tensor_dtype_to_np_dtype(self.holder.data_type))
        return np.dtype(np.float32)  # a float-list attribute

    def read(self) -> np.ndarray:
        if self.held is not None:
            values = self.held.view()  # the caller's to read, not to write through
            values.flags.writeable = False
            return values
        if isinstance(self.holder, TensorProto):
            return numpy_helper.to_array(self.holder)
        return np.asarray(self.holder.floats, dtype=np.float32).reshape(self.shape)

    def write(self, array: np.ndarray) -> None:
        if self.held is not None:
            if array.shape != self.held.shape:
                raise ValueError(f"held weight {self.name!r} keeps its shape {self.shape}")
            self.held[...] = array
            return
        if not isinstance(self.holder, TensorProto):
            del self.holder.floats[:]
            self.holder.floats.extend(array.astype(np.float32).ravel().tolist())
            self.shape = tuple(array.shape)
            return
        self._write_raw(array.astype(self.dtype, copy=False).tobytes(), array.shape)

    def write_masked(self, keep: np.ndarray, values: np.ndarray | None = None) -> int:
        """The weight with every value where `keep` is False set to zero; returns how many
        values it now holds that are not zero. The pruned copy is let go once it is bytes,
        before protobuf copies those in: at the peak of pruning a large model one tensor-sized
        array less than write(np.where(...)), whose caller holds it. `values`: the weight as
        the caller just read it (handed over: let go here), else it is read."""
        if self.held is not None:  # zeroed where it lies: no copy at all
            del values
            np.copyto(self.held, np.zeros((), dtype=self.dtype), where=~keep)
            return int(np.count_nonzero(self.held))
        current = self.read() if values is None else values
        del values
        pruned = np.where(keep, current, np.zeros((), dtype=self.dtype))
        del current
        nonzero = int(np.count_nonzero(pruned))
        if not isinstance(self.holder, TensorProto):
            self.write(pruned)
            return nonzero
        raw = pruned.tobytes()
        del pruned
        self._write_raw(raw, keep.shape)
        return nonzero

    def _write_raw(self, raw: bytes, shape: tuple[int, ...]) -> None:
        # The tensor as numpy_helper.from_array writes one (name, type, dims, raw_data; its doc
        # string and other fields go, as they always did), set in place: building a whole
        # TensorProto to copy over this one would hold the tensor once more.
        assert isinstance(self.holder, TensorProto)
        name, data_type = self.holder.name, self.holder.data_type
        self.holder.Clear()
        self.holder.name, self.holder.data_type = name, data_type
        self.holder.dims.extend(shape)
        self.holder.raw_data = raw
        self.shape = tuple(shape)


def _constant_slot(node: NodeProto, graph: GraphProto) -> WeightSlot | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type in FLOAT_TYPES:
            return WeightSlot(node.output[0], attr.t, tuple(attr.t.dims), graph)
    return None


def _attribute_slot(node: NodeProto, graph: GraphProto) -> WeightSlot | None:
    attr_name = WEIGHT_ATTRIBUTES.get(node.op_type)
    if attr_name is None or node.domain != "ai.onnx.ml":
        return None
    attrs = {attr.name: attr for attr in node.attribute}
    coefficients, intercepts = attrs.get(attr_name), attrs.get("intercepts")
    if coefficients is None or not coefficients.floats:
        return None
    targets = len(intercepts.floats) if intercepts is not None and intercepts.floats else 1
    if len(coefficients.floats) % targets:
        raise InvalidModelError(
            f"{node.op_type} node {node.name!r} has {len(coefficients.floats)} coefficients, "
            f"not a multiple of its {targets} intercepts"
        )
    name = f"{node.name or node.output[0]}.{attr_name}"
    shape = (targets, len(coefficients.floats) // targets)
    return WeightSlot(name, coefficients, shape, graph, uses=[node])


def _local_constants(graph: GraphProto) -> dict[str, WeightSlot]:
    slots = {
        tensor.name: WeightSlot(tensor.name, tensor, tuple(tensor.dims), graph)
        for tensor in graph.initializer
        if tensor.data_type in FLOAT_TYPES
    }
    for node in graph.node:
        slot = _constant_slot(node, graph)
        if slot is not None:
            slots[slot.name] = slot
    return slots


def _walk(
    graph: GraphProto,
    outer: dict[str, WeightSlot],
    found: dict[int, WeightSlot],
    constants: dict[int, WeightSlot],
) -> None:
    # A subgraph's formal inputs (a Loop body's state, say) hide outer names they share.
    hidden = {value.name for value in graph.input}
    scope = {
        **{name: slot for name, slot in outer.items() if name not in hidden},
        **_local_constants(graph),
    }
    for slot in scope.values():
        constants[id(slot.holder)] = slot
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in WEIGHT_INPUTS:
            for position in WEIGHT_INPUTS[node.op_type]:
                slot = scope.get(node.input[position]) if position < len(node.input) else None
                if slot is not None:
                    slot = found.setdefault(id(slot.holder), slot)
                    slot.uses.append(node)
                    break
        attribute_slot = _attribute_slot(node, graph)
        if attribute_slot is not None:
            found[id(attribute_slot.holder)] = attribute_slot
        for sub in node_subgraphs(node):
            _walk(sub, scope, found, constants)


def find_weights(
    model: ModelProto, include: Iterable[str] = (), exclude: Iterable[str] = ()
) -> list[WeightSlot]:
    """The prunable weights, in graph order.

    By default those that feed MatMul, Gemm, Conv, ConvTranspose as weights (and the
    coefficients of ai.onnx.ml linear models); `include` adds any float constant whose name
    matches, `exclude` removes any whose name matches.
    """
    found: dict[int, WeightSlot] = {}
    constants: dict[int, WeightSlot] = {}
    _walk(model.graph, {}, found, constants)
    include_res = [name_pattern(pattern) for pattern in include]
    exclude_res = [name_pattern(pattern) for pattern in exclude]
    for key, slot in constants.items():
        if key not in found and any(rx.search(slot.name) for rx in include_res):
            found[key] = slot
    return [slot for slot in found.values() if not any(rx.search(slot.name) for rx in exclude_res)]


def all_float_constants(model: ModelProto) -> list[WeightSlot]:
    """Every float tensor the model stores, prunable or not: what `params` counts."""
    found: dict[int, WeightSlot] = {}
    constants: dict[int, WeightSlot] = {}
    _walk(model.graph, {}, found, constants)
    attribute_slots = {
        key: slot for key, slot in found.items() if not isinstance(slot.holder, TensorProto)
    }
    return [*constants.values(), *attribute_slots.values()]
