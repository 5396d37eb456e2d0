"""The command line tells a person what they got: one summary line on stderr, the report JSON
only when asked, every parameter as a flag (or through --params) with the schema's help."""

import contextlib
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from schemas.params import PruneParams, TrainParams

SUMMARY = re.compile(
    r"(?P<name>\S+) (?P<before>[\d,]+) → (?P<after>[\d,]+) bytes \((?P<ratio>\d+\.\d)x\), "
    r"(?P<metric>\w+) (?P<original>-?\d\.\d{4}) → (?P<compressed>-?\d\.\d{4})"
)


CLI = (sys.executable, "-m", "service.cli")
SOFTMAX = '{"model": {"type": "softmax"}}'


def clipprune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def write_csv(path: Path, features: np.ndarray, labels: np.ndarray, label_first: bool) -> Path:
    names = [f"p{i}" for i in range(features.shape[1])]
    columns = np.c_[labels, features] if label_first else np.c_[features, labels]
    header = ",".join(["y", *names] if label_first else [*names, "y"])
    np.savetxt(path, columns, delimiter=",", header=header, comments="", fmt="%.6g")
    return path


@pytest.fixture
def digits_files(tmp_path, mlp_classifier, digits) -> tuple[Path, Path]:
    features, labels = digits
    model = tmp_path / "digits_mlp.onnx"
    model.write_bytes(mlp_classifier.SerializeToString())
    return model, write_csv(tmp_path / "eval.csv", features[1200:], labels[1200:], False)


def test_prune_prints_one_summary_line_and_no_json(tmp_path, digits_files):
    model, eval_csv = digits_files
    out = tmp_path / "small.onnx"
    result = clipprune(
        "prune", str(model), "-o", str(out), "--sparsity", "0.5", "--encoding", "int8",
        "--eval-data", str(eval_csv),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    found = SUMMARY.fullmatch(line)
    assert found, line
    assert found["name"] == "digits_mlp.onnx" and found["metric"] == "accuracy"
    assert int(found["before"].replace(",", "")) == model.stat().st_size
    assert int(found["after"].replace(",", "")) == out.stat().st_size
    assert float(found["ratio"]) == pytest.approx(model.stat().st_size / out.stat().st_size, 0.05)


def test_the_summary_names_the_metric_a_regressor_is_scored_by(tmp_path, mlp_regressor):
    model, features, target = mlp_regressor
    path = tmp_path / "regressor.onnx"
    path.write_bytes(model.SerializeToString())
    eval_csv = write_csv(tmp_path / "eval.csv", features, target, False)
    result = clipprune(
        "prune", str(path), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.3",
        "--eval-data", str(eval_csv),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = SUMMARY.fullmatch(result.stderr.strip())
    assert found and found["metric"] == "r2", result.stderr


def test_without_eval_data_the_summary_says_accuracy_is_not_measured(tmp_path, digits_files):
    model, _ = digits_files
    result = clipprune("prune", str(model), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"digits_mlp\.onnx [\d,]+ → [\d,]+ bytes \(\d+\.\dx\), accuracy not measured",
        result.stderr.strip(),
    ), result.stderr


def test_json_goes_to_stdout_only_with_json_and_to_the_report_file(tmp_path, digits_files):
    model, eval_csv = digits_files
    report = tmp_path / "report.json"
    result = clipprune(
        "prune", str(model), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5",
        "--eval-data", str(eval_csv), "--json", "--report", str(report),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(report.read_text())
    assert SUMMARY.fullmatch(result.stderr.strip())


def test_train_prints_its_summary(tmp_path, digits):
    features, labels = digits
    data = write_csv(tmp_path / "digits.csv", features, labels, False)
    out = tmp_path / "trained.onnx"
    result = clipprune(
        "train", str(data), "-o", str(out), "--epochs", "3", "--learning-rate", "0.01",
        "--params", '{"model": {"type": "softmax"}}',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    found = SUMMARY.fullmatch(result.stderr.strip())
    assert found and found["name"] == "trained.onnx" and found["metric"] == "accuracy"
    assert float(found["original"]) > 0.8


def test_label_and_max_accuracy_drop_flags_reach_the_job(tmp_path, mlp_classifier, digits):
    features, labels = digits
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp_classifier.SerializeToString())
    eval_csv = write_csv(tmp_path / "eval.csv", features[1200:], labels[1200:], True)
    result = clipprune(
        "prune", str(model), "-o", str(tmp_path / "o.onnx"), "--max-accuracy-drop", "0.05",
        "--label", "y", "--eval-data", str(eval_csv), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sweep"]  # the search ran
    assert report["accuracy"]["metric"] == "accuracy" and report["accuracy"]["original"] > 0.8


@pytest.mark.parametrize(("command", "model"), [("prune", PruneParams), ("train", TrainParams)])
def test_every_parameter_is_a_flag_with_the_schemas_help_or_named_in_params(command, model):
    result = clipprune(command, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps help lines
    params_help = re.search(r"--params PARAMS (.*?) --", text)
    assert params_help, text
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if flag in text:
            description = " ".join(field.description.split())
            assert description in text, name
        else:
            assert name in params_help[1], f"{name}: neither a flag nor named under --params"
    if command == "prune":
        assert "--max-accuracy-drop" in text and "--label" in text
        for flag in ("--scope", "--granularity", "--encoding"):
            assert re.search(rf"{flag} \{{[\w,]+\}} \w", text), f"{flag} has no help"


def test_the_progress_bar_label_has_one_colon(tmp_path, digits):
    """On a terminal (a pseudo-terminal here) the bar reads `epoch 9/400: 12%|`, not `: :`.
    Enough epochs that tqdm, which redraws at most every 0.1 s, shows some."""
    features, labels = digits
    data = write_csv(tmp_path / "digits.csv", features, labels, False)
    out = tmp_path / "o.onnx"
    leader, follower = pty.openpty()
    # 100 columns: on a terminal of width 0 (a new pty's) tqdm draws nothing
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen(
        [*CLI, "train", str(data), "-o", str(out), "--epochs", "400", "--params", SOFTMAX],
        stderr=follower,
        stdout=subprocess.DEVNULL,
    ) as process:
        os.close(follower)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
            while chunk := os.read(leader, 4096):
                shown += chunk
    os.close(leader)
    assert process.returncode == 0
    text = shown.decode(errors="replace")
    assert re.search(r"epoch \d+/400: +\d+%\|", text), text
    assert ": :" not in text
