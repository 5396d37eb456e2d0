"""The encodings on weights wherever exporters put them: initializers, Constant nodes in the main
graph, Constant nodes inside If/Loop/Scan bodies; int8 over MatMul, Gemm and Conv; notes and
refusals a person can read."""

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from graphs import constant_node_mlp, gemm_mlp, make_model
from helpers import run
from onnx import TensorProto, helper, numpy_helper

from schemas import PruneParams
from workers.compress.prune import copy_model, prune_model
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


def test_shape_constants_and_constants_that_are_outputs_stay_constants_for_sparse():
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
