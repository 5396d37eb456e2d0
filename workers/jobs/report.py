"""Report assembly shared by the job kinds: sizes, the ONNX facts, the two models evaluated
side by side, and the files a finished job leaves."""

import os
from pathlib import Path

import onnx
from isal import isal_zlib
from onnx import ModelProto

from schemas.report import AccuracyReport, LatencyReport, OnnxReport, Report, SizeReport
from schemas.vocabulary import MetricChoice, Task
from workers.evaluate.data import EvalData
from workers.evaluate.metrics import plan_scoring, score_outputs
from workers.evaluate.runtime import Feeds, ModelSource, latency, run, session
from workers.graph.load import opsets, sha256
from workers.jobs.advice import Facts, advise
from workers.jobs.files import MODEL_OUT, REPORT_OUT, write_atomically
from workers.jobs.progress import Progress

# ISA-L's deflate at its level 1: the gzip format any gunzip reads, about 20x faster than
# zlib's level 6 (which took 20 of a 270 MB model's 34 s job); the size is within 0.2% of
# zlib's on dense weights and up to ~8% larger on pruned ones. schemas/report.py says so.
GZIP_LEVEL = 1
GZIP_WBITS = 31  # deflate in a gzip wrapper (header and CRC), as `gzip` writes
GZIP_CHUNK = 1 << 24  # compressed piece by piece: only the count is kept, never the output


def gzip_size(data: bytes) -> int:
    """Bytes of `data` as a gzip file, counted without holding the compressed copy."""
    deflate = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, GZIP_WBITS)
    view = memoryview(data)
    size = sum(
        len(deflate.compress(view[start : start + GZIP_CHUNK]))
        for start in range(0, len(view), GZIP_CHUNK)
    )
    return size + len(deflate.flush())


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
    # The checker gets the bytes, which it parses in C++: given a ModelProto it would serialize
    # a copy first. The facts are read before it runs, and the parsed model let go.
    model = ModelProto.FromString(data)
    ir_version, model_opsets = model.ir_version, opsets(model)
    del model
    try:
        onnx.checker.check_model(data)
        checker = "passed"
    except onnx.checker.ValidationError as exc:
        checker = str(exc).strip().splitlines()[0]
    return OnnxReport(
        ir_version=ir_version,
        opsets=model_opsets,
        checker=checker,
        model_sha256=sha256(data),
    )


def latency_pair(original: ModelSource, compressed: ModelSource, feeds: Feeds) -> LatencyReport:
    """Both models' onnxruntime latency on the same feeds."""
    return latency(original, compressed, feeds)


def score_pair(
    original: ModelSource,
    compressed: ModelSource,
    evaluation: EvalData,
    metric: MetricChoice,
    task: Task,
) -> AccuracyReport:
    """Both models run on the same inputs, every output scored; one session at a time."""
    reference = run(session(original), evaluation.runs)
    scoring = plan_scoring(reference, evaluation.labels, metric, task)
    return score_outputs(scoring, reference, run(session(compressed), evaluation.runs))


# The compressed model while its report is made: onnxruntime reads it from here, and no
# backend picks it up, so a job that fails or is killed meanwhile leaves no model.onnx.
STAGED_MODEL = ".model.onnx.unreported"


def stage_model(job_dir: Path, model: bytes) -> Path:
    """Write the compressed model where finish_report will put it in place; its path."""
    path = job_dir / STAGED_MODEL
    write_atomically(path, model)
    return path


def finish(job_dir: Path, model: bytes, report: Report, progress: Progress, facts: Facts) -> Report:
    """Write the model and its report, advice added to its notes, where the backend picks
    them up."""
    stage_model(job_dir, model)
    return finish_report(job_dir, report, progress, facts)


def finish_report(job_dir: Path, report: Report, progress: Progress, facts: Facts) -> Report:
    """Put the staged model in place and write its report, advice added to its notes: the
    report is a job's last file."""
    report = report.model_copy(update={"notes": [*report.notes, *advise(report, facts)]})
    os.replace(job_dir / STAGED_MODEL, job_dir / MODEL_OUT)
    write_atomically(job_dir / REPORT_OUT, report.model_dump_json(indent=2).encode())
    progress("done", 1.0)
    return report
