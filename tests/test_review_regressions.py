"""Defects a review found, each pinned by the case that showed it."""

import numpy as np
import onnx
import pytest
from graphs import gemm_mlp, make_model
from helpers import run, weights
from onnx import TensorProto, helper, numpy_helper

from schemas import PruneParams, TrainParams
from workers.compress.prune import prune_model
from workers.errors import InvalidDataError, UnsupportedModelError
from workers.evaluate.data import Table
from workers.graph.encoding import encode
from workers.jobs.train import train_model


def _as_input(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, list(tensor.dims))
    )
    return model


def test_structured_pruning_never_slices_an_initializer_that_is_also_an_input():
    model = _as_input(gemm_mlp([6, 8, 4, 3], trans_b=0), "W2")
    outcome = prune_model(model, PruneParams(granularity="structured", sparsity=0.5))
    data, _ = encode(outcome.model, "dense", outcome.pruned)
    shapes = {layer.name: layer.shape for layer in outcome.layers}
    assert shapes == {"W0": [6, 4], "W1": [4, 4], "W2": [4, 3]}  # W2 overridable: uncut
    run(data, {"X": np.ones((2, 6), np.float32)})
    with pytest.raises(UnsupportedModelError, match="graph input"):
        both = _as_input(gemm_mlp([6, 8, 4, 3], trans_b=0), "W1")
        prune_model(both, PruneParams(granularity="structured", sparsity=0.5))


def test_prelu_is_not_taken_for_a_one_input_activation():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["X", "W0"], ["h"]),
        helper.make_node("PRelu", ["h", "slope"], ["a"]),
        helper.make_node("MatMul", ["a", "W1"], ["Y"]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "W0"),
        numpy_helper.from_array(np.full(6, 0.1, np.float32), "slope"),
        numpy_helper.from_array(rng.standard_normal((6, 2)).astype(np.float32), "W1"),
    ]
    graph = helper.make_graph(
        nodes,
        "prelu",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    with pytest.raises(UnsupportedModelError, match="PRelu"):
        prune_model(make_model(graph), PruneParams(granularity="structured", sparsity=0.5))


def test_same_named_constants_in_sibling_branches_are_pruned_each():
    rng = np.random.default_rng(0)

    def branch(name: str) -> onnx.GraphProto:
        value = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "v")
        return helper.make_graph(
            [
                helper.make_node("Constant", [], ["W"], value=value),
                helper.make_node("MatMul", ["X", "W"], [f"{name}_out"]),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["N", 4])],
        )

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["Y"], then_branch=branch("a"), else_branch=branch("b"))],
        "siblings",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array(True), "c")],
    )
    outcome = prune_model(make_model(graph), PruneParams(sparsity=0.5))
    assert [layer.nonzero for layer in outcome.layers] == [8, 8]


def test_fractional_class_labels_are_refused_not_truncated():
    features = np.random.default_rng(0).standard_normal((40, 3))
    labels = np.where(features[:, 0] > 0, 0.7, 0.2)
    with pytest.raises(InvalidDataError, match=r"class labels must be integers or names; got 0\.2"):
        train_model(Table({"": features}, labels, []), TrainParams(task="classification"))


def test_size_params_count_sparse_initializers_of_the_original(mlp_classifier):
    outcome = prune_model(mlp_classifier, PruneParams(sparsity=0.9))
    sparse_bytes, _ = encode(outcome.model, "sparse", outcome.pruned)
    sparse_model = onnx.load_model_from_string(sparse_bytes)
    assert sparse_model.graph.sparse_initializer
    again = prune_model(sparse_model, PruneParams(sparsity=0.95))
    assert again.params_before == outcome.params_before
    assert sum(layer.params for layer in again.layers) == sum(
        w.size for w in weights(mlp_classifier).values()
    )


def test_int8_refuses_weights_that_are_not_float32():
    model = gemm_mlp([4, 8, 2], trans_b=0)
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor).astype(np.float64)
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    outcome = prune_model(model, PruneParams(sparsity=0.5))
    with pytest.raises(
        UnsupportedModelError, match="int8 quantizes float32 weights; weight 'W0' is double"
    ):
        encode(outcome.model, "int8", outcome.pruned)


def test_a_loop_state_named_like_an_outer_initializer_hides_it():
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["S", "S"], ["S_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("S", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("S_out", TensorProto.FLOAT, [2]),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["n", "c", "X"], ["L"], body=body),
            helper.make_node("MatMul", ["L", "W"], ["Y"]),
        ],
        "shadow",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])],
        [
            numpy_helper.from_array(np.array(2, np.int64), "n"),
            numpy_helper.from_array(np.array(True), "c"),
            numpy_helper.from_array(np.ones((2, 2), np.float32), "W"),
            numpy_helper.from_array(np.ones(2, np.float32), "S"),
        ],
    )
    assert set(weights(make_model(graph))) == {"W"}
