"""Writing a pruned model to bytes: dense, sparse (ONNX sparse_initializer) or int8.

Every encoding yields a file onnxruntime loads as it is; the caller evaluates exactly these bytes.

Exporters do not all keep weights in initializers: PaddlePaddle writes every weight as a Constant
node, and PyTorch inlines If branches with their weights as Constants inside the branch. Neither
sparse_initializer nor onnxruntime's quantizer reaches a Constant, so `sparse` and `int8` first
hoist those weights, on a copy, into initializers of the graph that holds the Constant (legal
ONNX in subgraphs too, since IR version 4). `dense` writes the model untouched.
"""

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import (
    AttributeProto,
    GraphProto,
    ModelProto,
    NodeProto,
    TensorProto,
    helper,
    numpy_helper,
)

from schemas.vocabulary import Encoding
from workers.errors import UnsupportedModelError
from workers.graph.load import serialize
from workers.graph.walk import iter_graphs
from workers.graph.weights import FLOAT_TYPES, WeightSlot, all_float_constants, find_weights

INDEX_BYTES = 8  # sparse_initializer indices are int64, one linear index per nonzero
NOTE_LIMIT = 300  # characters in one note or error message: a person reads it
# Before IR version 4 every initializer also had to be a graph input, which a subgraph cannot
# gain; there Constants stay where they are.
FIRST_IR_WITH_FREE_INITIALIZERS = 4
INT8_ADVICE = "use encoding dense or sparse"
INT8_NOTE = (
    "int8: onnxruntime dynamic quantization (QInt8, symmetric, so pruned zeros stay zero); "
    "internal tensor names shortened and shape annotations dropped (inputs and outputs keep "
    "their names)"
)
# Ops whose float constant inputs onnxruntime's quantizer may turn into int8, beyond its own
# registry (read lazily with the quantizer): it rewrites a plain Gemm into MatMul + Add first.
QUANTIZER_EXTRA_OPS = frozenset({"Gemm"})


def encode(model: ModelProto, encoding: Encoding, pruned: set[str]) -> tuple[bytes, list[str]]:
    """The model's bytes in `encoding`, and notes on what was decided along the way.

    `pruned` names the weights that pruning touched: only those are stored sparse.
    """
    return ENCODERS[encoding](model, pruned)


def dense(model: ModelProto, pruned: set[str]) -> tuple[bytes, list[str]]:
    """Zeros kept in place: the file is as large as the original, and gzips well."""
    return serialize(model), []


# --- notes ------------------------------------------------------------------------------------


def _one_line(text: str, limit: int = NOTE_LIMIT) -> str:
    """`text` on one line of at most `limit` characters, cut with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _names_note(prefix: str, names: Sequence[str], limit: int = NOTE_LIMIT) -> str:
    """`prefix` and as many of `names` as fit in `limit` characters, the rest counted
    ("… and 41 more"). Names come from the model: each is put on one line and cut short."""
    names = [_one_line(name, limit // 4) for name in names]
    shown: list[str] = []
    for index, name in enumerate(names):
        rest = len(names) - index - 1
        text = prefix + ", ".join([*shown, name]) + (f" … and {rest} more" if rest else "")
        if len(text) > limit:
            break
        shown.append(name)
    if not shown:
        return _one_line(f"{prefix}{len(names)} weights", limit)
    rest = len(names) - len(shown)
    return prefix + ", ".join(shown) + (f" … and {rest} more" if rest else "")


def _reason_notes(left: dict[str, list[str]]) -> list[str]:
    """One note per reason (a prefix), listing the weights it applies to."""
    return [_names_note(prefix, sorted(set(names))) for prefix, names in left.items() if names]


# --- hoisting Constants into initializers -----------------------------------------------------


def _float_constant_value(node: NodeProto) -> TensorProto | None:
    """The tensor of a Constant node holding a float tensor in its `value` attribute."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type in FLOAT_TYPES:
            return attr.t
    return None


def _hoist_in_graph(graph: GraphProto, names: set[str]) -> None:
    # A Constant that is also the graph's output stays: an initializer as a (branch) output is
    # a corner where runtimes have disagreed, and no weight is worth that risk.
    outputs = {value.name for value in graph.output}
    hoisted = []
    for position, node in enumerate(graph.node):
        tensor = _float_constant_value(node)
        name = node.output[0] if node.output else ""
        if tensor is None or name not in names or name in outputs:
            continue
        initializer = graph.initializer.add()
        initializer.CopyFrom(tensor)
        initializer.name = name
        hoisted.append(position)
    # Initializers exist before any node runs, so removing the Constants keeps the order valid.
    for position in reversed(hoisted):
        del graph.node[position]


def hoisted_copy(model: ModelProto, names: set[str]) -> ModelProto:
    """A copy of `model` in which each float Constant whose output is in `names` became an
    initializer of the graph holding it, under the same name; ir_version and opsets kept."""
    copy = ModelProto.FromString(serialize(model))
    if copy.ir_version >= FIRST_IR_WITH_FREE_INITIALIZERS:
        for graph, _ in iter_graphs(copy.graph):
            _hoist_in_graph(graph, names)
    return copy


def _unhoisted_reason(model: ModelProto) -> str:
    if model.ir_version < FIRST_IR_WITH_FREE_INITIALIZERS:
        return f"in Constant nodes (ir_version {model.ir_version} < 4 cannot hold them elsewhere)"
    return "in Constant nodes that are also graph outputs"


# --- sparse -----------------------------------------------------------------------------------


@dataclass
class SparseOutcome:
    """What the sparse encoder did with each pruned weight it met."""

    stored: set[str] = field(default_factory=set)
    larger: list[str] = field(default_factory=list)  # COO would be larger than dense
    defaults: list[str] = field(default_factory=list)  # also graph inputs


def _to_sparse(graph: GraphProto, pruned: set[str], outcome: SparseOutcome) -> None:
    # An initializer that is also a graph input is an overridable default: keep it dense.
    inputs = {value.name for value in graph.input}
    for position in reversed(range(len(graph.initializer))):
        tensor = graph.initializer[position]
        if tensor.name not in pruned:
            continue
        if tensor.name in inputs:
            outcome.defaults.append(tensor.name)
            continue
        array = numpy_helper.to_array(tensor)
        flat_index = np.flatnonzero(array).astype(np.int64)
        if flat_index.size * (array.itemsize + INDEX_BYTES) >= array.nbytes:
            outcome.larger.append(tensor.name)
            continue
        values = numpy_helper.from_array(array.ravel()[flat_index], tensor.name)
        indices = numpy_helper.from_array(flat_index, "")
        graph.sparse_initializer.append(
            helper.make_sparse_tensor(values, indices, list(array.shape))
        )
        outcome.stored.add(tensor.name)
        del graph.initializer[position]


def sparse(model: ModelProto, pruned: set[str]) -> tuple[bytes, list[str]]:
    """Pruned weights as ONNX sparse_initializer (COO), where that is smaller; pruned weights
    held in Constant nodes are hoisted into initializers first."""
    model = hoisted_copy(model, pruned)  # leave the caller's model dense
    outcome = SparseOutcome()
    for graph, _ in iter_graphs(model.graph):
        _to_sparse(graph, pruned, outcome)
    left = {
        "sparse: kept dense where COO storage would be larger (below ~67% zeros for "
        "float32): ": outcome.larger,
        "sparse: kept dense, initializers that are also graph inputs (overridable "
        "defaults): ": outcome.defaults,
    }
    met = outcome.stored | set(outcome.larger) | set(outcome.defaults)
    for slot in all_float_constants(model):
        if slot.name in pruned and slot.name not in met:
            left.setdefault(_sparse_unreached(slot, model), []).append(slot.name)
    return serialize(model), _reason_notes(left)


def _sparse_unreached(slot: WeightSlot, model: ModelProto) -> str:
    if isinstance(slot.holder, AttributeProto):
        return "sparse: kept dense, ai.onnx.ml attributes (only tensors can be sparse): "
    return f"sparse: kept dense, {_unhoisted_reason(model)}: "


# --- int8 -------------------------------------------------------------------------------------


def _require_float32_weights(model: ModelProto) -> None:
    """onnxruntime's dynamic quantization handles float32 weights; with others it leaves them
    as they are or writes a model that does not load."""
    for slot in find_weights(model):
        if isinstance(slot.holder, TensorProto) and slot.holder.data_type != TensorProto.FLOAT:
            kind = TensorProto.DataType.Name(slot.holder.data_type).lower()
            raise UnsupportedModelError(
                f"encoding int8 quantizes float32 weights; weight {slot.name!r} is {kind}: "
                "use encoding dense or sparse"
            )


def int8(model: ModelProto, pruned: set[str]) -> tuple[bytes, list[str]]:
    """onnxruntime's dynamic quantization of the pruned model (float32 weights only)."""
    _require_float32_weights(model)
    return _quantize(model), [
        "int8: onnxruntime dynamic quantization (QInt8, symmetric, so pruned zeros stay zero); "
        "internal tensor names shortened and shape annotations dropped (inputs and outputs keep "
        "their names)"
    ]


def _quantize(model: ModelProto) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="clipprune-int8-") as tmp:
        out = Path(tmp) / "model.int8.onnx"
        # The quantizer advises "pre-processing" on the root logger for every model; it is
        # advice to a person at a console, not something a job's caller can act on.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(model, out, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return serialize(compact(ModelProto.FromString(out.read_bytes())))


ENCODERS: dict[Encoding, Callable[[ModelProto, set[str]], tuple[bytes, list[str]]]] = {
    "dense": dense,
    "sparse": sparse,
    "int8": int8,
}


def compact(model: ModelProto) -> ModelProto:
    """The same computation in fewer bytes: on a small quantized model the names the quantizer
    writes ("coefficient_quantized_output_0", ...) outweigh the weights. Internal value and
    initializer names become short ones, node names and doc strings go, and value_info (shape
    annotations onnxruntime infers again) is dropped. The model's inputs and outputs keep
    their names, so callers see no difference."""
    interface = {value.name for value in [*model.graph.input, *model.graph.output]}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in interface:
            return name
        return short.setdefault(name, format(len(short), "x"))

    for graph, _ in iter_graphs(model.graph):
        del graph.value_info[:]
        for tensor in graph.initializer:
            tensor.name = rename(tensor.name)
        for sparse in graph.sparse_initializer:
            sparse.values.name = rename(sparse.values.name)
        for value in [*graph.input, *graph.output]:
            value.name = rename(value.name)
        for node in graph.node:
            node.name = ""
            node.doc_string = ""
            node.input[:] = [rename(name) for name in node.input]
            node.output[:] = [rename(name) for name in node.output]
    return model
