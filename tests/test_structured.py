"""Structured pruning removes whole hidden neurons: tensors and files shrink, outputs stay exact."""

import numpy as np
import onnx
import pytest
from graphs import control_flow, conv_net, gemm_mlp, make_model
from helpers import initializers, run
from onnx import TensorProto, helper, numpy_helper

from schemas import PruneParams
from workers.compress.prune import copy_model, prune_model
from workers.errors import UnsupportedModelError
from workers.graph.encoding import encode
from workers.graph.load import parse_model


def structured(model: onnx.ModelProto, **fields) -> onnx.ModelProto:
    outcome = prune_model(copy_model(model), PruneParams(granularity="structured", **fields))
    data, _ = encode(outcome.model, "dense", outcome.pruned)
    return parse_model(data)


def kept_columns(original: np.ndarray, pruned: np.ndarray) -> list[int]:
    """Which original columns survive, found by value (pruning never edits a survivor)."""
    return [
        next(j for j in range(original.shape[1]) if np.array_equal(original[:, j], column))
        for column in pruned.T
    ]


def test_skl2onnx_mlp_shrinks_and_matches_the_model_with_those_neurons_zeroed(
    mlp_classifier, digits
):
    features, _ = digits
    before = initializers(mlp_classifier)
    pruned = structured(mlp_classifier, sparsity=0.5)
    after = initializers(pruned)
    assert after["coefficient"].shape == (64, 24)
    assert after["intercepts"].shape == (1, 24)
    assert after["coefficient1"].shape == (24, 12)
    assert after["coefficient2"].shape == (12, 10)  # the output layer keeps its 10 classes
    assert pruned.ByteSize() < 0.6 * mlp_classifier.ByteSize()

    # Which neurons survived, layer by layer (the second layer's rows were cut by the first).
    kept0 = kept_columns(before["coefficient"], after["coefficient"])
    kept1 = kept_columns(before["coefficient1"][kept0], after["coefficient1"])
    # The dense model with the removed neurons' incoming and outgoing weights zeroed.
    dense = {name: array.copy() for name, array in before.items()}
    for kept, (w_in, bias, w_out) in [
        (kept0, ("coefficient", "intercepts", "coefficient1")),
        (kept1, ("coefficient1", "intercepts1", "coefficient2")),
    ]:
        gone = sorted(set(range(before[w_in].shape[1])) - set(kept))
        dense[w_in][:, gone] = 0
        dense[bias][:, gone] = 0
        dense[w_out][gone, :] = 0
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(mlp_classifier)
    for tensor in zeroed.graph.initializer:
        tensor.CopyFrom(onnx.numpy_helper.from_array(dense[tensor.name], tensor.name))
    expected, actual = run(zeroed, {"X": features}), run(pruned, {"X": features})
    assert np.array_equal(expected[0], actual[0])  # labels
    np.testing.assert_allclose(expected[1], actual[1], rtol=1e-5, atol=1e-6)


def test_the_weakest_neurons_go(mlp_classifier):
    # A neuron's importance is the RMS of every weight coupled to it (issue 15, as
    # Torch-Pruning's group importance): its incoming column and its outgoing row.
    weights = initializers(mlp_classifier)
    before, outgoing = weights["coefficient"], weights["coefficient1"]
    after = initializers(structured(mlp_classifier, sparsity=0.25))["coefficient"]
    kept = kept_columns(before, after)
    squares = np.sum(before.astype(np.float64) ** 2, axis=0) + np.sum(
        outgoing.astype(np.float64) ** 2, axis=1
    )
    rms = np.sqrt(squares / (before.shape[0] + outgoing.shape[1]))
    assert len(kept) == 36
    assert rms[sorted(set(range(48)) - set(kept))].max() <= rms[kept].min()


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_chains_with_either_weight_layout(trans_b):
    model = gemm_mlp([8, 20, 10, 3], trans_b=trans_b)
    pruned = structured(model, sparsity=0.5)
    shapes = {name: array.shape for name, array in initializers(pruned).items()}
    if trans_b:
        assert shapes == {
            "W0": (10, 8),
            "b0": (10,),
            "W1": (5, 10),
            "b1": (5,),
            "W2": (3, 5),
            "b2": (3,),
        }
    else:
        assert shapes == {
            "W0": (8, 10),
            "b0": (10,),
            "W1": (10, 5),
            "b1": (5,),
            "W2": (5, 3),
            "b2": (3,),
        }
    features = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    # exact: the dense model with the removed neurons' outgoing weights zeroed
    before, after = initializers(model), initializers(pruned)
    as_in_out = (lambda w: w.T) if trans_b else (lambda w: w)
    kept0 = kept_columns(as_in_out(before["W0"]), as_in_out(after["W0"]))
    kept1 = kept_columns(as_in_out(before["W1"])[kept0], as_in_out(after["W1"]))
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    dense = {
        name: as_in_out(array).copy() if name.startswith("W") else array
        for name, array in before.items()
    }
    dense["W1"][sorted(set(range(20)) - set(kept0)), :] = 0
    dense["W2"][sorted(set(range(10)) - set(kept1)), :] = 0
    for tensor in zeroed.graph.initializer:
        array = as_in_out(dense[tensor.name]) if tensor.name.startswith("W") else dense[tensor.name]
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(array), tensor.name))
    np.testing.assert_allclose(
        run(pruned, {"X": features})[0], run(zeroed, {"X": features})[0], rtol=1e-5, atol=1e-5
    )


def test_zero_sparsity_structured_is_the_original(mlp_classifier, digits):
    features, _ = digits
    pruned = structured(mlp_classifier, sparsity=0.0)
    for a, b in zip(
        run(mlp_classifier, {"X": features}), run(pruned, {"X": features}), strict=True
    ):
        assert np.array_equal(a, b)


def test_a_layer_never_loses_all_its_neurons(mlp_classifier):
    pruned = structured(mlp_classifier, threshold=1e9)
    assert initializers(pruned)["coefficient"].shape == (64, 1)


def test_no_safe_chain_is_refused_with_the_reason(logistic):
    with pytest.raises(UnsupportedModelError, match="granularity=unstructured"):
        structured(logistic[0], sparsity=0.5)


def test_conv_channels_are_removed_with_their_flattened_block_of_the_head():
    # Once refused ("only MatMul/Gemm"): the channel graph follows Conv -> Relu -> Flatten.
    shapes = {
        name: a.shape for name, a in initializers(structured(conv_net(), sparsity=0.5)).items()
    }
    assert shapes["conv_w"] == (2, 1, 3, 3) and shapes["conv_b"] == (2,)
    assert shapes["fc_w"] == (72, 10)  # each channel owned 36 rows of the flattened input


def test_a_branching_hidden_layer_is_left_alone():
    model = gemm_mlp([6, 8, 4, 2], trans_b=0)
    # h0 also becomes a graph output: its width is visible, so its neurons cannot go.
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("a0", onnx.TensorProto.FLOAT, None)
    )
    outcome = prune_model(model, PruneParams(granularity="structured", sparsity=0.5))
    shapes = {layer.name: layer.shape for layer in outcome.layers}
    assert shapes["W0"] == [6, 8] and shapes["W1"] == [8, 2]
    assert any("W0" in note and "graph output" in note for note in outcome.notes)


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


def test_prelu_slopes_are_cut_with_their_neurons():
    # PRelu is elementwise with one slope per neuron: the slope is sliced with the neuron
    # (it was once refused; it must never be taken for a one-input activation).
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["X", "W0"], ["h"]),
        helper.make_node("PRelu", ["h", "slope"], ["a"]),
        helper.make_node("MatMul", ["a", "W1"], ["Y"]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "W0"),
        numpy_helper.from_array(np.linspace(0.1, 0.6, 6).astype(np.float32), "slope"),
        numpy_helper.from_array(rng.standard_normal((6, 2)).astype(np.float32), "W1"),
    ]
    graph = helper.make_graph(
        nodes,
        "prelu",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = make_model(graph)
    pruned = structured(model, sparsity=0.5)
    before, after = initializers(model), initializers(pruned)
    kept = kept_columns(before["W0"], after["W0"])
    np.testing.assert_array_equal(after["slope"], before["slope"][kept])
    zeroed = copy_model(model)
    gone = sorted(set(range(6)) - set(kept))
    w1 = before["W1"].copy()
    w1[gone] = 0
    zeroed.graph.initializer[2].CopyFrom(numpy_helper.from_array(w1, "W1"))
    features = rng.standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(
        run(pruned, {"X": features})[0], run(zeroed, {"X": features})[0], rtol=1e-5, atol=1e-6
    )


def test_weights_only_inside_subgraphs_are_refused_with_the_reason():
    with pytest.raises(UnsupportedModelError, match="If/Loop/Scan bodies") as caught:
        structured(control_flow(), sparsity=0.3)
    assert len(str(caught.value)) <= 300
