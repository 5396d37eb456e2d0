"""Job entry points: every backend (command line, process pool, Celery) runs jobs through these.

A job directory holds the caller's files under input/ and receives model.onnx and report.json.
Progress goes to a callback as (stage, fraction); the backend decides where it is shown or stored.
"""

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import ModelProto

from schemas.params import PruneParams
from schemas.report import OnnxReport, Report, SizeReport
from workers import evaluation
from workers.encoding import encode
from workers.errors import InputError
from workers.onnx_model import opsets, parse_model, sha256
from workers.prune import float_params, prune_model

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
    partial.write_bytes(data)
    os.replace(partial, path)


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


def run_prune_job(job_dir: Path, params: PruneParams, progress: Progress = no_progress) -> Report:
    """Prune input/model.onnx; evaluate on input/eval_data if present, else on generated inputs."""
    inputs = job_dir / INPUT_DIR
    if params.fine_tune is not None or (inputs / TRAIN_DATA).exists():
        raise InputError("fine_tune and train_data are not supported by this version yet")
    if params.max_accuracy_drop is not None:
        raise InputError("max_accuracy_drop is not supported by this version yet")
    progress("loading", 0.0)
    original_bytes = (inputs / MODEL_IN).read_bytes()
    model = parse_model(original_bytes)
    specs = evaluation.model_inputs(model)
    eval_path = inputs / EVAL_DATA
    notes: list[str] = []
    if eval_path.exists():
        table = evaluation.load_eval_data(eval_path, specs, params.label)
        feeds, labels = table.features, table.labels
    else:
        feeds, labels = evaluation.generated_feeds(specs), None
        notes.append("no eval_data: accuracy is agreement with the original on generated inputs")

    progress("pruning", 0.1)
    outcome = prune_model(model, params)
    progress("encoding", 0.5)
    compressed_bytes, encoding_notes = encode(outcome.model, params.encoding, outcome.pruned)

    progress("evaluating", 0.6)
    original_session = evaluation.session(original_bytes)
    compressed_session = evaluation.session(compressed_bytes)
    accuracy = evaluation.compare(
        evaluation.run(original_session, feeds),
        evaluation.run(compressed_session, feeds),
        labels,
        params.task,
    )
    progress("timing", 0.8)
    latency = evaluation.latency(original_session, compressed_session, feeds)

    progress("writing", 0.95)
    params_before, _ = float_params(model)
    _, nonzero_after = float_params(outcome.model)
    report = Report(
        kind="prune",
        size=size_report(original_bytes, compressed_bytes, params_before, nonzero_after),
        layers=outcome.layers,
        accuracy=accuracy,
        latency_ms=latency,
        onnx=onnx_report(compressed_bytes),
        notes=notes + outcome.notes + encoding_notes,
    )
    write_atomically(job_dir / MODEL_OUT, compressed_bytes)
    write_atomically(job_dir / REPORT_OUT, report.model_dump_json(indent=2).encode())
    progress("done", 1.0)
    return report
