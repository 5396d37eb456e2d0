"""Untrusted bytes: every refusal is a typed error with a message that says what is wrong."""

import numpy as np
import onnx
import pytest
from graphs import constant_node_mlp, control_flow, gemm_mlp
from onnx import TensorProto, helper

from workers.errors import InvalidModelError, UnsafeModelError
from workers.graph.load import ModelLimits, parse_model


def _point_outside(tensor: TensorProto, location: str = "../../etc/passwd") -> None:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location


def test_a_valid_model_parses(mlp_classifier):
    model = parse_model(mlp_classifier.SerializeToString())
    assert len(model.graph.node) == len(mlp_classifier.graph.node)


def test_truncated_bytes(mlp_classifier):
    data = mlp_classifier.SerializeToString()
    with pytest.raises(InvalidModelError, match=r"not a readable ONNX model|checker"):
        parse_model(data[: len(data) // 2])


@pytest.mark.parametrize("data", [b"", b"hello, I am not a model", bytes(range(256)) * 4])
def test_bytes_that_are_not_onnx(data):
    with pytest.raises(InvalidModelError, match="ONNX"):
        parse_model(data)


def test_external_data_on_an_initializer_is_refused_with_its_location():
    model = gemm_mlp([4, 3, 2], trans_b=0)
    _point_outside(model.graph.initializer[0])
    with pytest.raises(UnsafeModelError, match=r"external file \('../../etc/passwd'\)"):
        parse_model(model.SerializeToString())


def test_external_data_in_a_constant_node_is_refused():
    model = constant_node_mlp()
    _point_outside(model.graph.node[0].attribute[0].t, "weights.bin")
    with pytest.raises(UnsafeModelError, match="Constant node"):
        parse_model(model.SerializeToString())


def test_external_data_inside_a_subgraph_is_refused():
    model = control_flow()
    then_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    _point_outside(then_branch.node[0].attribute[0].t)
    with pytest.raises(UnsafeModelError, match="external file"):
        parse_model(model.SerializeToString())


def test_external_data_in_a_sparse_initializer_is_refused():
    model = gemm_mlp([4, 3, 2], trans_b=0)
    values = onnx.numpy_helper.from_array(np.ones(2, np.float32), "S")
    indices = onnx.numpy_helper.from_array(np.array([0, 5], np.int64), "")
    sparse = helper.make_sparse_tensor(values, indices, [3, 4])
    _point_outside(sparse.values)
    model.graph.sparse_initializer.append(sparse)
    with pytest.raises(UnsafeModelError, match="sparse initializer"):
        parse_model(model.SerializeToString())


def test_unknown_operator_domain_is_refused():
    model = gemm_mlp([4, 3, 2], trans_b=0)
    model.graph.node[1].domain = "com.evil"
    model.opset_import.append(helper.make_opsetid("com.evil", 1))
    with pytest.raises(UnsafeModelError, match=r"unknown operator domain 'com\.evil'"):
        parse_model(model.SerializeToString())


def test_a_model_the_checker_rejects():
    model = gemm_mlp([4, 3, 2], trans_b=0)
    model.graph.node[0].input[1] = "does_not_exist"
    with pytest.raises(InvalidModelError, match="checker"):
        parse_model(model.SerializeToString())


def test_caps_on_tensor_size_declared_dims_nodes_and_depth():
    model = gemm_mlp([4, 3, 2], trans_b=0)
    data = model.SerializeToString()
    with pytest.raises(UnsafeModelError, match="elements"):
        parse_model(data, ModelLimits(max_tensor_elements=10))
    with pytest.raises(UnsafeModelError, match="nodes"):
        parse_model(data, ModelLimits(max_nodes=2))
    with pytest.raises(UnsafeModelError, match="dimension"):
        parse_model(data, ModelLimits(max_dim=3))
    with pytest.raises(UnsafeModelError, match="nested"):
        parse_model(control_flow().SerializeToString(), ModelLimits(max_subgraph_depth=0))
    with pytest.raises(UnsafeModelError, match="bytes"):
        parse_model(data, ModelLimits(max_bytes=100))


def test_a_declared_dimension_beyond_the_cap_is_refused_before_any_work():
    model = gemm_mlp([4, 3, 2], trans_b=0)
    model.graph.initializer[0].dims[0] = 10**12
    with pytest.raises(UnsafeModelError, match="dims"):
        parse_model(model.SerializeToString())


def _function_with_if(inner: onnx.NodeProto, domain: str = "local") -> onnx.ModelProto:
    """A model whose only node calls a local function whose body holds an If around `inner`."""
    branch_out = inner.output[0]
    branch = helper.make_graph(
        [inner], "b", [], [helper.make_tensor_value_info(branch_out, TensorProto.FLOAT, None)]
    )
    body = [
        helper.make_node(
            "Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])
        ),
        helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
    ]
    function = helper.make_function(domain, "F", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("F", ["X"], ["Y"], domain=domain)],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
        functions=[function],
    )
    model.ir_version = 8
    return model


def test_external_data_inside_a_function_body_subgraph_is_refused():
    constant = helper.make_node(
        "Constant", [], ["w"], value=onnx.numpy_helper.from_array(np.zeros(2, np.float32), "w")
    )
    _point_outside(constant.attribute[0].t, "w.bin")
    with pytest.raises(UnsafeModelError, match="external file"):
        parse_model(_function_with_if(constant).SerializeToString())


def test_unknown_domains_inside_function_bodies_are_refused():
    evil = helper.make_node("Other", [], ["w"], domain="local")  # the domain has only F
    with pytest.raises(UnsafeModelError, match="unknown operator domain 'local'"):
        parse_model(_function_with_if(evil).SerializeToString())


def test_a_sparse_initializer_declaring_a_huge_dense_shape_is_refused():
    model = gemm_mlp([4, 3, 2], trans_b=0)
    values = onnx.numpy_helper.from_array(np.ones(1, np.float32), "S")
    indices = onnx.numpy_helper.from_array(np.array([0], np.int64), "")
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(values, indices, [200000, 200000])
    )
    with pytest.raises(UnsafeModelError, match="dense shape"):
        parse_model(model.SerializeToString())


def test_raw_data_longer_than_the_dims_is_refused():
    model = gemm_mlp([4, 3, 2], trans_b=0)
    model.graph.initializer[0].raw_data += b"\0" * 8
    with pytest.raises(InvalidModelError, match="holds"):
        parse_model(model.SerializeToString())


def _allocating(size_nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> bytes:
    """X [N, 4] -> ConstantOfShape(size) + X -> Y, the size made by `size_nodes` into 'size'."""
    nodes = [
        *size_nodes,
        helper.make_node("ConstantOfShape", ["size"], ["filled"]),
        helper.make_node("Add", ["X", "filled"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "allocating",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_allocations_sized_by_the_inputs_or_by_foldable_constants_are_accepted():
    """Exporters size masks and position ids from the input's shape (PyTorch's
    ConstantOfShape(Shape(x))) or from constants inference folds: neither is refused."""
    from_the_input = _allocating([helper.make_node("Shape", ["X"], ["size"])], [])
    parse_model(from_the_input)
    folded = _allocating(
        [helper.make_node("Concat", ["rows", "columns"], ["size"], axis=0)],
        [
            onnx.numpy_helper.from_array(np.array([1], np.int64), "rows"),
            onnx.numpy_helper.from_array(np.array([4], np.int64), "columns"),
        ],
    )
    parse_model(folded)


def test_an_allocation_sized_by_constants_inference_cannot_fold_is_refused_naming_both():
    unfolded = _allocating(
        [helper.make_node("ReduceMax", ["sizes"], ["size"], axes=[0], keepdims=0, name="biggest")],
        [onnx.numpy_helper.from_array(np.array([[1, 4], [2, 4]], np.int64), "sizes")],
    )
    with pytest.raises(UnsafeModelError, match="by ReduceMax node 'biggest', which shape inf"):
        parse_model(unfolded)


def test_strings_are_counted_against_their_own_cap():
    model = constant_node_mlp()
    labels = helper.make_tensor("labels", TensorProto.STRING, [3], [b"a", b"b", b"c"])
    model.graph.node.append(helper.make_node("Constant", [], ["names"], value=labels))
    model.graph.output.append(helper.make_tensor_value_info("names", TensorProto.STRING, [3]))
    data = model.SerializeToString()
    parse_model(data, ModelLimits(max_strings=3))
    with pytest.raises(UnsafeModelError, match=r"the model holds 3 strings .* the limit is 2"):
        parse_model(data, ModelLimits(max_strings=2))
