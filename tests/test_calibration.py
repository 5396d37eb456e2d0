"""Pruning with calibration inputs (issue 16): input statistics from onnxruntime, the activation
criterion and reconstruction wired into the prune job, bounded memory, and the edges."""

import io
import multiprocessing
import resource

import numpy as np
import onnx
import pytest
from graphs import conv_net, gemm_mlp, make_model
from helpers import run, weights
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError
from server import submit

from schemas import PruneParams
from workers.compress.calibrated import prune_calibrated
from workers.compress.calibration import input_statistics, layer_view, node_positions
from workers.compress.prune import copy_model, prune_model
from workers.errors import InputError
from workers.graph.weights import find_weights
from workers.jobs import run_prune_job

ACTIVATION = {"criterion": "activation", "reconstruct": True}


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def views_of(model: onnx.ModelProto) -> list:
    positions = node_positions(model)
    return [layer_view(slot, model, positions) for slot in find_weights(model)]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_input_statistics_are_the_grams_of_each_layers_input(trans_b):
    model = gemm_mlp([5, 7, 3], trans_b=trans_b)
    rng = np.random.default_rng(0)
    runs = [{"X": rng.standard_normal((n, 5)).astype(np.float32)} for n in (11, 4)]
    first, second = views_of(model)
    x = np.concatenate([feeds["X"] for feeds in runs]).astype(np.float64)
    (inputs,) = input_statistics(model, model, [first], runs)
    np.testing.assert_allclose(inputs.gram, x.T @ x, rtol=1e-6)
    w0, b0 = (numpy_helper.to_array(t) for t in model.graph.initializer[:2])
    hidden = np.tanh(x @ (w0.T if trans_b else w0) + b0)
    # the second layer's inputs in a model whose first layer was zeroed: tanh(b0) on every row
    pruned = copy_model(model)
    pruned.graph.initializer[0].CopyFrom(numpy_helper.from_array(0 * w0, "W0"))
    (inputs,) = input_statistics(pruned, model, [second], runs)
    now = np.tile(np.tanh(b0), (len(x), 1))
    for got, expected in [
        (inputs.gram, now.T @ now),
        (inputs.cross, now.T @ hidden),
        (inputs.dense, hidden.T @ hidden),
    ]:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_input_statistics_are_the_grams_of_the_im2col_patches():
    model = conv_net()
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    conv, _ = views_of(model)
    patches = np.lib.stride_tricks.sliding_window_view(x[:, 0], (3, 3), axis=(1, 2))
    rows = patches.reshape(-1, 9).astype(np.float64)  # [3·6·6, 1·3·3]
    (inputs,) = input_statistics(model, model, [conv], [{"X": x}])
    np.testing.assert_allclose(inputs.gram, rows.T @ rows, rtol=1e-6)


def digits_job(job_dir, mlp_classifier, digits, params: dict, train: bool = False):
    features, labels = digits
    (job_dir / "input" / "model.onnx").write_bytes(mlp_classifier.SerializeToString())
    (job_dir / "input" / "eval_data").write_bytes(npz(X=features[1200:], y=labels[1200:]))
    if train:
        data = npz(X=features[:1200], y=labels[:1200])
        (job_dir / "input" / "train_data").write_bytes(data)
    return run_prune_job(job_dir, PruneParams.model_validate(params))


def test_activation_and_reconstruct_lower_every_layers_error_and_keep_accuracy(
    tmp_path, mlp_classifier, digits
):
    reports = []
    for name, params in [
        ("magnitude", {"sparsity": 0.6}),
        ("reconstructed", {"sparsity": 0.6, **ACTIVATION}),
        ("again", {"sparsity": 0.6, **ACTIVATION}),
    ]:
        (tmp_path / name / "input").mkdir(parents=True)
        reports.append(digits_job(tmp_path / name, copy_model(mlp_classifier), digits, params))
    magnitude, reconstructed, again = reports
    calibration = reconstructed.calibration
    assert magnitude.calibration is None
    assert calibration.criterion == "activation" and calibration.reconstructed
    assert calibration.samples == 597 and calibration.seconds > 0
    assert [layer.name for layer in calibration.layers] == [
        layer.name for layer in reconstructed.layers
    ]
    for layer in calibration.layers:
        assert layer.method == "least_squares"
        assert layer.error_after < layer.error_before
    # each output row keeps round(0.4 · in) weights: 0.58 and 0.6 on 24 and 48 inputs
    assert all(layer.sparsity == pytest.approx(0.6, abs=0.02) for layer in reconstructed.layers)
    assert reconstructed.accuracy.compressed > magnitude.accuracy.compressed
    assert reconstructed.accuracy.delta > -0.03
    assert any("calibrated on every row of eval_data" in note for note in reconstructed.notes)
    # deterministic: the same inputs give the same file
    first = (tmp_path / "reconstructed" / "model.onnx").read_bytes()
    assert first == (tmp_path / "again" / "model.onnx").read_bytes()
    assert again.calibration.layers == calibration.layers


def test_fine_tuning_runs_after_reconstruction(job_dir, mlp_classifier, digits):
    fine_tune = {"epochs": 2, "learning_rate": 1e-3}
    params = {"sparsity": 0.8, **ACTIVATION, "fine_tune": fine_tune}
    report = digits_job(job_dir, mlp_classifier, digits, params, train=True)
    assert report.calibration.reconstructed
    assert len(report.training.loss) == 2
    assert all(layer.sparsity == pytest.approx(0.8, abs=0.02) for layer in report.layers)


def test_magnitude_with_reconstruct_keeps_magnitudes_mask(mlp_classifier):
    rng = np.random.default_rng(2)
    runs = [{"X": rng.random((64, 64)).astype(np.float32)}]
    plain = copy_model(mlp_classifier)
    prune_model(plain, PruneParams(sparsity=0.6))
    rebuilt, report = prune_calibrated(
        copy_model(mlp_classifier), PruneParams(sparsity=0.6, reconstruct=True), runs
    )
    assert report.criterion == "magnitude"
    for name, array in weights(rebuilt.model).items():
        if name in {layer.name for layer in report.layers}:
            np.testing.assert_array_equal(array != 0, weights(plain)[name] != 0)


def test_conv_layers_are_reconstructed():
    model = conv_net()
    x = np.random.default_rng(3).standard_normal((16, 1, 8, 8)).astype(np.float32)
    original = run(model, {"X": x})[0]
    masked, _ = prune_calibrated(copy_model(model), PruneParams(sparsity=0.5), [{"X": x}])
    rebuilt, report = prune_calibrated(
        copy_model(model), PruneParams(sparsity=0.5, **ACTIVATION), [{"X": x}]
    )
    assert [layer.op for layer in report.layers] == ["Conv", "Gemm"]
    assert all(layer.error_after <= layer.error_before for layer in report.layers)

    def error(pruned: onnx.ModelProto) -> float:
        return float(np.linalg.norm(run(pruned, {"X": x})[0] - original))

    assert error(rebuilt.model) < error(masked.model)


def test_weights_that_cannot_be_calibrated_fall_back_to_magnitude_with_a_note():
    rng = np.random.default_rng(4)
    shared = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    own = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "V")
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["a"]),
        helper.make_node("MatMul", ["a", "W"], ["b"]),  # W used twice: no single input
        helper.make_node("MatMul", ["b", "V"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        [shared, own],
    )
    runs = [{"X": rng.standard_normal((20, 4)).astype(np.float32)}]
    outcome, report = prune_calibrated(
        make_model(graph), PruneParams(sparsity=0.5, **ACTIVATION), runs
    )
    assert report.uncalibrated == ["W"]
    assert [layer.name for layer in report.layers] == ["V"]
    assert any("W (used by several nodes" in note for note in outcome.notes)
    assert all(layer.sparsity == 0.5 for layer in outcome.layers)


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"threshold": 0.1, "criterion": "activation"}, "give sparsity"),
        ({"sparsity": 0.5, "criterion": "activation", "scope": "global"}, "scope layer"),
        (
            {
                "sparsity": 0.5,
                "criterion": "activation",
                "granularity": "structured",
                "scope": "global",
            },
            "scope layer",
        ),
        (
            {"sparsity": 0.5, "reconstruct": True, "fine_tune": {"schedule": "gradual"}},
            "one_shot",
        ),
    ],
)
def test_params_refuse_what_calibration_cannot_do(params, words):
    with pytest.raises(ValidationError, match=words):
        PruneParams.model_validate(params)


@pytest.mark.parametrize(
    ("params", "field"),
    [({"criterion": "activation"}, "criterion activation"), ({"reconstruct": True}, "reconstruct")],
)
def test_the_job_refuses_calibration_without_eval_data(job_dir, mlp_classifier, params, field):
    (job_dir / "input" / "model.onnx").write_bytes(mlp_classifier.SerializeToString())
    with pytest.raises(InputError, match=f"{field} needs calibration inputs: send eval_data"):
        run_prune_job(job_dir, PruneParams.model_validate({"sparsity": 0.5, **params}))


# ------------------------------------------------------------------------------ bounded memory

WIDE, RUNS, ROWS = 256, 32, 4096
ALLOWANCE = 64 << 20  # what calibration may allocate beyond the process as it stood


def _wide_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W0"], ["h"]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("MatMul", ["a", "W1"], ["Y"]),
        ],
        "wide",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 8])],
        [
            numpy_helper.from_array(rng.standard_normal((16, WIDE)).astype(np.float32), "W0"),
            numpy_helper.from_array(rng.standard_normal((WIDE, 8)).astype(np.float32), "W1"),
        ],
    )
    return make_model(graph)


def _data_segment() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmData:"))
    return int(line.split()[1]) * 1024


def _calibrate_under_a_limit(results: "multiprocessing.Queue[object]") -> None:
    rng = np.random.default_rng(6)
    runs = [{"X": rng.standard_normal((ROWS, 16)).astype(np.float32)} for _ in range(RUNS)]
    params = PruneParams(sparsity=0.5, **ACTIVATION)
    prune_calibrated(_wide_model(), params, runs[:1])  # warm up BLAS, onnxruntime, imports
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (_data_segment() + ALLOWANCE, hard))
    try:
        np.ones(RUNS * ROWS * WIDE, dtype=np.float32)  # the hidden layer's input, all runs
        results.put("the activations fit: the test proves nothing")
        return
    except MemoryError:
        pass
    _, report = prune_calibrated(_wide_model(), params, runs)
    results.put([layer.error_after < layer.error_before for layer in report.layers])


def test_calibration_memory_is_bounded_by_one_runs_activation():
    """All runs' activations of the hidden layer (128 MiB of float32, twice that as float64)
    do not fit in the 64 MiB allowance; accumulating XᵀX run by run, in chunks, does."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_calibrate_under_a_limit, args=(results,))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    assert results.get(timeout=5) == [True, True]


# ---------------------------------------------------------------------------------- the service


def test_service_prunes_with_activation_and_reconstruction(client, digits_upload):
    params = {"sparsity": 0.6, **ACTIVATION}
    answer = submit(client, "prune", digits_upload, params, wait=60)
    job = answer.json()
    assert answer.status_code == 200 and job["status"] == "succeeded", answer.text
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    calibration = report["calibration"]
    assert calibration["criterion"] == "activation" and calibration["reconstructed"] is True
    assert all(layer["error_after"] < layer["error_before"] for layer in calibration["layers"])
    assert report["accuracy"]["delta"] > -0.05
