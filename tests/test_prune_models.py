"""Unstructured pruning and the encodings, on converted and hand-built models."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import constant_node_mlp, control_flow, conv_net, gemm_mlp, make_model
from helpers import ONNX_TEST_DATA, initializers, reference_masks, run, weights
from onnx import TensorProto, helper, numpy_helper

from schemas import PruneParams
from workers.compress.prune import copy_model, prune_model
from workers.errors import InvalidModelError, UnsupportedModelError
from workers.graph.encoding import encode
from workers.graph.load import parse_model
from workers.graph.weights import WeightSlot, find_weights


def prune_bytes(model: onnx.ModelProto, encoding: str = "dense", **fields) -> bytes:
    """Prune, encode, and check what comes out parses and passes the checker like any upload."""
    params = PruneParams(encoding=encoding, **fields)
    outcome = prune_model(copy_model(model), params)
    data, _ = encode(outcome.model, params.encoding, outcome.pruned)
    parse_model(data)
    return data


def feeds_for(model: onnx.ModelProto, rows: int = 16) -> dict[str, np.ndarray]:
    value = model.graph.input[0]
    dims = [d.dim_value or rows for d in value.type.tensor_type.shape.dim]
    return {value.name: np.random.default_rng(0).standard_normal(dims).astype(np.float32)}


@pytest.fixture(
    params=["mlp_classifier", "mlp_regressor", "logistic", "gemm", "gemm_t", "conv", "const"]
)
def any_model(request) -> onnx.ModelProto:
    builders = {
        "gemm": lambda: gemm_mlp([8, 16, 12, 4], trans_b=0),
        "gemm_t": lambda: gemm_mlp([8, 16, 12, 4], trans_b=1),
        "conv": conv_net,
        "const": constant_node_mlp,
    }
    if request.param in builders:
        return builders[request.param]()
    fixture = request.getfixturevalue(request.param)
    return fixture if isinstance(fixture, onnx.ModelProto) else fixture[0]


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_each_prunable_tensor_gets_the_asked_sparsity_and_loads(any_model, sparsity):
    before = weights(any_model)
    data = prune_bytes(any_model, sparsity=sparsity)
    after = weights(data)
    assert set(after) == set(before) and after
    for name, array in after.items():
        zeros = array.size - np.count_nonzero(array)
        assert abs(zeros - sparsity * array.size) <= 1, name
        kept = array != 0
        assert np.array_equal(array[kept], before[name][kept])  # survivors unchanged
    run(data, feeds_for(any_model))


def test_zero_sparsity_gives_identical_outputs(any_model):
    data = prune_bytes(any_model, sparsity=0.0)
    feeds = feeds_for(any_model)
    for original, pruned in zip(run(any_model, feeds), run(data, feeds), strict=True):
        assert np.array_equal(original, pruned)


def test_threshold_zeros_exactly_the_small_weights(mlp_classifier):
    before = weights(mlp_classifier)
    epsilon = float(np.median(np.abs(before["coefficient"])))
    after = weights(prune_bytes(mlp_classifier, threshold=epsilon))
    for name, array in before.items():
        assert np.array_equal(after[name], np.where(np.abs(array) <= epsilon, 0, array)), name


def test_biases_are_untouched_unless_included(mlp_classifier):
    original = initializers(mlp_classifier)
    pruned = initializers(onnx.load_model_from_string(prune_bytes(mlp_classifier, sparsity=0.9)))
    for name in ("intercepts", "intercepts1", "intercepts2"):
        assert np.array_equal(pruned[name], original[name])
    included = onnx.load_model_from_string(
        prune_bytes(mlp_classifier, sparsity=0.5, include=["^intercepts$"])
    )
    bias = initializers(included)["intercepts"]
    assert abs(int((bias == 0).sum()) - 0.5 * bias.size) <= 1


def test_exclude_keeps_a_layer_dense(mlp_classifier):
    after = weights(prune_bytes(mlp_classifier, sparsity=0.9, exclude=["^coefficient2$"]))
    assert np.count_nonzero(after["coefficient2"]) == after["coefficient2"].size
    assert np.count_nonzero(after["coefficient"]) < 0.11 * after["coefficient"].size


def test_global_scope_prunes_the_overall_share(mlp_classifier):
    after = weights(prune_bytes(mlp_classifier, sparsity=0.8, scope="global"))
    total = sum(a.size for a in after.values())
    zeros = sum(a.size - np.count_nonzero(a) for a in after.values())
    assert abs(zeros - 0.8 * total) <= 1


def test_a_weight_pruned_to_all_zeros_is_named_in_a_note():
    model = gemm_mlp([6, 8, 8, 3], trans_b=0)
    middle = next(t for t in model.graph.initializer if t.name == "W1")
    middle.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(middle) * 1e-3, "W1"))
    outcome = prune_model(copy_model(model), PruneParams(sparsity=0.5, scope="global"))
    assert [layer.name for layer in outcome.layers if layer.nonzero == 0] == ["W1"]
    assert outcome.notes == [
        "unstructured: 1 weight(s) pruned to all zeros, so their layers pass only a bias, if "
        "any: W1"
    ]
    layered = prune_model(copy_model(model), PruneParams(sparsity=0.5, scope="layer"))
    assert layered.notes == []


def test_weights_inside_if_loop_and_scan_bodies_are_pruned():
    model = control_flow()
    names = set(weights(model))
    assert names == {"W_then", "W_outer", "W_loop", "W_scan"}
    data = prune_bytes(model, sparsity=0.5)
    for name, array in weights(data).items():
        assert abs((array == 0).sum() - 0.5 * array.size) <= 1, name
    assert [o.shape for o in run(data, feeds_for(model))] == [(16, 4), (16, 4), (16, 3)]


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


def test_sparse_encoding_loads_in_onnxruntime_and_gives_the_dense_outputs(mlp_classifier, digits):
    features, _ = digits
    dense = prune_bytes(mlp_classifier, sparsity=0.9)
    sparse = prune_bytes(mlp_classifier, "sparse", sparsity=0.9)
    assert len(sparse) < len(dense)
    assert len(onnx.load_model_from_string(sparse).graph.sparse_initializer) == 3
    for a, b in zip(run(dense, {"X": features}), run(sparse, {"X": features}), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_sparse_encoding_keeps_tensors_dense_where_coo_would_be_larger(mlp_classifier):
    outcome = prune_model(mlp_classifier, PruneParams(sparsity=0.3))
    data, notes = encode(outcome.model, "sparse", outcome.pruned)
    assert not onnx.load_model_from_string(data).graph.sparse_initializer
    assert "kept dense" in notes[0]


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


def test_int8_encoding_is_about_four_times_smaller_and_close(digits):
    model = gemm_mlp([64, 256, 128, 10], trans_b=0)
    features, _ = digits
    dense = prune_bytes(model, sparsity=0.5)
    int8 = prune_bytes(model, "int8", sparsity=0.5)
    assert len(int8) < len(dense) / 3
    (a,), (b,) = run(dense, {"X": features}), run(int8, {"X": features})
    assert np.mean(np.argmax(a, 1) == np.argmax(b, 1)) > 0.9


def test_int8_keeps_the_interface_and_computes_what_the_quantizer_wrote(mlp_classifier, digits):
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    features, _ = digits
    outcome = prune_model(mlp_classifier, PruneParams(sparsity=0.5))
    data, _ = encode(outcome.model, "int8", outcome.pruned)
    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(
            outcome.model, Path(tmp) / "q.onnx", weight_type=QuantType.QInt8, per_channel=True
        )
        plain = (Path(tmp) / "q.onnx").read_bytes()
    assert len(data) < len(plain)
    compacted = onnx.load_model_from_string(data)
    assert [v.name for v in compacted.graph.input] == ["X"]
    assert [v.name for v in compacted.graph.output] == ["output_label", "output_probability"]
    for a, b in zip(run(plain, {"X": features}), run(data, {"X": features}), strict=True):
        assert np.array_equal(a, b)


def feedable(model: onnx.ModelProto) -> list[str]:
    """The inputs a caller feeds: before IR 4 initializers were listed as inputs too."""
    weights = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in weights]


@pytest.mark.parametrize("name", ["test_Conv2d", "test_Conv1d_dilated", "test_Conv3d_no_bias"])
def test_int8_of_a_model_whose_values_are_named_by_number_loads_and_computes_it(name):
    """Early PyTorch exports name every value "0", "1", ...: the short names int8's compaction
    gives internal values must not land on the input and output names that keep theirs (they
    did: a file onnxruntime could not load, in a job that succeeded)."""
    directory = ONNX_TEST_DATA / "pytorch-converted" / name
    model = parse_model((directory / "model.onnx").read_bytes())
    feeds = {
        model.graph.input[0].name: numpy_helper.to_array(
            TensorProto.FromString((directory / "test_data_set_0" / "input_0.pb").read_bytes())
        )
    }
    outcome = prune_model(copy_model(model), PruneParams(sparsity=0.3))
    data, _ = encode(outcome.model, "int8", outcome.pruned)
    written = onnx.load_model_from_string(data)
    assert feedable(written) == feedable(model)
    assert [v.name for v in written.graph.output] == [v.name for v in model.graph.output]
    pruned = run(encode(outcome.model, "dense", outcome.pruned)[0], feeds)[0]
    quantized = run(data, feeds)[0]
    cosine = np.vdot(pruned, quantized) / np.linalg.norm(pruned) / np.linalg.norm(quantized)
    assert quantized.shape == pruned.shape and cosine > 0.99


def test_no_prunable_weights_says_which_constants_include_could_name():
    """An early PyTorch nn.Linear(bias=False) reads its weight through a Transpose, so nothing
    feeds MatMul directly; the refusal names the float constants include can pick."""
    data = (
        ONNX_TEST_DATA / "pytorch-converted" / "test_Linear_no_bias" / "model.onnx"
    ).read_bytes()
    with pytest.raises(UnsupportedModelError, match=r"among its 1 float constants: 1$"):
        prune_model(parse_model(data), PruneParams(sparsity=0.5))
    outcome = prune_model(parse_model(data), PruneParams(sparsity=0.5, include=["^1$"]))
    assert [(layer.name, layer.sparsity) for layer in outcome.layers] == [("1", 0.5)]


def test_a_model_whose_weights_are_computed_in_the_graph_is_refused_saying_so():
    data = (ONNX_TEST_DATA / "light" / "light_bvlc_alexnet.onnx").read_bytes()
    with pytest.raises(UnsupportedModelError, match="stores no float initializer or Constant"):
        prune_model(parse_model(data), PruneParams(sparsity=0.5, include=["conv1_w_0"]))


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


@pytest.mark.parametrize(
    "fields", [{"sparsity": 0.9, "scope": "global"}, {"sparsity": 0.5}, {"threshold": 0.05}]
)
def test_pruned_bytes_equal_the_plain_path_bit_for_bit(digits_300_100, fields):
    """Pruning reads the weights one at a time; the bytes must be those of holding them all."""
    model = digits_300_100[0]
    expected = copy_model(model)
    slots = find_weights(expected)
    arrays = [slot.read() for slot in slots]
    if "threshold" in fields:
        masks = [np.abs(a) > fields["threshold"] for a in arrays]
    else:
        masks = reference_masks(arrays, fields["sparsity"], fields.get("scope", "layer"))
    for slot, array, keep in zip(slots, arrays, masks, strict=True):
        slot.write(np.where(keep, array, np.zeros((), dtype=array.dtype)))
    assert prune_bytes(model, **fields) == expected.SerializeToString()


@pytest.mark.parametrize("stored", ["raw_data", "float_data", "float16"])
def test_a_pruned_tensor_is_written_as_numpy_helper_writes_one(stored):
    """Issue 18: outputs bit-identical to before, when pruning wrote each weight through
    numpy_helper.from_array: name, type, dims and raw_data; a doc string does not survive, and
    typed storage becomes raw_data."""
    model = gemm_mlp([8, 16, 4], trans_b=0)
    (weight,) = [t for t in model.graph.initializer if t.name == "W0"]
    values = numpy_helper.to_array(weight).astype(np.float16 if stored == "float16" else np.float32)
    weight.CopyFrom(numpy_helper.from_array(values, "W0"))
    if stored == "float_data":
        weight.ClearField("raw_data")
        weight.float_data.extend(values.ravel().tolist())
    weight.doc_string = "the first layer"
    outcome = prune_model(model, PruneParams(sparsity=0.5, include=["W0"], exclude=["W1"]))
    (pruned,) = [t for t in outcome.model.graph.initializer if t.name == "W0"]
    keep = np.abs(values) > np.sort(np.abs(values).ravel())[values.size // 2 - 1]
    expected = numpy_helper.from_array(np.where(keep, values, np.zeros((), values.dtype)), "W0")
    assert pruned.SerializeToString() == expected.SerializeToString()


@pytest.mark.parametrize(
    ("fields", "reads"),
    [
        # histogram (checked finite on it), bucket, mask: the write and the layer report take
        # the mask's
        ({"sparsity": 0.5, "scope": "global"}, 3),
        # one read for the finite check, the cut and the mask
        ({"sparsity": 0.5, "scope": "layer"}, 1),
        ({"threshold": 0.1}, 1),
    ],
)
def test_each_weight_is_read_out_of_protobuf_once_per_pass(monkeypatch, fields, reads):
    """A read copies a weight out of protobuf (64 MB apiece in a 270 MB model): the write
    prunes the values the mask was made from, and counts them for the layer report, rather
    than reading them again."""
    counts: dict[str, int] = {}
    read = WeightSlot.read

    def counted(slot: WeightSlot) -> np.ndarray:
        counts[slot.name] = counts.get(slot.name, 0) + 1
        return read(slot)

    monkeypatch.setattr(WeightSlot, "read", counted)
    outcome = prune_model(gemm_mlp([8, 16, 12, 4], trans_b=0), PruneParams(**fields))
    assert outcome.pruned == {"W0", "W1", "W2"}
    assert counts == {"W0": reads, "W1": reads, "W2": reads}


@pytest.mark.parametrize(
    "fields",
    [
        {"sparsity": 0.5, "scope": "global"},
        {"sparsity": 0.5, "scope": "layer"},
        {"threshold": 0.1},
        {"sparsity": 0.5, "granularity": "structured"},
    ],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_weight_that_is_not_finite_is_refused_by_name(fields, bad):
    model = gemm_mlp([8, 16, 12, 4], trans_b=0)
    weight = numpy_helper.to_array(model.graph.initializer[4]).copy()
    weight.reshape(-1)[7] = bad
    model.graph.initializer[4].CopyFrom(numpy_helper.from_array(weight, "W2"))
    with pytest.raises(InvalidModelError, match="weight 'W2' holds NaN or infinite values"):
        prune_model(model, PruneParams(**fields))
