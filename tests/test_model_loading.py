"""Untrusted bytes: every refusal is a typed error with a message that says what is wrong."""

import numpy as np
import onnx
import pytest
from graphs import constant_node_mlp, control_flow, gemm_mlp
from onnx import TensorProto, helper

from workers.errors import InvalidModelError, UnsafeModelError
from workers.onnx_model import ModelLimits, parse_model


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
