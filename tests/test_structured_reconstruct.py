"""Structured pruning with reconstruct (issue 16, Deliver 3): the layers that read removed
channels are re-fitted by least squares against the original model's outputs (ThiNet)."""

import numpy as np
import onnx
import pytest
from graphs import conv_net, gemm_mlp
from onnx import numpy_helper
from test_calibration import digits_job
from test_structured_patterns import concat_and_split, residual_block, zero_at

from schemas import PruneParams
from workers.compress import calibration
from workers.compress.calibrated import prune_calibrated
from workers.compress.calibration import add_zero_biases
from workers.compress.criteria import OutputContribution
from workers.compress.prune import copy_model, prunable_slots, prune_model
from workers.compress.structured import prune_channels
from workers.evaluate.runtime import session
from workers.graph.channels import ChannelGraph
from workers.graph.load import serialize

STRUCTURED = {"sparsity": 0.5, "granularity": "structured"}


def outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(serialize(model)).run(None, {"X": x})[0]


def inputs(shape: tuple[int, ...], rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, *shape)).astype(np.float32)


@pytest.mark.parametrize(
    ("model", "shape", "consumers"),
    [
        (gemm_mlp([8, 16, 16, 4], trans_b=0), (8,), ["W1", "W2"]),
        (gemm_mlp([8, 16, 16, 4], trans_b=1), (8,), ["W1", "W2"]),
        (conv_net(), (1, 8, 8), ["fc_w"]),
        (residual_block(), (3, 8, 8), ["conv1_w", "conv2_w", "conv3_w", "fc_w"]),
        (concat_and_split(), (3, 8, 8), ["mix_w", "conv_p_w", "conv_q_w", "last_w", "fc_w"]),
    ],
    ids=["matmul-layout", "transB", "conv-flatten-gemm", "residual-batchnorm", "concat-split"],
)
def test_reconstruct_lowers_the_held_out_error_and_every_consumers_error(model, shape, consumers):
    calibration = [{"X": inputs(shape, 100, seed)} for seed in (1, 2)]  # two runs: accumulated
    held_out = inputs(shape, 100, 3)
    plain = prune_model(copy_model(model), PruneParams.model_validate(STRUCTURED))
    params = PruneParams.model_validate({**STRUCTURED, "reconstruct": True})
    refitted, report = prune_calibrated(copy_model(model), params, calibration)
    # the same channels go: reconstruction changes values, never shapes
    assert [layer.shape for layer in refitted.layers] == [layer.shape for layer in plain.layers]
    assert refitted.groups == plain.groups
    assert [layer.name for layer in report.layers] == consumers
    assert report.reconstructed and report.samples == 200 and not report.uncalibrated
    for layer in report.layers:
        assert layer.method == "least_squares"
        assert layer.error_after <= layer.error_before
    assert report.layers[-1].error_after < report.layers[-1].error_before
    original = outputs(model, held_out)
    plain_error = np.linalg.norm(outputs(plain.model, held_out) - original)
    refitted_error = np.linalg.norm(outputs(refitted.model, held_out) - original)
    assert refitted_error < 0.8 * plain_error


def test_structured_reconstruct_is_deterministic():
    model = gemm_mlp([8, 16, 16, 4], trans_b=0)
    runs = [{"X": inputs((8,), 100, 4)}]
    params = PruneParams.model_validate({**STRUCTURED, "reconstruct": True})
    first, first_report = prune_calibrated(copy_model(model), params, runs)
    again, again_report = prune_calibrated(copy_model(model), params, runs)
    assert serialize(first.model) == serialize(again.model)
    assert first_report.layers == again_report.layers


@pytest.mark.parametrize("criterion", ["magnitude", "activation"])
def test_conv_inputs_chunked_for_im2col_pair_the_same_images(criterion, monkeypatch):
    """A run too large for one im2col chunk is cut into chunks of images sized from the layer's
    width, so the narrowed layer would take more images a chunk than the original it is fitted
    against (YOLOv8n on eight 320x320 images: an internal error). Both are chunked alike, and
    chunking changes nothing but the order of the sums."""
    model = residual_block()
    runs = [{"X": inputs((3, 8, 8), 8, 1)}]
    params = PruneParams.model_validate(
        {**STRUCTURED, "reconstruct": criterion == "magnitude", "criterion": criterion}
    )
    whole, whole_report = prune_calibrated(copy_model(model), params, runs)
    # one 8x8 image of conv1's original 8-channel input is 18 KiB of im2col, of its 4 kept 9
    monkeypatch.setattr(calibration, "IM2COL_BYTES", 40 * 1024)
    chunked, chunked_report = prune_calibrated(copy_model(model), params, runs)
    assert [layer.name for layer in chunked_report.layers] == [
        layer.name for layer in whole_report.layers
    ]
    for got, want in zip(
        chunked.model.graph.initializer, whole.model.graph.initializer, strict=True
    ):
        np.testing.assert_allclose(
            numpy_helper.to_array(got), numpy_helper.to_array(want), rtol=1e-4, atol=1e-6
        )


def test_the_job_reconstructs_structured_pruning_on_eval_data(tmp_path, mlp_classifier, digits):
    reports = []
    for name, extra in [("plain", {}), ("refitted", {"reconstruct": True})]:
        (tmp_path / name / "input").mkdir(parents=True)
        params = {**STRUCTURED, **extra}
        reports.append(digits_job(tmp_path / name, copy_model(mlp_classifier), digits, params))
    plain, refitted = reports
    assert plain.calibration is None
    calibration = refitted.calibration
    assert calibration.criterion == "magnitude" and calibration.reconstructed
    assert calibration.layers  # the 24-wide layer and the output layer read removed neurons
    assert all(layer.error_after <= layer.error_before for layer in calibration.layers)
    assert [group.kept for group in refitted.groups] == [group.kept for group in plain.groups]
    assert refitted.accuracy.compressed > plain.accuracy.compressed


def exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy whose outputs are the values `names` (the readers' outputs)."""
    copy = copy_model(model)
    del copy.graph.output[:]
    copy.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    return copy


def zeroing_errors(model, readers: list[str], channels: int, x: np.ndarray) -> np.ndarray:
    """The reference for criterion activation, by onnxruntime alone: for each channel, the
    change of a reader's output when that channel is zeroed at that reader's input alone (the
    others see the original inputs), less its mean over the rows (the reader's bias takes the
    mean back), squared and summed over readers."""
    squares = np.zeros(channels)
    for reader in readers:
        base = session(serialize(exposed(model, [reader]))).run(None, {"X": x})[0]
        for channel in range(channels):
            mask = np.ones(channels, np.float32)
            mask[channel] = 0
            zeroed = session(serialize(exposed(zero_at(model, [(reader, 0, 1, mask)]), [reader])))
            change = (zeroed.run(None, {"X": x})[0] - base).astype(np.float64)
            rows = tuple(axis for axis in range(change.ndim) if axis != 1)  # all but channels
            squares[channel] += np.sum((change - change.mean(axis=rows, keepdims=True)) ** 2)
    return np.sqrt(squares)


@pytest.mark.parametrize(
    ("leading", "readers", "channels"),
    [("conv0_w", ["conv1", "conv3"], 8), ("conv1_w", ["conv2"], 8), ("conv3_w", ["Y"], 6)],
    ids=["residual-two-conv-readers", "conv-reader", "pooled-gemm-reader"],
)
def test_activation_scores_each_channel_by_the_error_its_removal_leaves(leading, readers, channels):
    model = residual_block()
    runs = [{"X": inputs((3, 8, 8), 5, seed)} for seed in (1, 2)]  # accumulated over runs
    graph = ChannelGraph(model)
    group = next(group for group in graph.groups() if group.leading == leading)
    scorer = OutputContribution(model, runs)
    scores = scorer(group, graph.constants)
    reference = zeroing_errors(model, readers, channels, np.concatenate([r["X"] for r in runs]))
    np.testing.assert_allclose(scores, reference, rtol=1e-5)  # float32 runs
    assert not scorer.fallbacks


def test_structured_activation_keeps_the_channels_that_matter_most():
    model = residual_block()
    runs = [{"X": inputs((3, 8, 8), 10, 1)}]
    params = PruneParams.model_validate({**STRUCTURED, "criterion": "activation"})
    pruned, report = prune_calibrated(copy_model(model), params, runs)
    graph = ChannelGraph(model)
    group = next(group for group in graph.groups() if group.leading == "conv1_w")
    errors = zeroing_errors(model, ["conv2"], 8, runs[0]["X"])
    # conv1's bias is re-fitted (conv1 reads the stem's cut channels); its BatchNorm scale is
    # only sliced, so it tells which channels stayed
    kept_scale = numpy_helper.to_array(
        next(t for t in pruned.model.graph.initializer if t.name == "bn1_scale")
    )
    original_scale = numpy_helper.to_array(graph.constants["bn1_scale"])
    kept_channels = np.flatnonzero(np.isin(original_scale, kept_scale))
    np.testing.assert_array_equal(kept_channels, np.sort(np.argsort(-errors)[:4]))
    assert group.units == 8
    assert report.criterion == "activation" and not report.reconstructed
    assert any("output error" in note for note in pruned.notes)


def without_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every Gemm's C taken away (as a Conv + BatchNorm export has none)."""
    for node in model.graph.node:
        del node.input[2:]
    kept = [tensor for tensor in model.graph.initializer if tensor.name.startswith("W")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


@pytest.mark.parametrize("biased", [True, False], ids=["own-biases", "no-biases"])
def test_activation_without_reconstruct_puts_the_removed_means_back_into_the_biases(biased):
    """Readers without a bias get one to put the means into; one left at zero (the first
    layer's, whose inputs stay whole) is taken away again."""
    model = gemm_mlp([8, 16, 16, 4], trans_b=1)
    model = model if biased else without_biases(model)
    calibration = [{"X": inputs((8,), 200, 1) + 1.0}]  # inputs off zero: means to put back
    held_out = inputs((8,), 200, 2) + 1.0
    params = PruneParams.model_validate({**STRUCTURED, "criterion": "activation"})
    compensated, report = prune_calibrated(copy_model(model), params, calibration)
    assert [layer.method for layer in report.layers] == ["bias", "bias"]
    for layer in report.layers:
        assert layer.error_after < layer.error_before
    # the same channels cut (scored with the same biases, zero ones added too), biases left
    uncompensated = copy_model(model)
    add_zero_biases(uncompensated)
    slots = prunable_slots(uncompensated, params, None)
    scorer = OutputContribution(copy_model(uncompensated), calibration)
    prune_channels(uncompensated, slots, sparsity=0.5, threshold=None, scope="layer", scorer=scorer)
    assert [t.dims for t in uncompensated.graph.initializer if len(t.dims) == 2] == [
        t.dims for t in compensated.model.graph.initializer if len(t.dims) == 2
    ]
    expected = outputs(model, held_out)
    compensated_error = np.linalg.norm(outputs(compensated.model, held_out) - expected)
    uncompensated_error = np.linalg.norm(outputs(uncompensated, held_out) - expected)
    assert compensated_error < 0.8 * uncompensated_error
    if not biased:
        assert [
            len(node.input) for node in compensated.model.graph.node if node.op_type == "Gemm"
        ] == [2, 3, 3]
        assert compensated.params_before == sum(np.prod(t.dims) for t in model.graph.initializer)


def test_structured_activation_job_on_digits(tmp_path, mlp_classifier, digits):
    (tmp_path / "input").mkdir()
    params = {**STRUCTURED, "criterion": "activation", "reconstruct": True}
    report = digits_job(tmp_path, copy_model(mlp_classifier), digits, params)
    assert report.calibration.criterion == "activation" and report.calibration.reconstructed
    assert [layer.method for layer in report.calibration.layers] == ["least_squares"] * 2
    assert report.accuracy.compressed >= report.accuracy.original - 0.05
    assert any("output error" in note for note in report.notes)


@pytest.mark.parametrize("level", [0.1, 3.3, 1e3, 12345.678])
def test_a_constant_input_scores_zero_not_nan(level):
    """Centred, a channel that never varies leaves no error; its Gram less its mean can come
    out a rounding error below zero, whose square root was NaN and ranked anywhere."""
    model = gemm_mlp([8, 16, 16, 4], trans_b=1)
    runs = [{"X": np.full((200, 8), level, dtype=np.float32)}]
    scorer = OutputContribution(copy_model(model), runs)
    graph = ChannelGraph(model)
    for group in graph.groups():
        scores = scorer(group, graph.constants)
        assert np.all(np.isfinite(scores)) and np.all(scores >= 0)
        assert np.all(scores <= 1e-3 * level * np.sqrt(200)), scores


def test_the_zero_biases_are_no_weights_of_the_report():
    """`include` that matches every name still picks only the model's own tensors: a zero bias
    added for the re-fit, and taken away when left at zero, is never reported as a layer."""
    model = without_biases(gemm_mlp([8, 16, 16, 4], trans_b=1))
    params = PruneParams.model_validate(
        {**STRUCTURED, "criterion": "activation", "include": [".*"]}
    )
    runs = [{"X": inputs((8,), 200, 1) + 1.0}]
    outcome, _ = prune_calibrated(copy_model(model), params, runs)
    names = {tensor.name for tensor in model.graph.initializer}
    assert [layer.name for layer in outcome.layers] == sorted(names)
    assert outcome.params_before == sum(np.prod(t.dims) for t in model.graph.initializer)
