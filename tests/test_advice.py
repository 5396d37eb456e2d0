"""Advice in a report's notes: each rule with a job that triggers it and one that does not,
run through the job entry points on real models and data."""

from html import escape
from pathlib import Path

import numpy as np
import pytest
from server import submit
from sklearn.datasets import load_diabetes

from schemas.params import PruneParams, TrainParams
from schemas.report import Report
from workers.jobs import run_prune_job, run_train_job


def csv_bytes(features: np.ndarray, labels: np.ndarray, label_first: bool = False) -> bytes:
    names = [f"p{i}" for i in range(features.shape[1])]
    columns = np.c_[labels, features] if label_first else np.c_[features, labels]
    header = ",".join(["y", *names] if label_first else [*names, "y"])
    rows = "\n".join(",".join(f"{v:g}" for v in row) for row in columns)
    return f"{header}\n{rows}\n".encode()


def prune_notes(job_dir: Path, model, digits, **params) -> list[str]:
    features, labels = digits
    (job_dir / "input" / "model.onnx").write_bytes(model.SerializeToString())
    eval_data = csv_bytes(features[1200:], labels[1200:])
    (job_dir / "input" / "eval_data").write_bytes(eval_data)
    return run_prune_job(job_dir, PruneParams.model_validate(params)).notes


def train_notes(job_dir: Path, data: bytes, **params) -> list[str]:
    (job_dir / "input" / "train_data").write_bytes(data)
    return run_train_job(job_dir, TrainParams.model_validate(params)).notes


def the_note(notes: list[str], words: str) -> str | None:
    found = [note for note in notes if words in note]
    assert len(found) <= 1, found
    return found[0] if found else None


SOFTMAX = {"model": {"type": "softmax"}, "epochs": 2}


# --- accuracy drop past two points without fine-tuning -------------------------------------


def test_a_large_drop_without_fine_tuning_suggests_fine_tune(job_dir, mlp_classifier, digits):
    notes = prune_notes(job_dir, mlp_classifier, digits, sparsity=0.95)
    note = the_note(notes, "without fine-tuning")
    assert note and note.startswith("accuracy fell by"), notes
    assert "fine_tune" in note and "max_accuracy_drop" in note and len(note) < 300


def test_a_small_drop_gives_no_fine_tuning_advice(job_dir, mlp_classifier, digits):
    notes = prune_notes(job_dir, mlp_classifier, digits, sparsity=0.1)
    assert the_note(notes, "without fine-tuning") is None, notes


# --- a dense file that did not shrink --------------------------------------------------------


def test_dense_pruning_says_which_encoding_shrinks_the_file(job_dir, mlp_classifier, digits):
    notes = prune_notes(job_dir, mlp_classifier, digits, sparsity=0.5)
    note = the_note(notes, "encoding dense")
    assert note, notes
    assert "1.00x" in note and "sparse" in note and "int8" in note and "structured" in note


def test_int8_gives_no_encoding_advice(job_dir, mlp_classifier, digits):
    notes = prune_notes(job_dir, mlp_classifier, digits, sparsity=0.5, encoding="int8")
    assert the_note(notes, "encoding dense") is None, notes


# --- clipping on (nearly) every step or (nearly) none ---------------------------------------


@pytest.mark.parametrize(("threshold", "share"), [(1e-4, "100%"), (1e4, "0%")])
def test_clipping_always_or_never_suggests_the_median_norm(job_dir, digits, threshold, share):
    clip = {"mode": "global_norm", "threshold": threshold}
    notes = train_notes(job_dir, csv_bytes(*digits), **SOFTMAX, clip=clip)
    note = the_note(notes, "clipping changed")
    assert note and note.startswith(f"clipping changed {share} of steps"), notes
    median = note.split("median gradient norm ")[1].split(")")[0]
    assert f"set clip.threshold near {median}" in note


def test_clipping_some_steps_gives_no_advice(job_dir, tmp_path, digits):
    data = csv_bytes(*digits)
    probe = tmp_path / "probe"
    (probe / "input").mkdir(parents=True)
    (probe / "input" / "train_data").write_bytes(data)
    median = run_train_job(probe, TrainParams.model_validate(SOFTMAX)).training.clip.grad_norm_p50
    clip = {"mode": "global_norm", "threshold": median}
    assert the_note(train_notes(job_dir, data, **SOFTMAX, clip=clip), "clipping changed") is None


# --- the label column and task that were chosen ---------------------------------------------


def test_a_label_in_the_first_column_is_named_when_the_last_was_used(job_dir, digits):
    features, labels = digits
    notes = train_notes(job_dir, csv_bytes(features * 16, labels, label_first=True), **SOFTMAX)
    note = the_note(notes, "label column")
    assert note == (
        "trained classification (task auto: 17 distinct integer labels, at most 20) on label "
        "column 'p63' (the last column; set label to choose another); set task or label if "
        "either is not what you meant"
    ), notes


def test_regression_chosen_by_auto_says_why(job_dir):
    features, target = load_diabetes(return_X_y=True)
    notes = train_notes(job_dir, csv_bytes(features, target / 100), **SOFTMAX | {"model": {}})
    note = the_note(notes, "label column")
    assert note and note.startswith("trained regression (task auto: the labels have fractions)")


def test_label_and_task_both_given_need_no_word(job_dir, digits):
    features, labels = digits
    data = csv_bytes(features, labels, label_first=True)
    notes = train_notes(job_dir, data, **SOFTMAX, label="y", task="classification")
    assert the_note(notes, "label column") is None, notes


# --- a classification with more classes than a tenth of the rows ----------------------------


def test_a_classifier_with_a_class_per_few_rows_is_questioned(job_dir):
    features, target = load_diabetes(return_X_y=True)  # 442 rows, 214 distinct targets
    notes = train_notes(job_dir, csv_bytes(features, target), **SOFTMAX, task="classification")
    note = the_note(notes, "classes on")
    assert note and note.startswith("214 classes on 442 rows"), notes
    assert "task regression" in note


def test_ten_classes_on_many_rows_is_not_questioned(job_dir, digits):
    notes = train_notes(job_dir, csv_bytes(*digits), **SOFTMAX)
    assert the_note(notes, "classes on") is None, notes


# --- over HTTP: the advice is in the report and on its page ---------------------------------


def test_advice_reaches_the_report_and_its_page(client, digits_upload):
    job = submit(client, "prune", digits_upload, {"sparsity": 0.5}, wait=30).json()
    assert job["status"] == "succeeded", job
    note = the_note(client.get(job["links"]["report"]).json()["notes"], "encoding dense")
    assert note
    assert escape(note) in client.get(job["links"]["report_html"]).text


# --- outputs far from the original's on generated noise (no eval_data) ---------------------


def noise_report(job_dir: Path, model, sparsity: float) -> Report:
    (job_dir / "input" / "model.onnx").write_bytes(model.SerializeToString())
    report = run_prune_job(job_dir, PruneParams(sparsity=sparsity))
    assert report.accuracy is None and report.generated_check is not None
    return report


def test_outputs_far_off_on_noise_ask_for_real_inputs(job_dir, mlp_classifier):
    report = noise_report(job_dir, mlp_classifier, 0.95)
    scores = report.generated_check.scores
    assert scores.original - scores.compressed > 0.1  # 95% of the weights gone
    note = the_note(report.notes, "on generated noise the outputs moved")
    assert note and f"({scores.metric} {scores.compressed:.3g})" in note, report.notes
    assert "eval_data" in note and len(note) < 300


def test_outputs_close_on_noise_give_no_such_advice(job_dir, mlp_classifier):
    report = noise_report(job_dir, mlp_classifier, 0.1)
    assert the_note(report.notes, "on generated noise the outputs moved") is None, report.notes
