"""Held models (workers/graph/held.py): a model parsed without its large weights' data, pruned
where the weights lie in a copy of the file. The file written is the one the model parsed whole
gives, byte for byte, on built and third-party models; what cannot be held so is parsed whole;
a held model is checked as parse_model checks it."""

import numpy as np
import onnx
import pytest
from graphs import constant_node_mlp, control_flow, conv_net, gemm_mlp
from onnx import TensorProto, numpy_helper
from third_party import MODELS, model_bytes

from schemas import PruneParams
from workers.compress.prune import float_params, parse_for_pruning, prune_model
from workers.errors import InvalidModelError
from workers.graph.encoding import encode
from workers.graph.held import HELD_MIN_BYTES, HELD_TYPES, hold
from workers.graph.load import parse_model, serialize
from workers.graph.weights import find_weights
from workers.graph.wire import INITIALIZER_FIELD, NODE_FIELD, strip_weight_data, tensor_at

SETTINGS = {
    "layer": {"sparsity": 0.5},
    "global": {"sparsity": 0.9, "scope": "global"},
    "threshold": {"threshold": 0.05},
}
BUILT = {
    "gemm_mlp": lambda: gemm_mlp([256, 128, 10], trans_b=1),  # W0 is 128 KB: stripped
    "conv_net": conv_net,
    "constant_node_mlp": constant_node_mlp,
    "control_flow": control_flow,
}
# Every weight a plain initializer or Constant value of the main graph (PaddlePaddle writes
# Constants): these must be held, or the tests below would compare the whole path with itself.
HELD = {
    "gemm_mlp",
    "conv_net",
    "constant_node_mlp",
    "minilm",
    "magika",
    "layout_detector",
    "ppocr_rec",
    "yolov8n",
}


def whole_path(data: bytes, params: PruneParams) -> tuple[bytes, list, int]:
    outcome = prune_model(parse_model(data), params)
    encoded, _ = encode(outcome.model, "dense", outcome.pruned)
    return encoded, outcome.layers, float_params(outcome.model)[1]


def chosen_path(data: bytes, params: PruneParams) -> tuple[bytes | None, list, int]:
    """What the prune job does: held where it can be. None for the bytes when not held."""
    model, held = parse_for_pruning(data, params)
    outcome = prune_model(model, params, held=held)
    nonzero = float_params(outcome.model, outcome.held)[1]
    if held is None:
        return None, outcome.layers, nonzero
    return bytes(held.buffer), outcome.layers, nonzero


def cases() -> list[tuple[str, str]]:
    return [(name, setting) for name in [*BUILT, *MODELS] for setting in SETTINGS]


def model_data(name: str) -> bytes:
    return serialize(BUILT[name]()) if name in BUILT else model_bytes(name)


@pytest.mark.parametrize(("name", "setting"), cases())
def test_a_held_model_prunes_to_the_bytes_the_whole_model_gives(name, setting):
    data = model_data(name)
    params = PruneParams.model_validate(SETTINGS[setting])
    expected, layers, nonzero = whole_path(data, params)
    held_bytes, held_layers, held_nonzero = chosen_path(data, params)
    assert (held_bytes is not None) == (name in HELD)
    if held_bytes is not None:
        assert held_bytes == expected
        assert held_bytes != data  # something was pruned
    assert held_layers == layers and held_nonzero == nonzero


def test_the_skeleton_leaves_out_exactly_the_large_weights_data():
    data = serialize(gemm_mlp([256, 128, 10], trans_b=1))
    stripped = strip_weight_data(data, HELD_MIN_BYTES, HELD_TYPES, 20_000)
    assert stripped is not None
    skeleton = onnx.load_model_from_string(stripped.skeleton)
    names = [tensor.name for tensor in skeleton.graph.initializer]
    assert stripped.stripped == {(INITIALIZER_FIELD, names.index("W0"))}
    model = parse_model(data)
    for index, tensor in enumerate(model.graph.initializer):
        start, length = stripped.spans[INITIALIZER_FIELD, index]
        assert data[start : start + length] == tensor.raw_data
        assert skeleton.graph.initializer[index].HasField("raw_data") == (names[index] != "W0")


def test_a_large_constant_nodes_value_is_left_out_as_well():
    data = serialize(constant_node_mlp())
    model = parse_model(data)
    large = {
        (NODE_FIELD, node, attribute)
        for node, found in enumerate(model.graph.node)
        for attribute, attr in enumerate(found.attribute)
        if found.op_type == "Constant" and len(attr.t.raw_data) >= 64
    }
    assert large
    stripped = strip_weight_data(data, 64, HELD_TYPES, 20_000)
    assert stripped is not None and stripped.stripped == large
    skeleton = onnx.load_model_from_string(stripped.skeleton)
    for path in large:
        start, length = stripped.spans[path]
        assert data[start : start + length] == tensor_at(model.graph, path).raw_data
        assert not tensor_at(skeleton.graph, path).HasField("raw_data")


def test_a_file_protobuf_would_write_otherwise_is_parsed_whole():
    model = gemm_mlp([256, 128, 10], trans_b=1)
    data = serialize(model)
    # W0 with its name written after its data: protobuf reads it, and writes the name first,
    # so holding it would return other bytes than pruning the model whole gives
    first = model.graph.initializer[0]
    head = serialize(TensorProto(dims=first.dims, data_type=first.data_type))
    name = serialize(TensorProto(name=first.name))
    raw = serialize(TensorProto(raw_data=first.raw_data))
    assert serialize(first) == head + name + raw and data.count(head + name + raw) == 1
    odd = data.replace(head + name + raw, head + raw + name)
    assert parse_model(odd) == parse_model(data)  # the same model, written another way
    params = PruneParams(sparsity=0.5)
    assert parse_for_pruning(odd, params)[1] is None
    assert chosen_path(odd, params)[1:] == whole_path(odd, params)[1:]


@pytest.mark.parametrize(
    "params",
    [
        {"sparsity": 0.5, "granularity": "structured"},
        {"sparsity": 0.5, "encoding": "sparse"},
        {"max_accuracy_drop": 0.01, "encoding": "dense"},
        {"sparsity": 0.5, "sensitivity": True},
    ],
)
def test_pruning_that_changes_the_layout_or_prunes_again_parses_the_model_whole(params):
    data = serialize(gemm_mlp([256, 128, 10], trans_b=1))
    model, held = parse_for_pruning(data, PruneParams.model_validate(params))
    assert held is None and model == parse_model(data)


def test_a_weight_whose_data_is_longer_than_its_shape_is_refused_as_when_parsed_whole():
    model = gemm_mlp([256, 128, 10], trans_b=1)
    weight = model.graph.initializer[0]
    weight.raw_data = weight.raw_data + b"\0" * 4  # the checker lets a longer one pass
    data = serialize(model)
    with pytest.raises(InvalidModelError) as whole:
        parse_model(data)
    with pytest.raises(InvalidModelError) as held:
        hold(data)
    assert "holds 131076 bytes of data" in str(held.value)
    assert str(held.value) == str(whole.value)


def test_a_held_weight_is_pruned_where_it_lies_in_the_file_copy():
    model = gemm_mlp([256, 128, 10], trans_b=1)
    data = serialize(model)
    held = hold(data)
    assert held is not None
    assert held.buffer is data  # no copy before pruning is sure to hold the model
    held.own()
    assert isinstance(held.buffer, bytearray)
    weight = held.values(held.skeleton.graph.initializer[0])
    assert weight is not None
    np.testing.assert_array_equal(weight, numpy_helper.to_array(model.graph.initializer[0]))
    outcome = prune_model(held.skeleton, PruneParams(sparsity=0.5), held=held)
    assert outcome.held is held
    assert np.count_nonzero(weight) == weight.size // 2  # in the buffer the view looks at
    assert not held.skeleton.graph.initializer[0].HasField("raw_data")  # not in protobuf
    slot = find_weights(held.skeleton)[0]
    assert held.attach([slot])
    with pytest.raises(ValueError, match="read-only"):
        slot.read()[0, 0] = 1.0


def test_a_constant_value_without_a_name_is_parsed_whole():
    # pruning's write-back names every tensor it writes (an empty name is written too), so a
    # nameless Constant value cannot be pruned where it lies to the same bytes
    model = constant_node_mlp()
    for node in model.graph.node:
        for attribute in node.attribute:
            attribute.t.ClearField("name")
    data = serialize(model)
    params = PruneParams(sparsity=0.5)
    assert parse_for_pruning(data, params)[1] is None
    assert chosen_path(data, params)[1:] == whole_path(data, params)[1:]
    named = serialize(constant_node_mlp())
    assert parse_for_pruning(named, params)[1] is not None
