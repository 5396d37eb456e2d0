"""Hostile models and data from issue 14's review (Found 1 and 5): small uploads built to make a
worker allocate gigabytes or run for hours. Each is a valid ONNX model: tests/test_bombs.py
shows the service refuses each for its size or its time, not as malformed."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(
    nodes: list[onnx.NodeProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    inputs: list[onnx.ValueInfoProto] | None = None,
) -> bytes:
    """X [N, 4] -> MatMul W -> Y, plus the bomb's nodes and outputs."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"]), *nodes],
        "bomb",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4]), *(inputs or [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3]), *outputs],
        [
            numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W"),
            *initializers,
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model.SerializeToString()


def _output(name: str, rank: int, elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """An output of known rank and unknown dims: the model does not give its size away."""
    return helper.make_tensor_value_info(
        name, elem_type, [f"{name}_{axis}" for axis in range(rank)]
    )


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def reduce_prod_shape() -> bytes:
    """ConstantOfShape of a shape computed by ReduceProd (2^31 floats): shape inference cannot
    fold ReduceProd, so no per-tensor cap sees the size."""
    nodes = [
        helper.make_node("ReduceProd", ["S"], ["P"], keepdims=1),
        helper.make_node("ConstantOfShape", ["P"], ["C"]),
        helper.make_node("ReduceSum", ["C"], ["Z"], keepdims=0),
    ]
    return _model(nodes, [_output("Z", 0)], [_ints("S", [2**15, 2**16])])


def resize_by_reduce_max() -> bytes:
    """Resize of a [1, 1, 64, 64] image by scales from ReduceMax: 2^32 floats."""
    image = numpy_helper.from_array(np.ones((1, 1, 64, 64), np.float32), "image")
    scales = numpy_helper.from_array(np.array([[1, 1, 1024, 1024]] * 2, np.float32), "S")
    nodes = [
        helper.make_node("ReduceMax", ["S"], ["scales"], axes=[0], keepdims=0),
        helper.make_node("Resize", ["image", "", "scales"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["Z"], keepdims=0),
    ]
    return _model(nodes, [_output("Z", 0)], [image, scales])


def loop_body(scan: bool) -> onnx.GraphProto:
    """A Loop body that keeps going; with `scan`, it emits 1024 floats each iteration."""
    nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    outputs = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])]
    if scan:
        row = numpy_helper.from_array(np.ones(1024, np.float32))
        nodes.append(helper.make_node("Constant", [], ["row"], value=row))
        outputs.append(helper.make_tensor_value_info("row", TensorProto.FLOAT, [1024]))
    else:
        nodes.append(helper.make_node("Identity", ["carried_in"], ["carried_out"]))
        outputs.append(helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, [1]))
    inputs = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
    ]
    if not scan:
        inputs.append(helper.make_tensor_value_info("carried_in", TensorProto.FLOAT, [1]))
    return helper.make_graph(nodes, "body", inputs, outputs)


def endless_loop(scan: bool) -> bytes:
    """A Loop with trip count 2^62: with `scan`, stacking a scan output of 2^72 floats; without,
    an empty body that runs for ever."""
    trips = numpy_helper.from_array(np.array(2**62, np.int64), "M")
    go = numpy_helper.from_array(np.array(True), "go")
    carried = numpy_helper.from_array(np.ones(1, np.float32), "carried")
    loop_inputs = ["M", "go"] if scan else ["M", "go", "carried"]
    loop = helper.make_node("Loop", loop_inputs, ["looped"], body=loop_body(scan))
    return _model([loop], [_output("looped", 2 if scan else 1)], [trips, go, carried])


def outputs_at_the_tensor_cap(count: int = 3, elements: int = 2**28) -> bytes:
    """`count` outputs of exactly the per-tensor cap each (1 GiB of float32 apiece)."""
    side = int(elements**0.5)
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], [f"full{index}"]) for index in range(count)
    ]
    outputs = [_output(f"full{index}", 2) for index in range(count)]
    return _model(nodes, outputs, [_ints("shape", [side, side])])


def empty_strings(count: int = 20_000_000) -> bytes:
    """A Constant of 20M empty strings: 20 MB on the wire, gigabytes as string objects."""
    strings = TensorProto(name="strings", data_type=TensorProto.STRING, dims=[count])
    # string_data (field 6, length-delimited) written as wire bytes: 0x32 then length 0, each;
    # a million times faster than extending the repeated field from Python
    strings = TensorProto.FromString(strings.SerializeToString() + b"\x32\x00" * count)
    nodes = [helper.make_node("Constant", [], ["S"], value=strings)]
    return _model(nodes, [_output("S", 1, TensorProto.STRING)], [])


def doubling_concats(doublings: int = 8, elements: int = 2**22) -> bytes:
    """An int64 initializer concatenated with itself `doublings` times: 2^30 int64 at the end."""
    nodes = [
        helper.make_node("Concat", [f"v{step}", f"v{step}"], [f"v{step + 1}"], axis=0)
        for step in range(doublings)
    ]
    start = numpy_helper.from_array(np.zeros(elements, np.int64), "v0")
    return _model(nodes, [_output(f"v{doublings}", 1, TensorProto.INT64)], [start])


def many_large_inputs(count: int = 100, shape: tuple[int, int] = (256, 65536)) -> bytes:
    """`count` extra inputs of [256, 65536] floats: 6.7 GB if generated (there is no eval data)."""
    inputs = [
        helper.make_tensor_value_info(f"big{index}", TensorProto.FLOAT, list(shape))
        for index in range(count)
    ]
    nodes = [helper.make_node("Sum", [value.name for value in inputs], ["total"])]
    return _model(nodes, [_output("total", 2)], [], inputs)
