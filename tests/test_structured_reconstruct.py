"""Structured pruning with reconstruct (issue 16, Deliver 3): the layers that read removed
channels are re-fitted by least squares against the original model's outputs (ThiNet)."""

import numpy as np
import onnx
import pytest
from graphs import conv_net, gemm_mlp
from pydantic import ValidationError
from test_calibration import digits_job
from test_structured_patterns import concat_and_split, residual_block

from schemas import PruneParams
from workers.compress.calibrated import prune_calibrated
from workers.compress.prune import copy_model, prune_model
from workers.evaluate.runtime import session
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


def test_structured_still_refuses_the_activation_criterion():
    with pytest.raises(ValidationError, match="criterion activation works with granularity"):
        PruneParams.model_validate({**STRUCTURED, "criterion": "activation", "reconstruct": True})
