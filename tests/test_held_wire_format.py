"""Held models at the wire format (workers/graph/wire.py): files protobuf reads but writes
otherwise (longer varints, fields of another wire type) prune to protobuf's bytes or are
parsed whole; varints too long to read are refused as parse_model refuses them; a large float
constant of a type not held is still read; the scanner's cost on many small fields is bounded."""

import tracemalloc

import numpy as np
import pytest
from graphs import gemm_mlp
from onnx import TensorProto, helper
from test_held_models import chosen_path, whole_path

from schemas import PruneParams
from workers.compress.prune import parse_for_pruning
from workers.errors import InvalidModelError
from workers.graph.held import HELD_TYPES
from workers.graph.load import ModelLimits, parse_model, parse_skeleton, serialize
from workers.graph.wire import GRAPH_FIELD, INITIALIZER_FIELD, fields, varint_bytes

RAW_TAG = varint_bytes(9 << 3 | 2)


def overlong(value: int, extra: int = 1) -> bytes:
    """`value` as a varint `extra` bytes longer than protobuf writes it."""
    encoded = bytearray(varint_bytes(value))
    encoded[-1] |= 0x80
    return bytes(encoded + b"\x80" * (extra - 1) + b"\x00")


def rewritten(data: bytes, tensor: bytes, init_tag=None, init_length=None, graph_length=None):
    """`data` with its first initializer written as `tensor`, its tag and length and the
    graph's length as given (protobuf's own where not)."""
    view, out = memoryview(data), b""
    for top in fields(view, 0, len(view)):
        if top.number != GRAPH_FIELD:
            out += bytes(view[top.start : top.end])
            continue
        graph, first = b"", True
        for inner in fields(view, top.value, top.end):
            if inner.number == INITIALIZER_FIELD and first:
                first = False
                tag = init_tag or varint_bytes(INITIALIZER_FIELD << 3 | 2)
                length = (init_length or varint_bytes)(len(tensor))
                graph += tag + length + tensor
            else:
                graph += bytes(view[inner.start : inner.end])
        length = (graph_length or varint_bytes)(len(graph))
        out += varint_bytes(GRAPH_FIELD << 3 | 2) + length + graph
    return out


def mlp() -> tuple[bytes, bytes, bytes]:
    """The model's bytes, its W0 (128 KB: stripped) without raw_data, and W0's raw_data."""
    model = gemm_mlp([256, 128, 10], trans_b=1)
    w0 = model.graph.initializer[0]
    head = serialize(TensorProto(dims=w0.dims, data_type=w0.data_type, name=w0.name))
    return serialize(model), head, w0.raw_data


def variants() -> dict[str, bytes]:
    data, head, raw = mlp()
    plain = head + RAW_TAG + varint_bytes(len(raw)) + raw
    assert rewritten(data, plain) == data
    return {
        "raw_data length": rewritten(data, head + RAW_TAG + overlong(len(raw)) + raw),
        "raw_data tag": rewritten(data, head + overlong(9 << 3 | 2) + varint_bytes(len(raw)) + raw),
        "initializer length": rewritten(data, plain, init_length=overlong),
        "initializer tag": rewritten(data, plain, init_tag=overlong(INITIALIZER_FIELD << 3 | 2)),
        "graph length": rewritten(data, plain, graph_length=overlong),
        # field numbers of dims and name, of other wire types: unknown fields to protobuf
        "dims as fixed64": rewritten(
            data, head + varint_bytes(1 << 3 | 1) + b"\0" * 8 + plain[len(head) :]
        ),
        "name as varint": rewritten(
            data, head + varint_bytes(8 << 3) + b"\x05" + plain[len(head) :]
        ),
    }


@pytest.mark.parametrize("variant", list(variants()))
def test_a_model_written_otherwise_than_protobuf_writes_prunes_to_protobufs_bytes(variant):
    data = variants()[variant]
    parse_model(data)  # a valid model, written another way
    params = PruneParams(sparsity=0.5)
    expected, layers, nonzero = whole_path(data, params)
    held_bytes, held_layers, held_nonzero = chosen_path(data, params)
    assert held_bytes is None or held_bytes == expected
    assert (held_layers, held_nonzero) == (layers, nonzero)


@pytest.mark.parametrize("extra", [5, 6, 10])
def test_a_varint_longer_than_protobuf_reads_is_refused_as_parse_model_refuses_it(extra):
    data, head, raw = mlp()
    broken = rewritten(data, head + RAW_TAG + overlong(len(raw), extra) + raw)
    with pytest.raises(InvalidModelError) as whole:
        parse_model(broken)
    with pytest.raises(InvalidModelError) as held:
        parse_for_pruning(broken, PruneParams(sparsity=0.5))
    assert str(held.value) == str(whole.value)


def test_a_large_float_constant_of_a_type_not_held_is_still_read():
    model = gemm_mlp([256, 128, 10], trans_b=1)
    rng = np.random.default_rng(0)
    table = rng.standard_normal(128 * 256).astype(np.float32).view(np.uint32) >> 16
    model.graph.initializer.append(
        helper.make_tensor(
            "B", TensorProto.BFLOAT16, [128, 256], table.astype(np.uint16).tobytes(), raw=True
        )
    )
    model.graph.node.append(helper.make_node("Cast", ["B"], ["Bf"], to=TensorProto.FLOAT))
    model.graph.node.append(helper.make_node("Add", ["Bf", "W0"], ["sum"]))
    model.graph.output.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, [128, 256]))
    data = serialize(model)
    params = PruneParams(sparsity=0.5)
    expected, layers, nonzero = whole_path(data, params)
    held_bytes, held_layers, held_nonzero = chosen_path(data, params)
    assert held_bytes is None or held_bytes == expected
    assert (held_layers, held_nonzero) == (layers, nonzero)


def test_many_small_graph_fields_cost_the_scanner_no_more_than_a_few_times_the_file():
    data, _, _ = mlp()
    view, out = memoryview(data), b""
    unknown = (varint_bytes(100 << 3) + b"\x00") * 500_000  # 1.5 MB of unknown graph fields
    for top in fields(view, 0, len(view)):
        if top.number == GRAPH_FIELD:
            graph = bytes(view[top.value : top.end]) + unknown
            out += varint_bytes(GRAPH_FIELD << 3 | 2) + varint_bytes(len(graph)) + graph
        else:
            out += bytes(view[top.start : top.end])
    tracemalloc.start()
    try:
        parse_for_pruning(out, PruneParams(sparsity=0.5))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(out)


def test_a_graph_of_more_fields_than_the_scan_allows_is_parsed_whole():
    data, _, _ = mlp()  # a graph of 10 fields: 3 nodes, 4 initializers, name, input, output
    assert parse_skeleton(data, 1024, HELD_TYPES) is not None
    tight = ModelLimits(max_nodes=1, max_initializers=1)  # a scan of 4 * (1 + 1) fields
    assert parse_skeleton(data, 1024, HELD_TYPES, tight) is None
