"""Hand-built ONNX graphs in the layouts real exporters write."""

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _tensor(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def gemm_mlp(widths: list[int], trans_b: int, seed: int = 0) -> onnx.ModelProto:
    """X -> Gemm -> Relu -> ... -> Gemm, biases as Gemm's C input."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    value = "X"
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        weight_shape = (fan_out, fan_in) if trans_b else (fan_in, fan_out)
        inits += [_tensor(rng, f"W{layer}", *weight_shape), _tensor(rng, f"b{layer}", fan_out)]
        out = f"h{layer}"
        nodes.append(
            helper.make_node("Gemm", [value, f"W{layer}", f"b{layer}"], [out], transB=trans_b)
        )
        value = out
        if layer < len(widths) - 2:
            nodes.append(helper.make_node("Tanh", [value], [f"a{layer}"]))
            value = f"a{layer}"
    graph = helper.make_graph(
        nodes,
        "gemm_mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", widths[0]])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, ["N", widths[-1]])],
        inits,
    )
    return make_model(graph)


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """[N,1,8,8] -> Conv(4x1x3x3) -> Relu -> Flatten -> Gemm(144 -> 10)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["X", "conv_w", "conv_b"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["Y"]),
    ]
    inits = [
        _tensor(rng, "conv_w", 4, 1, 3, 3),
        _tensor(rng, "conv_b", 4),
        _tensor(rng, "fc_w", 144, 10),
        _tensor(rng, "fc_b", 10),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return make_model(graph)


def constant_node_mlp(seed: int = 0) -> onnx.ModelProto:
    """Weights as Constant nodes rather than initializers, as some exporters write them."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Constant", [], ["W0"], value=_tensor(rng, "W0v", 6, 8)),
        helper.make_node("Constant", [], ["W1"], value=_tensor(rng, "W1v", 8, 3)),
        helper.make_node("MatMul", ["X", "W0"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "W1"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "constant_mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])],
    )
    return make_model(graph)


def control_flow(seed: int = 0) -> onnx.ModelProto:
    """Weights inside If, Loop and Scan bodies, one of them read from the enclosing graph.

    Y_if = If(cond, then: X @ W_then (a Constant in the branch), else: X @ W_outer (outer))
    Y_loop = two rounds of v <- v @ W_loop, starting from X
    Y_scan = Scan over the rows of X: x_t @ W_scan
    """
    rng = np.random.default_rng(seed)
    x_info = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])

    def branch(name: str, nodes: list, out: str) -> onnx.GraphProto:
        return helper.make_graph(
            nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 4])]
        )

    then_branch = branch(
        "then",
        [
            helper.make_node("Constant", [], ["W_then"], value=_tensor(rng, "W_then_v", 4, 4)),
            helper.make_node("MatMul", ["X", "W_then"], ["then_out"]),
        ],
        "then_out",
    )
    else_branch = branch(
        "else", [helper.make_node("MatMul", ["X", "W_outer"], ["else_out"])], "else_out"
    )
    loop_body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Constant", [], ["W_loop"], value=_tensor(rng, "W_loop_v", 4, 4)),
            helper.make_node("MatMul", ["v_in", "W_loop"], ["v_out"]),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 4]),
        ],
    )
    scan_body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W_scan"], value=_tensor(rng, "W_scan_v", 4, 3)),
            helper.make_node("MatMul", ["x_t", "W_scan"], ["y_t"]),
        ],
        "scan_body",
        [helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [3])],
    )
    nodes = [
        helper.make_node(
            "If", ["cond"], ["Y_if"], then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("Loop", ["trips", "cond", "X"], ["Y_loop"], body=loop_body),
        helper.make_node("Scan", ["X"], ["Y_scan"], body=scan_body, num_scan_inputs=1),
    ]
    inits = [
        _tensor(rng, "W_outer", 4, 4),
        numpy_helper.from_array(np.array(True), "cond"),
        numpy_helper.from_array(np.array(2, dtype=np.int64), "trips"),
    ]
    graph = helper.make_graph(
        nodes,
        "control_flow",
        [x_info],
        [
            helper.make_tensor_value_info("Y_if", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("Y_loop", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("Y_scan", TensorProto.FLOAT, ["N", 3]),
        ],
        inits,
    )
    return make_model(graph)
