"""Job entry points: every backend (command line, process pool, Celery) runs jobs through these.

A job directory holds the caller's files under input/ and receives model.onnx and report.json.
Progress goes to a callback as (stage, fraction); the backend decides where it is shown or stored.
"""

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto

from schemas.params import PruneParams, TrainParams
from schemas.report import (
    AccuracyReport,
    LatencyReport,
    OnnxReport,
    Report,
    SizeReport,
)
from schemas.vocabulary import Task
from workers.compress.prune import float_param_count, float_params, layer_report
from workers.compress.search import Compressor, search, sensitivity, sensitivity_notes
from workers.errors import InputError
from workers.evaluate import runtime as evaluation
from workers.evaluate.data import read_table
from workers.graph.load import opsets, parse_model, sha256
from workers.jobs.train import train_model
from workers.nn.fit import EpochProgress, training_report

Progress = Callable[[str, float], None]

INPUT_DIR = "input"
MODEL_IN = "model.onnx"
EVAL_DATA = "eval_data"
TRAIN_DATA = "train_data"
MODEL_OUT = "model.onnx"
REPORT_OUT = "report.json"


def no_progress(stage: str, fraction: float) -> None:
    """The default progress callback: progress goes nowhere."""


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one, never half of it."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        # A write cut short (a full disk) must not keep what it wrote: the half file would
        # hold the space the disk needs back until the job expired.
        partial.unlink(missing_ok=True)
        raise


def gzip_size(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=6, mtime=0))


def size_report(original: bytes, compressed: bytes, params: int, nonzero: int) -> SizeReport:
    return SizeReport(
        original_bytes=len(original),
        compressed_bytes=len(compressed),
        ratio=len(original) / len(compressed),
        original_gzip_bytes=gzip_size(original),
        compressed_gzip_bytes=gzip_size(compressed),
        params=params,
        nonzero_params=nonzero,
        sparsity=1.0 - nonzero / params if params else 0.0,
    )


def onnx_report(data: bytes) -> OnnxReport:
    model = ModelProto.FromString(data)
    try:
        onnx.checker.check_model(model)
        checker = "passed"
    except onnx.checker.ValidationError as exc:
        checker = str(exc).strip().splitlines()[0]
    return OnnxReport(
        ir_version=model.ir_version,
        opsets=opsets(model),
        checker=checker,
        model_sha256=sha256(data),
    )


def _evaluate(
    original: bytes,
    compressed: bytes,
    feeds: dict[str, np.ndarray],
    labels: np.ndarray | None,
    task: Task,
) -> tuple[AccuracyReport, LatencyReport]:
    original_session = evaluation.session(original)
    compressed_session = evaluation.session(compressed)
    accuracy = evaluation.compare(
        evaluation.run(original_session, feeds),
        evaluation.run(compressed_session, feeds),
        labels,
        task,
    )
    return accuracy, evaluation.latency(original_session, compressed_session, feeds)


def _finish(job_dir: Path, model: bytes, report: Report, progress: Progress) -> Report:
    write_atomically(job_dir / MODEL_OUT, model)
    write_atomically(job_dir / REPORT_OUT, report.model_dump_json(indent=2).encode())
    progress("done", 1.0)
    return report


def _epoch_progress(progress: Progress, start: float, end: float) -> EpochProgress:
    def on_epoch(done: int, total: int) -> None:
        progress(f"epoch {done}/{total}", start + (end - start) * done / total)

    return on_epoch


def run_prune_job(job_dir: Path, params: PruneParams, progress: Progress = no_progress) -> Report:
    """Prune input/model.onnx (fine-tuning on input/train_data when params.fine_tune is set);
    evaluate on input/eval_data if present, else on generated inputs. With max_accuracy_drop,
    search the sparsity; with sensitivity, also scan each layer alone."""
    inputs = job_dir / INPUT_DIR
    train_path, eval_path = inputs / TRAIN_DATA, inputs / EVAL_DATA
    if params.fine_tune is not None and not train_path.exists():
        raise InputError("fine_tune needs train_data: the data to fine-tune the pruned model on")
    progress("loading", 0.0)
    original_bytes = (inputs / MODEL_IN).read_bytes()
    model = parse_model(original_bytes)
    specs = evaluation.model_inputs(model)
    notes: list[str] = []
    validation = None
    if eval_path.exists():
        validation = evaluation.load_eval_data(eval_path, specs, params.label)
        feeds, labels = validation.features, validation.labels
    else:
        feeds, labels = evaluation.generated_feeds(specs), None
        notes.append("no eval_data: accuracy is agreement with the original on generated inputs")
    train = None
    if params.fine_tune is not None:
        train = evaluation.load_eval_data(train_path, specs, params.label)
        if validation is None:
            notes.append("no eval_data: the fine-tuning curve is measured on train_data")
    elif train_path.exists():
        notes.append("train_data was sent without fine_tune, so it was not used")
    compressor = Compressor(model, original_bytes, feeds, labels, params, train, validation)

    sweep = None
    if params.max_accuracy_drop is None:
        progress("pruning", 0.05)
        chosen = compressor.candidate(params, _epoch_progress(progress, 0.1, 0.6))
    else:
        found, sparsity, sweep = search(compressor, params.max_accuracy_drop, progress)
        if found is None:
            keep = params.model_copy(
                update={"sparsity": 0.0, "max_accuracy_drop": None, "fine_tune": None}
            )
            chosen = compressor.candidate(keep.model_copy(update={"encoding": "dense"}))
            chosen.data = original_bytes
            notes.append(
                f"no sparsity tried kept the {compressor.baseline:.4f} metric within "
                f"{params.max_accuracy_drop}; the original model is returned unchanged"
            )
        else:
            chosen = found
            notes.append(
                f"search: sparsity {sparsity} is the largest tried whose metric drops by at most "
                f"{params.max_accuracy_drop} ({len(sweep)} candidates)"
            )
    sensitivity_points = None
    if params.sensitivity:
        sensitivity_points = sensitivity(compressor, progress)
        notes += sensitivity_notes(sensitivity_points, compressor.baseline)

    progress("evaluating", 0.9)
    accuracy, latency = _evaluate(original_bytes, chosen.data, feeds, labels, params.task)
    _, nonzero_after = float_params(chosen.outcome.model)
    report = Report(
        kind="prune",
        size=size_report(original_bytes, chosen.data, chosen.outcome.params_before, nonzero_after),
        layers=chosen.outcome.layers,
        accuracy=accuracy,
        latency_ms=latency,
        onnx=onnx_report(chosen.data),
        training=chosen.training,
        sweep=sweep,
        sensitivity=sensitivity_points,
        notes=notes + chosen.notes,
    )
    progress("writing", 0.95)
    return _finish(job_dir, chosen.data, report, progress)


def run_train_job(job_dir: Path, params: TrainParams, progress: Progress = no_progress) -> Report:
    """Train on input/train_data; evaluate on input/eval_data, else on the held-out split."""
    inputs = job_dir / INPUT_DIR
    progress("loading", 0.0)
    table = read_table(inputs / TRAIN_DATA, params.label)
    progress("training", 0.05)
    outcome = train_model(table, params, _epoch_progress(progress, 0.05, 0.85))

    progress("evaluating", 0.85)
    notes = []
    eval_path = inputs / EVAL_DATA
    dense = parse_model(outcome.dense_onnx)
    if eval_path.exists():
        eval_table = evaluation.load_eval_data(
            eval_path, evaluation.model_inputs(dense), params.label
        )
        feeds, labels = eval_table.features, eval_table.labels
    else:
        split = outcome.split
        feeds = {"X": split.x_val.astype(np.float32)}
        labels = outcome.classes[split.y_val] if outcome.classes is not None else split.y_val[:, 0]
        notes.append(
            f"no eval_data: accuracy is measured on the held-out {params.validation_split:.0%}"
            " of train_data"
        )
    if params.prune is None:
        notes.append("no prune: original and compressed are the same trained model")
    elif params.prune.schedule == "gradual":
        notes.append(
            "gradual pruning: the model was pruned while it trained, so no dense model exists; "
            "original and compressed are the same pruned model"
        )
    task = "classification" if outcome.classes is not None else "regression"
    accuracy, latency = _evaluate(outcome.dense_onnx, outcome.onnx, feeds, labels, task)
    layers = [
        layer_report(f"W{index}", tuple(w.shape), w)
        for index, w in enumerate(outcome.network.weights)
    ]
    params_before = float_param_count(dense)
    _, nonzero_after = float_params(parse_model(outcome.onnx))
    report = Report(
        kind="train",
        size=size_report(outcome.dense_onnx, outcome.onnx, params_before, nonzero_after),
        layers=layers,
        accuracy=accuracy,
        latency_ms=latency,
        onnx=onnx_report(outcome.onnx),
        training=training_report(
            "accuracy" if outcome.classes is not None else "r2", params.clip, outcome.history
        ),
        notes=notes,
    )
    progress("writing", 0.95)
    return _finish(job_dir, outcome.onnx, report, progress)
