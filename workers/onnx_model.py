"""Reading untrusted ONNX bytes safely, and writing models back.

A model comes from another service, so it is parsed from bytes only, never allowed to point at
files (external data), checked by onnx's checker, and capped in size before any tensor is read.
"""

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
from google.protobuf.message import DecodeError
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

from workers.errors import InvalidModelError, UnsafeModelError

# Domains whose operators onnxruntime implements itself. A model-local function adds its own.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

# Attributes that hold subgraphs: If.then_branch/else_branch, Loop.body, Scan.body, and more.
_GRAPH_ATTRS = (AttributeProto.GRAPH, AttributeProto.GRAPHS)


@dataclass(frozen=True)
class ModelLimits:
    """What one model may declare before it is refused unread."""

    max_bytes: int = 2**31 - 1  # protobuf's own limit for one message
    max_tensor_elements: int = 2**28  # 1 GiB of float32 in one tensor
    max_total_elements: int = 2**29
    max_dim: int = 2**28  # any declared dimension of a tensor or graph input
    max_nodes: int = 100_000  # all graphs together
    max_subgraph_depth: int = 8


def iter_graphs(graph: GraphProto, depth: int = 0) -> Iterator[tuple[GraphProto, int]]:
    """The graph and every subgraph below it (If/Loop/Scan bodies), with their depth."""
    yield graph, depth
    for node in graph.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                yield from iter_graphs(sub, depth + 1)


def _subgraphs(attr: AttributeProto) -> list[GraphProto]:
    if attr.type == AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _all_nodes(model: ModelProto) -> Iterator[NodeProto]:
    for graph, _ in iter_graphs(model.graph):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _tensors_of(model: ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor the model carries, with where it sits (for messages)."""
    for graph, _ in iter_graphs(model.graph):
        for tensor in graph.initializer:
            yield f"initializer {tensor.name!r}", tensor
        for sparse in graph.sparse_initializer:
            yield f"sparse initializer {sparse.values.name!r}", sparse.values
            yield f"sparse initializer {sparse.values.name!r} (indices)", sparse.indices
    for node in _all_nodes(model):
        for attr in node.attribute:
            where = f"attribute {attr.name!r} of {node.op_type} node {node.name!r}"
            if attr.HasField("t"):
                yield where, attr.t
            for tensor in attr.tensors:
                yield where, tensor
            if attr.HasField("sparse_tensor"):
                yield where, attr.sparse_tensor.values
                yield where, attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield where, sparse.values
                yield where, sparse.indices


def _elements(dims: list[int]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def parse_model(data: bytes, limits: ModelLimits = ModelLimits()) -> ModelProto:
    """Parse and validate untrusted ONNX bytes, or raise a typed error saying why not."""
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
    _check_limits(model, limits)
    _check_no_external_data(model)
    _check_domains(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise InvalidModelError(f"the ONNX checker rejected the model: {first_line}") from exc
    return model


def _check_limits(model: ModelProto, limits: ModelLimits) -> None:
    nodes = 0
    for graph, depth in iter_graphs(model.graph):
        if depth > limits.max_subgraph_depth:
            raise UnsafeModelError(
                f"subgraphs are nested {depth} deep; the limit is {limits.max_subgraph_depth}"
            )
        nodes += len(graph.node)
        for value in [*graph.input, *graph.output, *graph.value_info]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and not 0 <= dim.dim_value <= limits.max_dim:
                    raise UnsafeModelError(
                        f"{value.name!r} declares a dimension of {dim.dim_value}; "
                        f"dimensions must be in 0..{limits.max_dim}"
                    )
    nodes += sum(len(function.node) for function in model.functions)
    if nodes > limits.max_nodes:
        raise UnsafeModelError(f"the model has {nodes} nodes; the limit is {limits.max_nodes}")
    total = 0
    for where, tensor in _tensors_of(model):
        if any(not 0 <= dim <= limits.max_dim for dim in tensor.dims):
            raise UnsafeModelError(
                f"{where} declares dims {list(tensor.dims)}; dimensions must be in "
                f"0..{limits.max_dim}"
            )
        count = _elements(list(tensor.dims))
        if count > limits.max_tensor_elements:
            raise UnsafeModelError(
                f"{where} has {count} elements; the limit is {limits.max_tensor_elements}"
            )
        total += count
    if total > limits.max_total_elements:
        raise UnsafeModelError(
            f"the model's tensors hold {total} elements; the limit is {limits.max_total_elements}"
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


def _check_domains(model: ModelProto) -> None:
    allowed = KNOWN_DOMAINS | {function.domain for function in model.functions}
    for node in _all_nodes(model):
        if node.domain not in allowed:
            raise UnsafeModelError(
                f"{node.op_type} node {node.name!r} uses the unknown operator domain "
                f"{node.domain!r}; supported domains: "
                + ", ".join(repr(d) for d in sorted(KNOWN_DOMAINS))
            )


def serialize(model: ModelProto) -> bytes:
    return model.SerializeToString()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def opsets(model: ModelProto) -> dict[str, int]:
    return {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
