"""The dense encoding writes a model one initializer at a time (workers/graph/encoding.py,
`streamed`): its bytes are exactly protobuf's own serialization, on built models, on what
pruning leaves, on fields protobuf does not know, and on third-party files as shipped."""

import numpy as np
import pytest
from graphs import constant_node_mlp, control_flow, conv_net, gemm_mlp
from onnx import ModelProto, TensorProto, numpy_helper
from third_party import MODELS, model_bytes

from schemas import PruneParams
from workers.compress.prune import prune_model
from workers.graph.encoding import encode, listed_fields, streamed
from workers.graph.load import parse_model, serialize

BUILT = {
    "gemm_mlp": lambda: gemm_mlp([16, 32, 8], trans_b=1),
    "conv_net": conv_net,
    "constant_node_mlp": constant_node_mlp,
    "control_flow": control_flow,
}
UNKNOWN_FIELD = bytes([0xB8, 0x3E, 0x07])  # field 999, varint 7: in no ONNX message


@pytest.mark.parametrize("name", sorted(BUILT))
def test_a_built_model_is_written_as_protobuf_serializes_it(name):
    model = BUILT[name]()
    assert streamed(model) == serialize(model)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_a_third_party_model_is_written_byte_for_byte_as_protobuf_would(key):
    model = parse_model(model_bytes(key))
    assert streamed(model) == serialize(model)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_pruned_model_encodes_dense_exactly_as_serialized(scope):
    model = gemm_mlp([64, 128, 32, 10], trans_b=0)
    outcome = prune_model(model, PruneParams(sparsity=0.8, scope=scope))
    data, notes = encode(outcome.model, "dense", outcome.pruned)
    assert data == serialize(outcome.model) and notes == []
    assert ModelProto.FromString(data).graph.initializer[0].raw_data.count(0) > 0


def test_fields_protobuf_does_not_know_are_kept_where_they_were():
    model = gemm_mlp([8, 4], trans_b=1)
    # an initializer, the graph and the model each carrying a field of a newer ONNX
    tensor = TensorProto.FromString(model.graph.initializer[0].SerializeToString() + UNKNOWN_FIELD)
    model.graph.initializer[0].CopyFrom(tensor)
    with_unknown = ModelProto.FromString(serialize(model) + UNKNOWN_FIELD)
    assert streamed(model) == serialize(model)
    assert streamed(with_unknown) == serialize(with_unknown)
    assert serialize(with_unknown).endswith(UNKNOWN_FIELD)


def test_tensors_stored_in_typed_fields_and_empty_ones_are_written_as_they_are():
    model = gemm_mlp([8, 4], trans_b=1)
    typed = TensorProto(name="typed", data_type=TensorProto.FLOAT, dims=[3])
    typed.float_data.extend([1.0, 0.0, -2.5])
    empty = numpy_helper.from_array(np.zeros((0, 4), np.float32), "empty")
    model.graph.initializer.extend([typed, empty])
    assert streamed(model) == serialize(model)


def test_a_tensors_fields_are_listed_without_copying_its_data_and_as_protobuf_lists_them():
    """raw_data's length comes from the dims and type (ListFields would copy the data, 64 MB
    for a large weight); every other field, its order included, is ListFields'."""
    tensor = numpy_helper.from_array(np.ones((3, 5), np.float16), "weight")
    tensor.doc_string = "kept"
    tensor.external_data.add(key="k", value="v")
    listed = [(field.name, value) for field, value in listed_fields(tensor)]
    expected = tensor.ListFields()
    assert [(f.name, len(v) if f.name == "raw_data" else v) for f, v in expected] == listed


def test_data_that_does_not_match_its_dims_fails_rather_than_writing_a_corrupt_file():
    model = gemm_mlp([8, 4], trans_b=1)
    model.graph.initializer[0].raw_data += b"\0\0\0\0"  # one float more than its dims say
    with pytest.raises(ValueError, match="read back as"):
        streamed(model)
