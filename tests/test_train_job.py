"""The train job entry point and `clipprune train`, end to end on files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run
from sklearn.datasets import load_diabetes

from schemas import Report, TrainParams
from workers.jobs import run_train_job


@pytest.fixture
def digits_csv(tmp_path: Path, digits) -> Path:
    features, labels = digits
    path = tmp_path / "digits.csv"
    header = ",".join([f"p{i}" for i in range(64)] + ["digit"])
    np.savetxt(
        path, np.c_[features * 16, labels], delimiter=",", header=header, comments="", fmt="%g"
    )
    return path


def test_train_job_writes_model_and_a_report_with_training_and_clip_stats(job_dir, digits_csv):
    (job_dir / "input" / "train_data").symlink_to(digits_csv)
    seen: list[str] = []
    params = TrainParams.model_validate(
        {"model": {"hidden": [64]}, "epochs": 10, "clip": {"mode": "norm", "threshold": 0.2}}
    )
    report = run_train_job(job_dir, params, lambda stage, fraction: seen.append(stage))
    assert Report.model_validate_json((job_dir / "report.json").read_text()) == report
    assert seen[0] == "loading" and "epoch 10/10" in seen and seen[-1] == "done"
    assert report.kind == "train" and report.accuracy.metric == "accuracy"
    assert report.accuracy.samples == round(0.2 * 1797) and report.accuracy.original > 0.9
    training = report.training
    assert len(training.loss) == len(training.validation) == 10
    assert training.loss[-1] < training.loss[0]
    assert training.clip.mode == "norm" and 0 < training.clip.clipped_fraction <= 1
    assert training.clip.grad_norm_max >= training.clip.grad_norm_p50 > 0
    assert [layer.shape for layer in report.layers] == [[64, 64], [64, 10]]
    model = onnx.load_model_from_string((job_dir / "model.onnx").read_bytes())
    onnx.checker.check_model(model)
    assert model.ir_version == 8 and report.onnx.checker == "passed"


def test_train_job_with_eval_data_and_gradual_pruning(job_dir, tmp_path):
    features, target = load_diabetes(return_X_y=True)
    np.savez(tmp_path / "train.npz", X=features[:350], y=target[:350])
    np.savez(tmp_path / "eval.npz", X=features[350:], y=target[350:])
    (job_dir / "input" / "train_data").symlink_to(tmp_path / "train.npz")
    (job_dir / "input" / "eval_data").symlink_to(tmp_path / "eval.npz")
    params = TrainParams.model_validate(
        {
            "model": {"hidden": [32]},
            "epochs": 20,
            "learning_rate": 0.01,
            "prune": {"sparsity": 0.7, "schedule": "gradual"},
        }
    )
    report = run_train_job(job_dir, params)
    assert report.accuracy.metric == "r2" and report.accuracy.samples == len(features) - 350
    assert report.accuracy.compressed > 0.2
    assert all(
        abs(layer.params - layer.nonzero - 0.7 * layer.params) <= 1 for layer in report.layers
    )
    (prediction,) = run(
        (job_dir / "model.onnx").read_bytes(), {"X": features[350:].astype(np.float32)}
    )
    assert prediction.shape == (len(features) - 350, 1)


def clipprune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_train_is_repeatable_to_the_byte(tmp_path, digits_csv):
    params = json.dumps({"model": {"type": "softmax"}, "epochs": 3, "seed": 1})
    outputs = []
    for name in ("a.onnx", "b.onnx"):
        result = clipprune(
            "train", str(digits_csv), "-o", str(tmp_path / name), "--params", params, "--json"
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["training"]["metric"] == "accuracy"
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"model": {"type": "linear"}}, "model.type linear is a regressor"),
        ({"label": "nope"}, "label column 'nope' is not in the header"),
        ({"learning_rate": 0}, "learning_rate: Input should be greater than 0"),
        ({"prune": {"threshold": 0.1, "schedule": "gradual"}}, "give sparsity, not threshold"),
        (
            {"optimizer": "sgd", "learning_rate": 10, "clip": {"mode": "none"}},
            "training diverged at step",
        ),
    ],
)
def test_cli_train_refusals_are_one_line(tmp_path, digits_csv, params, message):
    result = clipprune(
        "train", str(digits_csv), "-o", str(tmp_path / "m.onnx"), "--params", json.dumps(params)
    )
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
