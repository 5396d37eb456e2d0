"""Writing a pruned model to bytes: dense, sparse (ONNX sparse_initializer), int8 or float16.

Every encoding yields a file onnxruntime loads as it is; the caller evaluates exactly these bytes.

Exporters do not all keep weights in initializers: PaddlePaddle writes every weight as a Constant
node, and PyTorch inlines If branches with their weights as Constants inside the branch. Neither
sparse_initializer nor onnxruntime's quantizer reaches a Constant, so `sparse` and `int8` first
hoist those weights, on a copy, into initializers of the graph that holds the Constant (legal
ONNX in subgraphs too, since IR version 4). `dense` writes the model untouched.
"""

import functools
import heapq
import io
import itertools
import logging
import math
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
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
from workers.errors import (
    MAX_MESSAGE,
    UnsupportedModelError,
    cut_list,
    one_line,
    onnxruntime_reason,
)
from workers.graph.load import raw_data_bytes, serialize
from workers.graph.walk import iter_graphs, node_subgraphs
from workers.graph.weights import FLOAT_TYPES, WeightSlot, all_float_constants, find_weights
from workers.graph.wire import LENGTH_DELIMITED, varint_bytes

INDEX_BYTES = 8  # sparse_initializer indices are int64, one linear index per nonzero
NOTE_LIMIT = MAX_MESSAGE
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
    written, notes = ENCODERS[encoding](model, pruned)
    return streamed(written), notes


def encode_file(model: ModelProto, encoding: Encoding, pruned: set[str], path: Path) -> list[str]:
    """`encode` written to `path` as it is made: the file is never held in memory, which for a
    large model is the size of the model once more."""
    written, notes = ENCODERS[encoding](model, pruned)
    with path.open("wb") as out:
        write_streamed(written, out)
    return notes


def dense(model: ModelProto, pruned: set[str]) -> tuple[ModelProto, list[str]]:
    """Zeros kept in place: the file is as large as the original, and gzips well."""
    return model, []


# --- streaming serialization ------------------------------------------------------------------

# Written field by field, element by element, rather than serialized whole: the path from a
# model to its initializers' bytes, where nearly all of a large model's bytes sit. Every other
# field (a node, a function, a sparse initializer) is serialized alone, one at a time.
STREAMED_FIELDS: dict[str, frozenset[str]] = {
    "ModelProto": frozenset({"graph"}),
    "GraphProto": frozenset({"initializer"}),
    "TensorProto": frozenset({"raw_data"}),
}


def _field_alone(message: Message, descriptor: FieldDescriptor, value: Any) -> bytes:
    """One field as the message's serialization writes it: serialized from a message of the
    same type that holds only that field."""
    alone = type(message)()
    if descriptor.is_repeated:
        getattr(alone, descriptor.name).extend(value)
    elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(alone, descriptor.name).CopyFrom(value)
    else:
        setattr(alone, descriptor.name, value)
    return alone.SerializeToString()


@dataclass(frozen=True)
class _Deferred:
    """Bytes read from the model again when written, so that one such part (a message
    serialized whole, an initializer's raw_data) is held at a time; its size is known."""

    read: Callable[[], bytes]
    size: int


@dataclass(frozen=True)
class _Nested:
    """A length-delimited field: its tag and length, then its parts."""

    header: bytes
    inner: list["_Part"]


_Part = bytes | _Deferred | _Nested


def _size(part: _Part) -> int:
    if isinstance(part, bytes):
        return len(part)
    if isinstance(part, _Deferred):
        return part.size
    return len(part.header) + sum(map(_size, part.inner))


def _nested(number: int, inner: list[_Part]) -> _Nested:
    tag = varint_bytes(number << 3 | LENGTH_DELIMITED)
    return _Nested(tag + varint_bytes(sum(map(_size, inner))), inner)


def listed_fields(message: Message) -> list[tuple[FieldDescriptor, Any]]:
    """message.ListFields(), but for a tensor's raw_data, which ListFields hands out as a copy
    (64 MB for a large weight, read again when written): its length, from the tensor's dims
    and type, where those fix it."""
    length = (
        raw_data_bytes(message.data_type, math.prod(message.dims))
        if isinstance(message, TensorProto)
        else None
    )
    if length is None:
        return message.ListFields()
    fields = []
    for descriptor in sorted(message.DESCRIPTOR.fields, key=lambda field: field.number):
        if descriptor.is_repeated:
            if value := getattr(message, descriptor.name):
                fields.append((descriptor, value))
        elif message.HasField(descriptor.name):
            if descriptor.name == "raw_data":
                fields.append((descriptor, length))
            else:
                fields.append((descriptor, getattr(message, descriptor.name)))
    return fields


def _parts(message: Message) -> list[_Part]:
    """`message`'s serialization as parts, in the order protobuf writes its fields (by number);
    a message with fields protobuf does not know is one part, serialized whole."""
    streamed = STREAMED_FIELDS.get(message.DESCRIPTOR.name, frozenset())
    if not streamed or len(UnknownFieldSet(message)):
        return [_Deferred(message.SerializeToString, len(message.SerializeToString()))]
    parts: list[_Part] = []
    # A bytes field is read when written: its length is taken here (from a copy ListFields
    # makes, let go at the next field, unless listed_fields knows it).
    for descriptor, value in listed_fields(message):
        if descriptor.name not in streamed:
            parts.append(_field_alone(message, descriptor, value))
        elif descriptor.type == FieldDescriptor.TYPE_BYTES:
            read = functools.partial(getattr, message, descriptor.name)
            length = value if isinstance(value, int) else len(value)
            parts.append(_nested(descriptor.number, [_Deferred(read, length)]))
        else:
            elements = value if descriptor.is_repeated else [value]
            parts += [_nested(descriptor.number, _parts(element)) for element in elements]
    return parts


def _write(part: _Part, out: BinaryIO) -> None:
    if isinstance(part, bytes):
        out.write(part)
    elif isinstance(part, _Deferred):
        data = part.read()
        if len(data) != part.size:  # its length is written before it: a mismatch corrupts
            raise ValueError(f"a field of {part.size} bytes read back as {len(data)} bytes")
        out.write(data)
    else:
        out.write(part.header)
        for inner in part.inner:
            _write(inner, out)


def write_streamed(model: ModelProto, out: BinaryIO) -> None:
    """The bytes serialize(model) returns, written to `out` one initializer at a time:
    serializing a model whole holds it twice over beside the model (protobuf's buffer and the
    bytes), this holds one initializer's data. That data is read twice (its length, then its
    bytes), which costs less than the copy it saves."""
    for part in _parts(model):
        _write(part, out)


def streamed(model: ModelProto) -> bytes:
    """write_streamed into memory: the bytes, and one initializer's data beside them."""
    out = io.BytesIO()
    write_streamed(model, out)
    # getvalue() hands over BytesIO's own buffer (grown in place by realloc), not a copy
    return out.getvalue()


# --- notes ------------------------------------------------------------------------------------


def _reason_notes(left: dict[str, list[str]]) -> list[str]:
    """One note per reason (a prefix), listing the weights it applies to."""
    return [
        cut_list(prefix, [one_line(name, NOTE_LIMIT // 4) for name in sorted(set(names))])
        for prefix, names in left.items()
        if names
    ]


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


def sparse(model: ModelProto, pruned: set[str]) -> tuple[ModelProto, list[str]]:
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
    return model, _reason_notes(left)


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
                f"encoding int8 quantizes float32 weights; weight {one_line(slot.name, 120)!r} "
                f"is {kind}: {INT8_ADVICE}"
            )


def _quantizer_ops() -> frozenset[str]:
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    return frozenset(IntegerOpsRegistry) | QUANTIZER_EXTRA_OPS


def _quantizer_inputs(model: ModelProto) -> set[str]:
    """Every value an op the quantizer converts reads: the Constants worth hoisting for int8
    (weights, and embedding tables of Gather), never shape constants (read by Reshape &c)."""
    ops = _quantizer_ops()
    return {
        name
        for graph, _ in iter_graphs(model.graph)
        for node in graph.node
        if node.domain in ("", "ai.onnx", "com.microsoft") and node.op_type in ops
        for name in node.input
    }


def _convs_left_float(graph: GraphProto, outer: frozenset[str], found: list[str]) -> None:
    """Name into `found` the Conv nodes the quantizer must skip: one whose weight is computed
    at run time (weight normalisation, say) gains no bytes from ConvInteger, and the quantizer
    raises on a Conv with a bias whose weight is not an initializer of the Conv's own graph
    (a body reading its weight from an enclosing graph)."""
    own = {tensor.name for tensor in graph.initializer}
    scope = outer | own
    for node in graph.node:
        is_conv = node.op_type == "Conv" and node.domain in ("", "ai.onnx")
        if is_conv and len(node.input) > 1:
            weight = node.input[1]
            if weight not in scope or (len(node.input) > 2 and weight not in own):
                # The quantizer excludes nodes by name; compact() drops node names afterwards.
                node.name = node.name or f"clipprune_conv_left_float_{len(found)}"
                found.append(node.name)
        for sub in node_subgraphs(node):
            _convs_left_float(sub, scope, found)


def _refusal(what: str, error: Exception, scratch: str | None = None) -> str:
    """One line for the caller: what failed, onnxruntime's reason without its codes and our
    scratch paths, and the encodings that work."""
    reason = onnxruntime_reason(error)
    if scratch:
        reason = reason.replace(scratch, "")
    tail = f"; {INT8_ADVICE}"
    return one_line(f"encoding int8: {what}: {one_line(reason)}", NOTE_LIMIT - len(tail)) + tail


def _require_loadable(data: bytes) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except MemoryError:
        raise
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise UnsupportedModelError(
            _refusal("onnxruntime cannot load the model its quantizer wrote", exc)
        ) from exc


def _quantize(model: ModelProto, exclude: list[str], subgraphs: bool) -> ModelProto:
    """onnxruntime's dynamic quantization of `model`; `subgraphs` lets it enter If/Loop/Scan
    bodies. Any failure, or a result onnxruntime cannot load, is an UnsupportedModelError."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="clipprune-int8-") as tmp:
        out = Path(tmp) / "model.int8.onnx"
        # The quantizer advises "pre-processing" on the root logger for every model, and warns
        # about every tensor it skips; that is advice to a person at a console, not something a
        # job's caller can act on.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(
                model,
                out,
                weight_type=QuantType.QInt8,
                # A scale per output channel: on a transformer's MatMuls it keeps the embedding
                # cosine near 0.995 where one scale per tensor gives 0.97.
                per_channel=True,
                nodes_to_exclude=exclude,
                extra_options={"EnableSubgraph": subgraphs},
            )
            data = out.read_bytes()
        except MemoryError:
            raise
        except Exception as exc:  # the quantizer raises whatever its code meets
            raise UnsupportedModelError(
                _refusal("onnxruntime's quantizer failed", exc, tmp)
            ) from exc
        finally:
            logging.disable(logging.NOTSET)
    _require_loadable(data)
    return ModelProto.FromString(data)


def _has_subgraphs(model: ModelProto) -> bool:
    return any(depth for _, depth in iter_graphs(model.graph))


@dataclass
class Quantized:
    model: ModelProto
    bodies_failure: str | None = None  # why If/Loop/Scan bodies were left float, if they were


def _quantize_bodies_too(model: ModelProto, exclude: list[str]) -> Quantized:
    """Quantize If/Loop/Scan bodies with the main graph (onnxruntime's EnableSubgraph); when
    the quantizer fails inside them, quantize the main graph alone rather than refuse."""
    try:
        return Quantized(_quantize(model, exclude, subgraphs=True))
    except UnsupportedModelError as failure:
        if not _has_subgraphs(model):
            raise
        reason = str(failure).removeprefix("encoding int8: ").removesuffix(f"; {INT8_ADVICE}")
        return Quantized(_quantize(model, exclude, subgraphs=False), one_line(reason, 120))


def _reads(node: NodeProto) -> set[str]:
    """The values a node reads: its inputs and what its subgraphs read from outside them
    (names a body defines itself may not shadow outer ones, so they never match a producer)."""
    names = set(node.input)
    for sub in node_subgraphs(node):
        for inner, _ in iter_graphs(sub):
            for inner_node in inner.node:
                names.update(inner_node.input)
    return names


def _sort_graph(graph: GraphProto) -> None:
    """Order the nodes so each follows the producers of what it reads, nearest to the order
    they had. onnxruntime's quantizer sorts without the values If/Loop/Scan bodies read from
    outside, which onnxruntime tolerates and onnx's checker does not."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output}
    waits = [
        {producer[name] for name in _reads(node) if name in producer} - {index}
        for index, node in enumerate(graph.node)
    ]
    readers: dict[int, list[int]] = {}
    for index, needed in enumerate(waits):
        for other in needed:
            readers.setdefault(other, []).append(index)
    ready = [index for index, needed in enumerate(waits) if not needed]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers.get(index, []):
            waits[reader].discard(index)
            if not waits[reader]:
                heapq.heappush(ready, reader)
    if order == list(range(len(graph.node))):
        return
    placed = set(order)
    order += [index for index in range(len(graph.node)) if index not in placed]  # a cycle
    nodes = [NodeProto() for _ in order]
    for copy, index in zip(nodes, order, strict=True):
        copy.CopyFrom(graph.node[index])
    del graph.node[:]
    graph.node.extend(nodes)


def _sort_topologically(model: ModelProto) -> ModelProto:
    for graph, _ in iter_graphs(model.graph):
        _sort_graph(graph)
    return model


def int8(model: ModelProto, pruned: set[str]) -> tuple[ModelProto, list[str]]:
    """onnxruntime's dynamic quantization of the pruned model (float32 weights only): the
    weights of MatMul, Gemm (rewritten to MatMul by the quantizer) and Conv, wherever they sit."""
    _require_float32_weights(model)
    weights = {slot.name for slot in find_weights(model)} | pruned
    work = hoisted_copy(model, _quantizer_inputs(model) | weights)
    exclude: list[str] = []
    _convs_left_float(work.graph, frozenset(), exclude)
    quantized = _quantize_bodies_too(work, exclude)
    _sort_topologically(quantized.model)
    notes = [
        INT8_NOTE,
        *_unquantized_notes(quantized, weights),
        *_float_left(quantized.model, weights),
    ]
    return compact(quantized.model), notes


# A note is worth it when tensors the quantizer does not take hold this share of the file.
FLOAT_LEFT_NOTE_SHARE = 0.1


def _float_left(model: ModelProto, weights: set[str]) -> list[str]:
    """A note naming the large float32 tensors int8 left beside the weights already named (an
    LSTM's weights, embeddings read by other ops, norms), when they hold a tenth of the file or
    more: else the ratio would say less than it seems without a word why."""
    left = {
        slot.name: slot.holder.ByteSize()
        for slot in all_float_constants(model)
        if isinstance(slot.holder, TensorProto)
        and slot.holder.data_type == TensorProto.FLOAT
        and np.prod(slot.shape, dtype=np.int64) >= FLOAT16_MIN_ELEMENTS
        and _source_name(slot.name, weights) not in weights
    }
    total = sum(left.values())
    if total < FLOAT_LEFT_NOTE_SHARE * model.ByteSize():
        return []
    largest = sorted(left, key=left.__getitem__, reverse=True)
    return [
        cut_list(
            f"int8: {total / 2**20:.2f} MiB stays float32 in tensors onnxruntime's quantizer does "
            "not take (not MatMul/Gemm/Conv/Gather weights; encoding float16 halves them): ",
            [one_line(name, NOTE_LIMIT // 4) for name in largest],
        )
    ]


def _in_body(slot: WeightSlot, main: GraphProto, main_nodes: set[int]) -> bool:
    return slot.graph is not main or any(id(use) not in main_nodes for use in slot.uses)


def _unquantized_reason(slot: WeightSlot, quantized: Quantized, main_nodes: set[int]) -> str:
    """Why a prunable weight is still float after quantization, as a note's prefix."""
    model = quantized.model
    if quantized.bodies_failure and _in_body(slot, model.graph, main_nodes):
        return (
            "int8: left float32 inside If/Loop/Scan bodies (the quantizer failed there: "
            f"{quantized.bodies_failure}): "
        )
    if isinstance(slot.holder, AttributeProto):
        return "int8: left float32, ai.onnx.ml attributes (the quantizer reads only tensors): "
    ops = {use.op_type for use in slot.uses}
    if not ops:
        return "int8: left float32, not a MatMul, Gemm or Conv weight: "
    if "Conv" in ops and _in_body(slot, model.graph, main_nodes):
        return (
            "int8: left float32, Conv in an If/Loop/Scan body with a bias and its weight in an "
            "enclosing graph (the quantizer cannot): "
        )
    if "ConvTranspose" in ops:
        return "int8: left float32, ConvTranspose weights (no integer ConvTranspose kernel): "
    if "Gemm" in ops:
        return (
            "int8: left float32, Gemm with alpha or beta other than 1 or transA=1 (the "
            "quantizer rewrites only plain Gemm to MatMul): "
        )
    if any(use.op_type == "MatMul" and use.input[0] == slot.name for use in slot.uses):
        return (
            "int8: left float32, MatMul's first input (only a constant second input is quantized): "
        )
    if not any(tensor.name == slot.name for tensor in slot.graph.initializer):
        return f"int8: left float32, {_unhoisted_reason(model)}: "
    return "int8: left float32 by onnxruntime's quantizer: "


def _source_name(name: str, weights: set[str]) -> str:
    """The weight a tensor left float came from: rewriting a Gemm to MatMul, the quantizer
    stores a transposed copy of its weight as "W_Transposed" (or "W_Transposed_1", ...)."""
    source = re.sub(r"_Transposed(_\d+)?$", "", name)
    return source if name not in weights and source in weights else name


def _unquantized_notes(quantized: Quantized, weights: set[str]) -> list[str]:
    """One note per reason, naming every prunable or pruned weight (`weights`, named as in the
    model before quantization) still float. Read before compact() renames internal tensors; a
    weight left float keeps its name."""
    model = quantized.model
    slots = find_weights(model)
    seen = {slot.name for slot in slots}
    slots += [s for s in all_float_constants(model) if s.name in weights and s.name not in seen]
    main_nodes = list(model.graph.node)  # held, so their ids stay theirs while compared
    main_ids = {id(node) for node in main_nodes}
    left: dict[str, list[str]] = {}
    for slot in slots:
        reason = _unquantized_reason(slot, quantized, main_ids)
        left.setdefault(reason, []).append(_source_name(slot.name, weights))
    return _reason_notes(left)


# --- float16 -----------------------------------------------------------------------------------

# Float tensors smaller than this (scales, epsilons, shape arithmetic) stay float32: halving
# them saves nothing and a Cast each would cost more than they weigh.
FLOAT16_MIN_ELEMENTS = 1024
FLOAT16_MAX = float(np.finfo(np.float16).max)
FLOAT16_NOTE = (
    "float16: float32 weights of at least {size} elements stored as float16, each read "
    "through a Cast to float32 (computation stays float32; onnxruntime folds the Casts at load)"
)


def _halve_in_graph(graph: GraphProto, taken: set[str], left: dict[str, list[str]]) -> None:
    """Each large float32 initializer of `graph` stored as float16 under a new name, and a
    Cast back to float32 under its own name, ahead of every node that reads it."""
    overridable = {value.name for value in graph.input}
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or tensor.name in overridable:
            continue
        if np.prod(tensor.dims, dtype=np.int64) < FLOAT16_MIN_ELEMENTS:
            continue
        array = numpy_helper.to_array(tensor)
        if np.max(np.abs(array), initial=0.0) > FLOAT16_MAX:
            left["float16: kept float32, values beyond its range: "].append(tensor.name)
            continue
        name, stored = tensor.name, f"{tensor.name}.float16"
        while stored in taken:
            stored += "_"
        taken.add(stored)
        tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float16), stored))
        casts.append(helper.make_node("Cast", [stored], [name], to=TensorProto.FLOAT))
    if casts:
        nodes = [*casts, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)


def float16(model: ModelProto, pruned: set[str]) -> tuple[ModelProto, list[str]]:
    """Weights at half the bytes and a relative error near 5e-4, computation unchanged: the
    encoding that shrinks a model whose int8 error is too large (conv nets, whose activations
    the dynamic quantizer rounds too)."""
    large = {
        slot.name
        for slot in all_float_constants(model)
        if np.prod(slot.shape, dtype=np.int64) >= FLOAT16_MIN_ELEMENTS
    }
    work = hoisted_copy(model, large)
    taken = {name for graph, _ in iter_graphs(work.graph) for name in _names(graph)}
    left: dict[str, list[str]] = defaultdict(list)
    for graph, _ in iter_graphs(work.graph):
        _halve_in_graph(graph, taken, left)
    notes = [FLOAT16_NOTE.format(size=FLOAT16_MIN_ELEMENTS), *_reason_notes(left)]
    return work, notes


def _names(graph: GraphProto) -> set[str]:
    """Every value name a graph defines or reads."""
    names = {value.name for value in [*graph.input, *graph.output, *graph.value_info]}
    names |= {tensor.name for tensor in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


# Each returns the model to write (the caller's own, or a changed copy) and its notes.
ENCODERS: dict[Encoding, Callable[[ModelProto, set[str]], tuple[ModelProto, list[str]]]] = {
    "dense": dense,
    "sparse": sparse,
    "int8": int8,
    "float16": float16,
}


def compact(model: ModelProto) -> ModelProto:
    """The same computation in fewer bytes: on a small quantized model the names the quantizer
    writes ("coefficient_quantized_output_0", ...) outweigh the weights. Internal value and
    initializer names become short ones, node names and doc strings go, and value_info (shape
    annotations onnxruntime infers again) is dropped. The model's inputs and outputs keep
    their names, so callers see no difference."""
    interface = {value.name for value in [*model.graph.input, *model.graph.output]}
    # old PyTorch exports name every value "0", "1", ...: a short name must not be one of the
    # interface names that stay
    fresh = (name for name in map("{:x}".format, itertools.count()) if name not in interface)
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in interface:
            return name
        if name not in short:
            short[name] = next(fresh)
        return short[name]

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
