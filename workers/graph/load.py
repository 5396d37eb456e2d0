"""Reading untrusted ONNX bytes safely, and writing models back.

A model comes from another service, so it is parsed from bytes only, never allowed to point at
files (external data), checked by onnx's checker, and capped in size before any tensor is read.
"""

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import onnx
from google.protobuf.message import DecodeError
from onnx import (
    AttributeProto,
    GraphProto,
    ModelProto,
    NodeProto,
    SparseTensorProto,
    TensorProto,
    helper,
)

from workers.errors import InvalidModelError, UnsafeModelError, first_line
from workers.graph.walk import iter_graphs, node_subgraphs
from workers.graph.wire import Stripped, strip_weight_data, tensor_at

# Domains whose operators onnxruntime implements itself. A model-local function adds its own.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


@dataclass(frozen=True)
class ModelLimits:
    """What one model may declare before it is refused unread."""

    max_bytes: int = 2**31 - 1  # protobuf's own limit for one message
    max_tensor_elements: int = 2**28  # 1 GiB of float32 in one tensor
    max_total_elements: int = 2**29  # what the tensors hold, and, apart, what the model computes
    # a string element costs tens of bytes as an object however short: counted on their own
    max_strings: int = 2**20
    max_dim: int = 2**28  # any declared dimension of a tensor or graph input
    max_nodes: int = 100_000  # all graphs together
    max_subgraph_depth: int = 8
    # onnxruntime spends seconds per session on tens of thousands of tensors or inputs, and a
    # job opens several sessions; real models stay far below (a 7B-parameter LLM: ~300 tensors)
    max_initializers: int = 20_000  # all graphs together, sparse ones included
    max_inputs: int = 1_000  # graph inputs and outputs, each


def _model_graphs(model: ModelProto) -> Iterator[tuple[GraphProto, int]]:
    """Every graph in the model: the main graph, its subgraphs, and subgraphs inside
    model-local function bodies (a function body is depth 0, its If/Loop bodies below it)."""
    yield from iter_graphs(model.graph)
    for function in model.functions:
        for node in function.node:
            for sub in node_subgraphs(node):
                yield from iter_graphs(sub, 1)


def _all_nodes(model: ModelProto) -> Iterator[NodeProto]:
    for graph, _ in _model_graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _attributes(model: ModelProto) -> Iterator[tuple[str, AttributeProto]]:
    """Every node attribute in the model, with where it sits (for messages)."""
    for node in _all_nodes(model):
        for attr in node.attribute:
            yield f"attribute {attr.name!r} of {node.op_type} node {node.name!r}", attr


def _attribute_values(model: ModelProto, one: str, many: str) -> Iterator[tuple[str, Any]]:
    """The values every attribute holds in its field `one` (when set) and list field `many`."""
    for where, attr in _attributes(model):
        if attr.HasField(one):
            yield where, getattr(attr, one)
        for value in getattr(attr, many):
            yield where, value


def _sparse_tensors(model: ModelProto) -> Iterator[tuple[str, SparseTensorProto]]:
    for graph, _ in _model_graphs(model):
        for sparse in graph.sparse_initializer:
            yield f"sparse initializer {sparse.values.name!r}", sparse
    yield from _attribute_values(model, "sparse_tensor", "sparse_tensors")


def _tensors_of(model: ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every dense tensor the model carries, with where it sits (for messages)."""
    for graph, _ in _model_graphs(model):
        for tensor in graph.initializer:
            yield f"initializer {tensor.name!r}", tensor
    yield from _attribute_values(model, "t", "tensors")
    for where, sparse in _sparse_tensors(model):
        yield where, sparse.values
        yield f"{where} (indices)", sparse.indices


def parse_model(data: bytes, limits: ModelLimits = ModelLimits()) -> ModelProto:
    """Parse and validate untrusted ONNX bytes, or raise a typed error saying why not."""
    _check_model(_load(data, limits), data, limits)
    return onnx.load_model_from_string(data)


def parse_skeleton(
    data: bytes, min_bytes: int, types: frozenset[int], limits: ModelLimits = ModelLimits()
) -> tuple[ModelProto, Stripped] | None:
    """parse_model's checks on `data`, and the model without the raw_data of its main graph's
    weights of `types` of at least `min_bytes` (see Stripped for which and where); None
    when the model cannot be parsed so, or when protobuf would not write the skeleton back
    byte for byte (so neither would it the whole model): then only parse_model can read it."""
    if len(data) > limits.max_bytes:
        return None
    try:
        # a graph's fields: its nodes, initializers and the values they name, a few each
        max_fields = 4 * (limits.max_nodes + limits.max_initializers)
        stripped = strip_weight_data(data, min_bytes, types, max_fields)
    except DecodeError:
        return None  # parse_model says what is wrong
    if stripped is None:
        return None
    checking = _load(stripped.skeleton, limits)
    if serialize(checking) != stripped.skeleton:
        return None
    # The checker reads the whole model; the stripped lengths are checked as parse_model
    # checks raw_data, before it. Keyed by the wrappers (protobuf keeps one per message while
    # it is referenced, and `tensors` keeps them).
    tensors = {path: tensor_at(checking.graph, path) for path in stripped.stripped}
    held = {id(tensors[path]): stripped.spans[path][1] for path in stripped.stripped}
    _check_model(checking, data, limits, held)
    return onnx.load_model_from_string(stripped.skeleton), stripped


def _load(data: bytes, limits: ModelLimits) -> ModelProto:
    if len(data) > limits.max_bytes:
        raise UnsafeModelError(f"model is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise InvalidModelError(
            f"the upload is not a readable ONNX model (protobuf could not parse it: {exc}); "
            "send the bytes of an .onnx file"
        ) from exc
    if not model.HasField("graph") or not model.graph.node:
        raise InvalidModelError("the upload has no ONNX graph with nodes; send an .onnx file")
    return model


def _check_model(
    model: ModelProto, data: bytes, limits: ModelLimits, held: Mapping[int, int] | None = None
) -> None:
    """Every check of `model` parsed from `data` (or from its skeleton: `held` gives the raw_data
    length of each tensor stripped, by id). `model` is spent."""
    _check_limits(model, limits, held or {})
    _check_no_external_data(model)
    _check_domains(model)
    _check_opsets(model)
    _check_computed_shapes(model, limits)  # strips the weights' data: `model` is spent
    # The checker gets the bytes (given a ModelProto it would serialize a copy first) and parses
    # them in C++: the Python model is let go meanwhile, so no two copies of a model that may be
    # hundreds of MB coexist beside the bytes.
    del model
    try:
        onnx.checker.check_model(data)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"the ONNX checker rejected the model: {first_line(exc)}") from exc


def _check_dims(where: str, dims: list[int], limits: ModelLimits) -> int:
    """Refuse out-of-range dims; the element count (exact: Python integers do not overflow)."""
    if any(not 0 <= dim <= limits.max_dim for dim in dims):
        raise UnsafeModelError(
            f"{where} declares dims {dims}; dimensions must be in 0..{limits.max_dim}"
        )
    count = math.prod(dims)
    if count > limits.max_tensor_elements:
        raise UnsafeModelError(
            f"{where} has {count} elements; the limit is {limits.max_tensor_elements}"
        )
    return count


def _check_limits(model: ModelProto, limits: ModelLimits, held: Mapping[int, int]) -> None:
    nodes = 0
    for graph, depth in _model_graphs(model):
        if depth > limits.max_subgraph_depth:
            raise UnsafeModelError(
                f"subgraphs are nested {depth} deep; the limit is {limits.max_subgraph_depth}"
            )
        nodes += len(graph.node)
        for value in [*graph.input, *graph.output, *graph.value_info]:
            for dim in value.type.tensor_type.shape.dim:
                # A negative dim (PaddlePaddle's -1 batch) is taken as symbolic, as onnxruntime
                # takes it; only a dim past the cap is refused.
                if dim.HasField("dim_value") and dim.dim_value > limits.max_dim:
                    raise UnsafeModelError(
                        f"{value.name!r} declares a dimension of {dim.dim_value}; "
                        f"the limit is {limits.max_dim}"
                    )
    for kind, count in (("inputs", len(model.graph.input)), ("outputs", len(model.graph.output))):
        if count > limits.max_inputs:
            raise UnsafeModelError(
                f"the model has {count} graph {kind}; the limit is {limits.max_inputs}"
            )
    initializers = sum(
        len(graph.initializer) + len(graph.sparse_initializer) for graph, _ in _model_graphs(model)
    )
    if initializers > limits.max_initializers:
        raise UnsafeModelError(
            f"the model has {initializers} initializers; the limit is {limits.max_initializers}"
            ": drop the unused ones (onnx.utils.extract_model or onnxsim)"
        )
    nodes += sum(len(function.node) for function in model.functions)
    if nodes > limits.max_nodes:
        raise UnsafeModelError(f"the model has {nodes} nodes; the limit is {limits.max_nodes}")
    total = 0
    strings = sum(1 for _ in _attribute_values(model, "s", "strings"))
    for where, tensor in _tensors_of(model):
        count = _check_dims(where, list(tensor.dims), limits)
        total += count
        strings += len(tensor.string_data)
        _check_raw_size(where, tensor, count, held.get(id(tensor)))
    if strings > limits.max_strings:
        raise UnsafeModelError(
            f"the model holds {strings} strings in its tensors and attributes; the limit is "
            f"{limits.max_strings}"
        )
    for where, sparse in _sparse_tensors(model):
        total += _check_dims(f"{where} (dense shape)", list(sparse.dims), limits)
    if total > limits.max_total_elements:
        raise UnsafeModelError(
            f"the model's tensors hold {total} elements; the limit is {limits.max_total_elements}"
        )


_PACKED_4BIT = frozenset(
    getattr(TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(TensorProto, name)
)


def raw_data_bytes(data_type: int, count: int) -> int | None:
    """The bytes raw_data holds for `count` elements of `data_type`; None where the type does
    not fix it (strings, a type onnx does not know)."""
    if data_type == TensorProto.STRING:
        return None
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError):
        return None
    return (count + 1) // 2 if data_type in _PACKED_4BIT else count * itemsize


def _check_raw_size(where: str, tensor: TensorProto, count: int, held: int | None) -> None:
    """raw_data must hold exactly the declared elements (the checker lets a longer one pass);
    `held`: the length of the raw_data a skeleton's tensor was stripped of."""
    if (held is None and not tensor.HasField("raw_data")) or tensor.data_type == TensorProto.STRING:
        return
    length = len(tensor.raw_data) if held is None else held
    expected = raw_data_bytes(tensor.data_type, count)
    if expected is None:
        raise InvalidModelError(f"{where} has unknown data type {tensor.data_type}")
    if length != expected:
        raise InvalidModelError(
            f"{where} declares {count} elements ({expected} bytes) but holds {length} bytes of data"
        )


def _check_no_external_data(model: ModelProto) -> None:
    for where, tensor in _tensors_of(model):
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            location = next(
                (entry.value for entry in tensor.external_data if entry.key == "location"), "?"
            )
            raise UnsafeModelError(
                f"{where} stores its data in an external file ({location!r}); clipprune only "
                "accepts self-contained models: save with save_as_external_data=False"
            )


# The newest opset of each standard domain that the installed onnx (and so its checker) knows;
# onnxruntime's newer-opset refusal is a C++ trace, so a model past them is refused here.
_NEWEST_OPSETS = {
    "": onnx.defs.onnx_opset_version(),
    "ai.onnx": onnx.defs.onnx_opset_version(),
    "ai.onnx.ml": onnx.defs.onnx_ml_opset_version(),
}


def _check_opsets(model: ModelProto) -> None:
    for entry in model.opset_import:
        newest = _NEWEST_OPSETS.get(entry.domain)
        if newest is not None and entry.version > newest:
            raise UnsafeModelError(
                f"the model imports opset {entry.version} of domain {entry.domain or 'ai.onnx'!r}"
                f"; the newest this service knows is {newest}: export the model with opset "
                f"{newest} or older"
            )


# Tensors larger than this are weights or data, never shapes: shape inference need not read them,
# and onnx's data propagation would copy an int64 one element by element into shape protos.
_SHAPE_TENSOR_MAX = 1024
_TENSOR_DATA_FIELDS = (
    "raw_data", "float_data", "double_data", "int32_data", "int64_data", "uint64_data",
    "string_data",
)  # fmt: skip

_INTEGER_TYPES = frozenset(
    {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8}
)

# Operators that allocate an output whose size is read from the values of these inputs.
ALLOCATING_INPUTS = {
    "ConstantOfShape": (0,),
    "Expand": (1,),
    "Tile": (1,),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Range": (0, 1, 2),
}


# onnx's data propagation copies every integer it folds into a shape proto of its own (tens of
# bytes an element): run it only when no integer tensor the model computes is larger than this.
_PROPAGATED_MAX = 2**16


def _check_computed_shapes(skeleton: ModelProto, limits: ModelLimits) -> None:
    """Refuse a model that would compute tensors past the caps, such as a ConstantOfShape or an
    Expand to a constant shape of gigabytes: evaluation runs the model in onnxruntime, which
    would allocate them. The large tensors' data is cleared from `skeleton` first, so what
    onnx's C++ side copies and returns stays small. Shapes are inferred twice: plainly, which
    bounds every tensor, then with constants propagated (which folds shape arithmetic) when
    no computed integer tensor is large enough to make propagation itself a bomb."""
    for _, tensor in _tensors_of(skeleton):
        if math.prod(tensor.dims) > _SHAPE_TENSOR_MAX:
            for field in _TENSOR_DATA_FIELDS:
                tensor.ClearField(field)
    inferred = _inferred(skeleton, data_prop=False)
    if _check_sizes(inferred, limits) <= _PROPAGATED_MAX:
        inferred = _inferred(skeleton, data_prop=True)
        _check_sizes(inferred, limits)
    for graph, _ in iter_graphs(inferred.graph):
        reach = _Reach(graph)
        shapes = _shapes(graph)
        for node in graph.node:
            _check_allocation_is_folded(node, reach, shapes)
            _check_loop_trips(node, reach, limits)


def _inferred(skeleton: ModelProto, data_prop: bool) -> ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(skeleton, data_prop=data_prop)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        # ValidationError: a model-local function that calls itself, among others
        raise InvalidModelError(
            f"onnx shape inference rejected the model: {first_line(exc)}"
        ) from exc


def _shapes(graph: GraphProto) -> dict[str, onnx.TypeProto.Tensor]:
    return {value.name: value.type.tensor_type for value in [*graph.value_info, *graph.output]}


def _check_sizes(inferred: ModelProto, limits: ModelLimits) -> int:
    """Every computed tensor within the caps, and their sum; returns the element count of the
    largest integer tensor computed."""
    total = largest_integers = 0
    for graph, _ in iter_graphs(inferred.graph):
        producers = {output: node for node in graph.node for output in node.output}
        for name, tensor_type in _shapes(graph).items():
            count = _check_inferred(name, tensor_type, producers.get(name), limits)
            total += count
            if tensor_type.elem_type in _INTEGER_TYPES:
                largest_integers = max(largest_integers, count)
    if total > limits.max_total_elements:
        raise UnsafeModelError(
            f"the model would compute {total} elements in its tensors (counting each symbolic "
            f"dimension as 1); the limit is {limits.max_total_elements}, so it is refused rather "
            "than run"
        )
    return largest_integers


def _check_inferred(
    name: str, tensor_type: onnx.TypeProto.Tensor, producer: NodeProto | None, limits: ModelLimits
) -> int:
    """The elements of a computed tensor (symbolic dims count as 1, as does a -1 inference
    carried over from a PaddlePaddle input); past the caps, the model is refused."""
    shape = tensor_type.shape.dim
    known = [dim.dim_value for dim in shape if dim.HasField("dim_value")]
    count = math.prod(dim for dim in known if dim >= 0)
    if count <= limits.max_tensor_elements and all(dim <= limits.max_dim for dim in known):
        return count
    dims = [dim.dim_value if dim.HasField("dim_value") else dim.dim_param for dim in shape]
    source = f"{producer.op_type} node {producer.name!r}" if producer is not None else "the graph"
    raise UnsafeModelError(
        f"{source} would make {name!r} of shape {dims} ({count} elements); the "
        f"limit is {limits.max_tensor_elements} elements and {limits.max_dim} per "
        "dimension, so the model is refused rather than run"
    )


def _unfolded(tensor_type: onnx.TypeProto.Tensor | None) -> bool:
    """No rank, or a dim that is neither known nor named by the model: inference could not
    tell the size (it names such dims unk__0, unk__1, ...)."""
    if tensor_type is None or not tensor_type.HasField("shape"):
        return True
    return any(
        not dim.HasField("dim_value") and (not dim.dim_param or dim.dim_param.startswith("unk__"))
        for dim in tensor_type.shape.dim
    )


class _Reach:
    """Where the values of one graph come from: its initializers, its inputs, the node that
    produces each value."""

    def __init__(self, graph: GraphProto) -> None:
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.inputs = {value.name for value in graph.input} - set(self.initializers)
        self.producers = {output: node for node in graph.node for output in node.output}

    def constant_source(self, name: str) -> NodeProto | None:
        """When `name` is computed from constants only, the computing node farthest up the way
        (where the size is first computed, past any Constant); None when a graph input, or a
        value from an outer graph, reaches it: then its size depends on what the caller sends."""
        seen: set[str] = set()
        stack, farthest = [name], None
        while stack:
            current = stack.pop()
            if not current or current in seen or current in self.initializers:
                continue
            seen.add(current)
            node = self.producers.get(current)
            if current in self.inputs or node is None:
                return None
            if node.op_type != "Constant":
                farthest = node
            stack.extend(node.input)
        return farthest


def _check_allocation_is_folded(
    node: NodeProto, reach: _Reach, shapes: dict[str, onnx.TypeProto.Tensor]
) -> None:
    """An allocating node whose output size comes from constants alone should have had it folded
    by inference; when it was not (ReduceProd, ReduceMax on the way), the size is unknown until
    onnxruntime allocates it, so the model is refused."""
    sizes = ALLOCATING_INPUTS.get(node.op_type)
    if sizes is None or node.domain not in ("", "ai.onnx") or not node.output:
        return
    if not _unfolded(shapes.get(node.output[0])):
        return
    named = [node.input[index] for index in sizes if index < len(node.input) and node.input[index]]
    sources = [reach.constant_source(name) for name in named]
    if not named or any(source is None for source in sources):
        return
    culprit = next(source for source in sources if source is not None)
    raise UnsafeModelError(
        f"{node.op_type} node {node.name!r} allocates a tensor whose size is computed from "
        f"constants by {culprit.op_type} node {culprit.name!r}, which shape inference cannot "
        "fold: fold the constants (onnxsim) before sending"
    )


def _check_loop_trips(node: NodeProto, reach: _Reach, limits: ModelLimits) -> None:
    """A Loop stacks each scan output once per iteration: a constant trip count past the
    dimension cap is a tensor past it (its body's scan outputs follow the carried values)."""
    if node.op_type != "Loop" or not node.input or not node.input[0]:
        return
    body = next(node_subgraphs(node))
    carried = len(node.input) - 2
    if len(body.output) <= 1 + carried:  # the condition, the carried values: nothing stacked
        return
    trips = reach.initializers.get(node.input[0])
    if trips is None or (not trips.raw_data and not trips.int64_data):
        return
    count = int(onnx.numpy_helper.to_array(trips).reshape(-1)[0])
    if count > limits.max_dim:
        raise UnsafeModelError(
            f"Loop node {node.name!r} would stack {count} iterations of its scan outputs; the "
            f"limit is {limits.max_dim} per dimension, so the model is refused rather than run"
        )


def _check_domains(model: ModelProto) -> None:
    functions = {(function.domain, function.name) for function in model.functions}
    for node in _all_nodes(model):
        if node.domain not in KNOWN_DOMAINS and (node.domain, node.op_type) not in functions:
            raise UnsafeModelError(
                f"{node.op_type} node {node.name!r} uses the unknown operator domain "
                f"{node.domain!r}; supported domains: "
                + ", ".join(repr(d) for d in sorted(KNOWN_DOMAINS))
                + ", and functions defined in the model"
            )


def serialize(model: ModelProto) -> bytes:
    return model.SerializeToString()


def opsets(model: ModelProto) -> dict[str, int]:
    return {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
