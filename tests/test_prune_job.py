"""The prune job entry point and the `clipprune prune` command, end to end on files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import gemm_mlp
from helpers import run

from schemas import PruneParams, Report
from workers.errors import InputError, InvalidDataError, InvalidModelError
from workers.jobs import run_prune_job
from workers.jobs.files import ATTEMPT_PREFIX


@pytest.fixture
def digits_files(tmp_path: Path, mlp_classifier, digits) -> tuple[Path, Path]:
    features, labels = digits
    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_classifier.SerializeToString())
    eval_csv = tmp_path / "eval.csv"
    header = ",".join([f"p{i}" for i in range(64)] + ["digit"])
    rows = np.c_[features[1200:], labels[1200:]]
    np.savetxt(eval_csv, rows, delimiter=",", header=header, comments="")
    return model, eval_csv


def stage(job_dir: Path, model: bytes, eval_data: bytes | None = None) -> None:
    (job_dir / "input" / "model.onnx").write_bytes(model)
    if eval_data is not None:
        (job_dir / "input" / "eval_data").write_bytes(eval_data)


def test_job_writes_model_and_report_and_reports_progress(job_dir, digits_files):
    model, eval_csv = digits_files
    stage(job_dir, model.read_bytes(), eval_csv.read_bytes())
    seen: list[tuple[str, float]] = []
    report = run_prune_job(job_dir, PruneParams(sparsity=0.5), lambda s, f: seen.append((s, f)))

    assert Report.model_validate_json((job_dir / "report.json").read_text()) == report
    out = (job_dir / "model.onnx").read_bytes()
    # evaluated in the attempt's own directory, then put in place; the directory went with it
    assert not list(job_dir.glob(f"{ATTEMPT_PREFIX}*"))
    onnx.checker.check_model(onnx.load_model_from_string(out))
    assert seen[0] == ("loading", 0.0) and seen[-1] == ("done", 1.0)
    assert [f for _, f in seen] == sorted(f for _, f in seen)

    assert report.accuracy.metric == "accuracy" and report.accuracy.samples == 597
    assert report.accuracy.original > 0.9  # the digits MLP is a real classifier
    assert report.accuracy.delta == pytest.approx(
        report.accuracy.compressed - report.accuracy.original
    )
    assert report.size.original_bytes == model.stat().st_size
    assert report.size.compressed_bytes == len(out)
    assert report.size.compressed_gzip_bytes < report.size.original_gzip_bytes
    hidden_and_output = 64 * 48 + 48 * 24 + 24 * 10
    assert report.size.params == hidden_and_output + 48 + 24 + 10
    assert report.size.nonzero_params == pytest.approx(hidden_and_output / 2 + 82, abs=3)
    assert [layer.name for layer in report.layers] == [
        "coefficient",
        "coefficient1",
        "coefficient2",
    ]
    assert all(abs(layer.sparsity - 0.5) < 1e-3 for layer in report.layers)
    assert report.onnx.checker == "passed" and report.onnx.opsets["ai.onnx"] == 21
    assert report.latency_ms.original > 0 and report.latency_ms.compressed > 0
    assert 3 <= report.latency_ms.runs <= 30 and report.latency_ms.batch == 597
    assert report.generated_check is None


def test_zero_sparsity_reports_no_change(job_dir, digits_files):
    model, eval_csv = digits_files
    stage(job_dir, model.read_bytes(), eval_csv.read_bytes())
    report = run_prune_job(job_dir, PruneParams(sparsity=0.0))
    assert report.accuracy.delta == 0.0 and report.accuracy.agreement == 1.0
    assert report.accuracy.max_abs_diff == 0.0


def test_without_eval_data_accuracy_is_null_and_noise_only_checks_it_runs(job_dir, mlp_regressor):
    model, features, _ = mlp_regressor
    stage(job_dir, model.SerializeToString())
    report = run_prune_job(job_dir, PruneParams(sparsity=0.7))
    assert report.accuracy is None and report.latency_ms is None
    (note,) = [note for note in report.notes if note.startswith("accuracy not measured")]
    # the check on generated noise: one value per sample, so the relative error of all outputs
    generated = np.random.default_rng(0).standard_normal((64, features.shape[1]))
    (before,) = run(model, {"X": generated.astype(np.float32)})
    (after,) = run((job_dir / "model.onnx").read_bytes(), {"X": generated.astype(np.float32)})
    error = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert f"relative_error against the original is {error:.4g} on output 'variable'" in note
    assert "not its accuracy" in note and note.endswith("send eval_data")
    check = report.generated_check
    assert (check.samples, check.runs) == (64, 1) and "samples: 64, runs: 1" in note
    assert check.scores.compressed == pytest.approx(error, rel=1e-4)


def test_without_eval_data_a_model_with_unknown_dims_is_not_measured(job_dir):
    model = gemm_mlp([8, 16, 2], trans_b=0)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"  # [N, features]
    stage(job_dir, model.SerializeToString())
    report = run_prune_job(job_dir, PruneParams(sparsity=0.5, encoding="sparse"))
    assert report.accuracy is None and report.latency_ms is None
    (note,) = [note for note in report.notes if note.startswith("accuracy not measured")]
    assert "'X' has 2 unknown dims" in note and "send eval_data" in note
    assert (job_dir / "model.onnx").exists()
    with pytest.raises(InputError, match=r"max_accuracy_drop needs a metric.*send eval_data"):
        run_prune_job(job_dir, PruneParams(max_accuracy_drop=0.01))


def test_regression_with_labels_reports_r2(job_dir, mlp_regressor):
    model, features, target = mlp_regressor
    buffer = Path(job_dir / "data.npz")
    np.savez(buffer, X=features, y=target)
    stage(job_dir, model.SerializeToString(), buffer.read_bytes())
    report = run_prune_job(job_dir, PruneParams(sparsity=0.3))
    assert report.accuracy.metric == "r2"
    assert report.accuracy.original > 0.5  # a fitted regressor, scored on its data
    assert report.accuracy.compressed != report.accuracy.original


def test_bad_model_and_bad_data_fail_with_typed_errors(job_dir, digits_files):
    model, _ = digits_files
    stage(job_dir, b"\x08\x07garbage")
    with pytest.raises(InvalidModelError):
        run_prune_job(job_dir, PruneParams(sparsity=0.5))
    stage(job_dir, model.read_bytes(), b"a,b\n1,2\n")
    with pytest.raises(InvalidDataError, match="takes 64 features"):
        run_prune_job(job_dir, PruneParams(sparsity=0.5))
    assert not (job_dir / "model.onnx").exists() and not (job_dir / "report.json").exists()


def clipprune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_prunes_with_flags_and_prints_the_report(tmp_path, digits_files):
    model, eval_csv = digits_files
    out = tmp_path / "pruned.onnx"
    result = clipprune(
        "prune", str(model), "-o", str(out), "--sparsity", "0.9", "--encoding", "sparse",
        "--eval-data", str(eval_csv), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["size"]["compressed_bytes"] == out.stat().st_size
    assert report["size"]["ratio"] > 2
    assert all(abs(layer["sparsity"] - 0.9) < 1e-3 for layer in report["layers"])


def test_cli_params_json_and_report_file(tmp_path, digits_files):
    model, _ = digits_files
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    params = json.dumps({"threshold": 0.05, "granularity": "structured"})
    result = clipprune(
        "prune", str(model), "-o", str(out), "--params", params, "--report", str(report)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert json.loads(report.read_text())["size"]["compressed_bytes"] == out.stat().st_size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity", "1.5"], "sparsity: Input should be less than 1"),
        (["--params", "{not json"], "--params is not valid JSON"),
        (["--params", '{"sparsity": 0.5, "threshold": 0.1}'], "exactly one of"),
    ],
)
def test_cli_bad_parameters_exit_2_with_one_line(tmp_path, digits_files, args, message):
    model, _ = digits_files
    result = clipprune("prune", str(model), "-o", str(tmp_path / "o.onnx"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not an onnx model at all", "not a readable ONNX model"),
        (None, "no such file"),
    ],
)
def test_cli_bad_model_files_exit_2_with_one_line(tmp_path, content, message):
    model = tmp_path / "in.onnx"
    if content is not None:
        model.write_bytes(content)
    result = clipprune("prune", str(model), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5")
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_compressed_model_that_fails_where_the_original_runs_is_clipprunes_defect():
    """Scoring runs the original first; a compressed file that then fails to load is a bug in
    clipprune (int8 compaction once wrote such files for early PyTorch exports): the job must
    fail as one, not blame the caller's file with a 4xx nor succeed with a note."""
    from workers.evaluate.data import EvalData
    from workers.jobs.report import score_pair

    original = gemm_mlp([4, 8, 3], trans_b=0)
    broken = onnx.ModelProto()
    broken.CopyFrom(original)
    broken.graph.node[0].op_type = "NoSuchOperator"
    runs = [{"X": np.ones((2, 4), np.float32)}]
    evaluation = EvalData(runs, None)
    original_bytes = original.SerializeToString()
    with pytest.raises(RuntimeError, match="the compressed model fails where the original runs"):
        score_pair(original_bytes, broken.SerializeToString(), evaluation, "auto", "auto")
    with pytest.raises(InputError):  # the caller's own model failing stays the caller's
        score_pair(broken.SerializeToString(), original_bytes, evaluation, "auto", "auto")
