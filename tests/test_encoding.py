"""The encodings on weights wherever exporters put them: initializers, Constant nodes in the main
graph, Constant nodes inside If/Loop/Scan bodies; int8 over MatMul, Gemm and Conv; notes and
refusals a person can read."""

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from graphs import constant_node_mlp, control_flow, conv_net, gemm_mlp, make_model
from helpers import run
from onnx import TensorProto, helper, numpy_helper

from schemas import PruneParams
from workers.compress.prune import copy_model, prune_model
from workers.errors import UnsupportedModelError
from workers.graph.encoding import encode, hoisted_copy
from workers.graph.load import parse_model, serialize
from workers.graph.walk import iter_graphs

NOTE_LIMIT = 300
WIDTH = 64  # wide enough that weight bytes, not names and structure, decide the file size


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(array, f"{name}_value")
    )


def _normal(rng: np.random.Generator, *shape: int, dtype: type = np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype)


def _info(name: str, dims: list, elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, dims)


def _constants_as_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer turned into a Constant node, as PaddlePaddle writes."""
    graph = model.graph
    constants = [
        _constant(tensor.name, numpy_helper.to_array(tensor)) for tensor in graph.initializer
    ]
    nodes = [*constants, *graph.node]
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def branchy(
    seed: int = 0, body_extra: Callable[[], list[onnx.NodeProto]] | None = None
) -> onnx.ModelProto:
    """X -> MatMul(W_main, a main-graph Constant) -> If(cond): each branch its own Constant
    weight, as PyTorch writes inlined branches. `body_extra` adds nodes to the then branch
    whose output `extra` is added to the branch result."""
    rng = np.random.default_rng(seed)

    def branch(name: str) -> onnx.GraphProto:
        nodes = [
            _constant(f"W_{name}", _normal(rng, WIDTH, WIDTH)),
            helper.make_node("MatMul", ["h", f"W_{name}"], [f"{name}_mm"]),
        ]
        out = f"{name}_mm"
        if body_extra is not None and name == "then":
            nodes += body_extra()
            nodes.append(helper.make_node("Add", [out, "extra"], [f"{name}_out"]))
            out = f"{name}_out"
        return helper.make_graph(nodes, name, [], [_info(out, ["N", WIDTH])])

    nodes = [
        _constant("W_main", _normal(rng, WIDTH, WIDTH)),
        helper.make_node("MatMul", ["X", "W_main"], ["h"]),
        helper.make_node(
            "If", ["cond"], ["Y"], then_branch=branch("then"), else_branch=branch("else")
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "branchy",
        [_info("X", ["N", WIDTH]), _info("cond", [], TensorProto.BOOL)],
        [_info("Y", ["N", WIDTH])],
    )
    return make_model(graph)


def float16_table(rng: np.random.Generator, table: str) -> Callable[[], list[onnx.NodeProto]]:
    """Nodes reading one row of a float16 embedding table (mixed precision), cast to float:
    onnxruntime's quantizer turns such a Gather into a model onnxruntime cannot load."""

    def nodes() -> list[onnx.NodeProto]:
        return [
            _constant(table, _normal(rng, 8, WIDTH, dtype=np.float16)),
            _constant(f"{table}_row", np.zeros((1,), np.int64)),
            helper.make_node("Gather", [table, f"{table}_row"], [f"{table}_16"]),
            helper.make_node("Cast", [f"{table}_16"], ["extra"], to=TensorProto.FLOAT),
        ]

    return nodes


def conv_constants(seed: int = 0) -> onnx.ModelProto:
    """[N,16,12,12] -> Conv(32x16x3x3, bias) -> Relu -> Conv(32x32x3x3), Constant weights."""
    rng = np.random.default_rng(seed)
    nodes = [
        _constant("conv0_w", _normal(rng, 32, 16, 3, 3)),
        _constant("conv0_b", _normal(rng, 32)),
        _constant("conv1_w", _normal(rng, 32, 32, 3, 3)),
        helper.make_node("Conv", ["X", "conv0_w", "conv0_b"], ["c0"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "conv1_w"], ["Y"], kernel_shape=[3, 3]),
    ]
    graph = helper.make_graph(
        nodes, "conv_constants", [_info("X", ["N", 16, 12, 12])], [_info("Y", ["N", 32, 8, 8])]
    )
    return make_model(graph)


def encoded(
    model: onnx.ModelProto, encoding: str, sparsity: float = 0.5
) -> tuple[bytes, bytes, list[str]]:
    """(dense bytes, `encoding` bytes, notes) of the model pruned to `sparsity`; the encoded
    file must parse like any upload."""
    outcome = prune_model(copy_model(model), PruneParams(sparsity=sparsity))
    dense, _ = encode(outcome.model, "dense", outcome.pruned)
    data, notes = encode(outcome.model, encoding, outcome.pruned)
    parse_model(data)
    assert all(len(note) <= NOTE_LIMIT and "\n" not in note for note in notes), notes
    return dense, data, notes


def feeds(model: onnx.ModelProto, rows: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type == TensorProto.BOOL:
            out[value.name] = np.array(True)
            continue
        dims = [dim.dim_value or rows for dim in tensor_type.shape.dim]
        out[value.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def assert_close(reference: bytes, data: bytes, inputs: dict[str, np.ndarray]) -> None:
    """Every output within int8 rounding of the reference: per-row cosine and a bound on the
    largest error relative to the output's scale."""
    for a, b in zip(run(reference, inputs), run(data, inputs), strict=True):
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.min() > 0.99
        assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def graph_ops(data: bytes) -> list[str]:
    model = onnx.load_model_from_string(data)
    return [node.op_type for graph, _ in iter_graphs(model.graph) for node in graph.node]


# --- hoisting ---------------------------------------------------------------------------------


def test_dense_writes_the_model_exactly_as_it_is():
    model = constant_node_mlp()
    assert encode(model, "dense", {"W0", "W1"}) == (serialize(model), [])


def test_hoisting_moves_weight_constants_into_the_graph_that_holds_them():
    model = branchy()
    hoisted = hoisted_copy(model, {"W_main", "W_then", "W_else"})
    onnx.checker.check_model(hoisted, full_check=True)
    assert (hoisted.ir_version, hoisted.opset_import) == (model.ir_version, model.opset_import)
    holders = {
        graph.name: sorted(tensor.name for tensor in graph.initializer)
        for graph, _ in iter_graphs(hoisted.graph)
    }
    assert holders == {"branchy": ["W_main"], "then": ["W_then"], "else": ["W_else"]}
    assert "Constant" not in graph_ops(hoisted.SerializeToString())
    inputs = feeds(model)
    for cond in (True, False):
        inputs["cond"] = np.array(cond)
        for a, b in zip(run(model, inputs), run(hoisted, inputs), strict=True):
            assert np.array_equal(a, b)


def test_shape_constants_and_constants_that_are_outputs_stay_constants():
    rng = np.random.default_rng(0)
    nodes = [
        _constant("W", _normal(rng, 4, 6)),
        _constant("shape", np.array([-1, 3, 2], np.int64)),
        _constant("scale", np.array(2.0, np.float32)),
        helper.make_node("MatMul", ["X", "W"], ["h"]),
        helper.make_node("Mul", ["h", "scale"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [_info("X", ["N", 4])], [_info("Y", ["N", 3, 2]), _info("W", [4, 6])]
    )
    model = make_model(graph)
    _, sparse, notes = encoded(model, "sparse", sparsity=0.9)
    assert constant_outputs(sparse) == ["W", "scale", "shape"]
    assert notes == ["sparse: kept dense, in Constant nodes that are also graph outputs: W"]
    _, int8, notes = encoded(model, "int8", sparsity=0.9)
    assert "W" in constant_outputs(int8) and len(constant_outputs(int8)) == 3
    assert notes[1:] == ["int8: left float32, in Constant nodes that are also graph outputs: W"]


def constant_outputs(data: bytes) -> list[str]:
    graph = onnx.load_model_from_string(data).graph
    return sorted(node.output[0] for node in graph.node if node.op_type == "Constant")


# --- sparse -----------------------------------------------------------------------------------


def paddle_gemm_mlp() -> onnx.ModelProto:
    """A Gemm MLP (transB=1, as PyTorch's Linear) with every weight and bias a Constant."""
    return _constants_as_nodes(gemm_mlp([64, 128, 10], trans_b=1))


@pytest.mark.parametrize("build", [paddle_gemm_mlp, branchy, conv_constants])
def test_sparse_shrinks_pruned_constant_weights_and_computes_the_same(build):
    model = build()
    dense, sparse, notes = encoded(model, "sparse", sparsity=0.9)
    assert len(sparse) < 0.5 * len(dense)
    stored = {
        sparse_tensor.values.name
        for graph, _ in iter_graphs(onnx.load_model_from_string(sparse).graph)
        for sparse_tensor in graph.sparse_initializer
    }
    assert stored and not notes
    inputs = feeds(model)
    for a, b in zip(run(dense, inputs), run(sparse, inputs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_sparse_stores_the_constant_weights_of_a_small_mlp():
    _, sparse, _ = encoded(constant_node_mlp(), "sparse", sparsity=0.9)
    stored = onnx.load_model_from_string(sparse).graph.sparse_initializer
    assert sorted(tensor.values.name for tensor in stored) == ["W0", "W1"]


def test_sparse_weights_inside_if_branches_stay_in_their_branch():
    _, sparse, _ = encoded(branchy(), "sparse", sparsity=0.9)
    holders = {
        graph.name: [tensor.values.name for tensor in graph.sparse_initializer]
        for graph, _ in iter_graphs(onnx.load_model_from_string(sparse).graph)
    }
    assert holders == {"branchy": ["W_main"], "then": ["W_then"], "else": ["W_else"]}


def test_a_long_list_of_weights_kept_dense_is_cut_with_a_count():
    rng = np.random.default_rng(0)
    nodes, value = [], "X"
    for layer in range(40):
        name = f"encoder.layers.{layer}.feed_forward.intermediate_dense.weight"
        nodes += [
            _constant(name, _normal(rng, 8, 8)),
            helper.make_node("MatMul", [value, name], [f"h{layer}"]),
        ]
        value = f"h{layer}"
    graph = helper.make_graph(nodes, "deep", [_info("X", ["N", 8])], [_info(value, ["N", 8])])
    _, _, notes = encoded(make_model(graph), "sparse", sparsity=0.3)
    (note,) = notes
    assert note.startswith("sparse: kept dense where COO storage would be larger")
    assert note.endswith(" more") and " … and " in note
    shown = note.count("encoder.layers.")
    assert int(note.rsplit(" … and ", 1)[1].split()[0]) == 40 - shown


# --- int8 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(constant_node_mlp, id="matmul-constants"),
        pytest.param(branchy, id="if-branch-constants"),
        pytest.param(conv_constants, id="conv-constants"),
        pytest.param(paddle_gemm_mlp, id="gemm-transB-constants"),
        pytest.param(lambda: gemm_mlp([64, 128, 10], 0), id="gemm-initializers"),
        pytest.param(control_flow, id="if-loop-scan-bodies"),
    ],
)
def test_int8_quantizes_weights_wherever_they_sit(build):
    model = build()
    dense, int8, notes = encoded(model, "int8")
    ops = graph_ops(int8)
    assert not {"MatMul", "Gemm", "Conv"} & set(ops), ops
    assert notes[1:] == []  # every prunable weight was quantized
    inputs = feeds(model)
    assert_close(dense, int8, inputs)


@pytest.mark.parametrize("build", [branchy, conv_constants, paddle_gemm_mlp])
def test_int8_files_of_constant_weights_are_several_times_smaller(build):
    dense, int8, _ = encoded(build(), "int8")
    assert len(int8) < len(dense) / 3


def test_int8_gemm_with_transposed_constant_weight_matches_the_dense_model():
    model = paddle_gemm_mlp()
    dense, int8, _ = encoded(model, "int8")
    assert graph_ops(int8).count("MatMulInteger") == 2
    assert_close(dense, int8, feeds(model, rows=64))


def test_int8_names_weights_it_leaves_float_with_the_reason():
    rng = np.random.default_rng(0)
    nodes = [
        _constant("W_scaled", _normal(rng, WIDTH, WIDTH)),
        _constant("to_image", np.array([-1, 4, 4, 4], np.int64)),
        _constant("W_up", _normal(rng, 4, 2, 3, 3)),
        helper.make_node("Gemm", ["X", "W_scaled"], ["g"], alpha=0.5),
        helper.make_node("Reshape", ["g", "to_image"], ["img"]),
        helper.make_node("ConvTranspose", ["img", "W_up"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "left", [_info("X", ["N", WIDTH])], [_info("Y", ["N", 2, 6, 6])]
    )
    model = make_model(graph)
    dense, int8, notes = encoded(model, "int8")
    assert notes[1:] == [
        "int8: left float32, Gemm with alpha or beta other than 1 or transA=1 (the quantizer "
        "rewrites only plain Gemm to MatMul): W_scaled",
        "int8: left float32, ConvTranspose weights (no integer ConvTranspose kernel): W_up",
    ]
    np.testing.assert_allclose(
        run(dense, feeds(model))[0], run(int8, feeds(model))[0], rtol=1e-5, atol=1e-5
    )


def test_int8_names_weights_in_if_bodies_it_could_not_quantize():
    """The quantizer fails inside the then branch (a float16 table there): the main graph is
    quantized, the branches stay float32, and the notes name their weights."""
    rng = np.random.default_rng(3)
    model = branchy(body_extra=float16_table(rng, "table"))
    dense, int8, notes = encoded(model, "int8")
    (note,) = notes[1:]
    assert note.startswith("int8: left float32 inside If/Loop/Scan bodies (the quantizer failed")
    assert note.endswith("): W_else, W_then")
    main_ops = [node.op_type for node in onnx.load_model_from_string(int8).graph.node]
    assert "MatMulInteger" in main_ops and "MatMul" not in main_ops
    inputs = feeds(model)
    for cond in (True, False):
        inputs["cond"] = np.array(cond)
        assert_close(dense, int8, inputs)


def test_int8_refuses_a_model_its_quantizer_breaks_in_one_line():
    rng = np.random.default_rng(0)
    nodes = [
        *float16_table(rng, "table")(),
        _constant("W", _normal(rng, WIDTH, WIDTH)),
        helper.make_node("Add", ["X", "extra"], ["x1"]),
        helper.make_node("MatMul", ["x1", "W"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "mixed", [_info("X", ["N", WIDTH])], [_info("Y", ["N", WIDTH])]
    )
    outcome = prune_model(make_model(graph), PruneParams(sparsity=0.5))
    with pytest.raises(UnsupportedModelError) as refused:
        encode(outcome.model, "int8", outcome.pruned)
    message = str(refused.value)
    assert message.startswith("encoding int8: onnxruntime cannot load the model its quantizer")
    assert message.endswith("; use encoding dense or sparse")
    assert "float16" in message and len(message) <= NOTE_LIMIT and "\n" not in message


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_int8_refuses_weights_that_are_not_float32_in_one_line(dtype):
    rng = np.random.default_rng(0)
    name = "w" * 400  # a name longer than a message may be
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [
            _constant(name, _normal(rng, 4, 4, dtype=dtype)),
            helper.make_node("MatMul", ["X", name], ["Y"]),
        ],
        "narrow",
        [_info("X", ["N", 4], elem)],
        [_info("Y", ["N", 4], elem)],
    )
    outcome = prune_model(make_model(graph), PruneParams(sparsity=0.5))
    with pytest.raises(
        UnsupportedModelError, match="encoding int8 quantizes float32 weights"
    ) as refused:
        encode(outcome.model, "int8", outcome.pruned)
    message = str(refused.value)
    assert len(message) <= NOTE_LIMIT and message.endswith("use encoding dense or sparse")


def test_int8_keeps_the_interface_of_a_conv_net_with_initializers():
    model = conv_net()
    _, int8, notes = encoded(model, "int8")
    compacted = onnx.load_model_from_string(int8)
    assert [value.name for value in compacted.graph.input] == ["X"]
    assert [value.name for value in compacted.graph.output] == ["Y"]
    assert notes[1:] == []
    assert "ConvInteger" in graph_ops(int8)


def test_int8_leaves_a_conv_in_a_body_with_an_outer_weight_and_a_bias_float():
    """The quantizer raises on such a Conv ("Expected ... to be an initializer"): it is left
    float and named, the bias-free Conv on the same weight in the other branch is quantized."""
    rng = np.random.default_rng(0)
    out = _info("Y", ["N", 32, 6, 6])
    then_branch = helper.make_graph(
        [helper.make_node("Conv", ["X", "conv_w", "conv_b"], ["Y_then"])], "then", [], [out]
    )
    then_branch.output[0].name = "Y_then"
    else_branch = helper.make_graph(
        [helper.make_node("Conv", ["X", "conv_w"], ["Y_else"])], "else", [], [out]
    )
    else_branch.output[0].name = "Y_else"
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["Y"], then_branch=then_branch, else_branch=else_branch)],
        "outer_conv",
        [_info("X", ["N", 16, 8, 8]), _info("cond", [], TensorProto.BOOL)],
        [out],
        [
            numpy_helper.from_array(_normal(rng, 32, 16, 3, 3), "conv_w"),
            numpy_helper.from_array(_normal(rng, 32), "conv_b"),
        ],
    )
    model = make_model(graph)
    dense, int8, notes = encoded(model, "int8")
    assert notes[1:] == [
        "int8: left float32, Conv in an If/Loop/Scan body with a bias and its weight in an "
        "enclosing graph (the quantizer cannot): conv_w"
    ]
    assert graph_ops(int8).count("ConvInteger") == 1
    inputs = feeds(model)
    for cond in (True, False):
        inputs["cond"] = np.array(cond)
        assert_close(dense, int8, inputs)


def test_int8_names_a_gemm_weight_left_float_as_the_model_names_it():
    """Rewriting Gemm (transB=1) to MatMul, the quantizer stores the weight transposed as
    "W_gemm_Transposed"; when the body is then left float the note still says W_gemm."""
    rng = np.random.default_rng(1)
    then_nodes = [
        *float16_table(rng, "table")(),
        _constant("W_gemm", _normal(rng, WIDTH, WIDTH)),
        helper.make_node("Gemm", ["X", "W_gemm", "extra"], ["Y_then"], transB=1),
    ]
    then_branch = helper.make_graph(then_nodes, "then", [], [_info("Y_then", ["N", WIDTH])])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y_else"])],
        "else",
        [],
        [_info("Y_else", ["N", WIDTH])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["Y"], then_branch=then_branch, else_branch=else_branch)],
        "gemm_in_body",
        [_info("X", ["N", WIDTH]), _info("cond", [], TensorProto.BOOL)],
        [_info("Y", ["N", WIDTH])],
    )
    model = make_model(graph)
    dense, int8, notes = encoded(model, "int8")
    (note,) = notes[1:]
    assert note.startswith("int8: left float32 inside If/Loop/Scan bodies") and note.endswith(
        ": W_gemm"
    )
    inputs = feeds(model)
    np.testing.assert_allclose(run(dense, inputs)[0], run(int8, inputs)[0], rtol=1e-5, atol=1e-5)
