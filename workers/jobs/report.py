"""Report assembly shared by the job kinds: sizes, the ONNX facts, the two models evaluated
side by side, and the files a finished job leaves."""

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from isal import isal_zlib
from onnx import ModelProto

from schemas.report import AccuracyReport, LatencyReport, OnnxReport, Report, SizeReport
from schemas.vocabulary import MetricChoice, Task
from workers.evaluate.data import EvalData
from workers.evaluate.metrics import plan_scoring, score_outputs
from workers.evaluate.runtime import Feeds, ModelSource, latency, outputs
from workers.graph.load import opsets
from workers.jobs.advice import Facts, advise
from workers.jobs.files import MODEL_OUT, REPORT_OUT, write_atomically
from workers.jobs.progress import Progress

# ISA-L's deflate at its level 1: the gzip format any gunzip reads, about 20x faster than
# zlib's level 6 (which took 20 of a 270 MB model's 34 s job); the size is within 0.2% of
# zlib's on dense weights and up to ~8% larger on pruned ones. schemas/report.py says so.
GZIP_LEVEL = 1
GZIP_WBITS = 31  # deflate in a gzip wrapper (header and CRC), as `gzip` writes
GZIP_CHUNK = 1 << 24  # compressed piece by piece: only the count is kept, never the output


def pieces(model: ModelSource) -> Iterator[bytes | memoryview]:
    """The model's bytes in GZIP_CHUNK pieces, read from its file one at a time."""
    if isinstance(model, Path):
        with model.open("rb") as file:
            while piece := file.read(GZIP_CHUNK):
                yield piece
        return
    view = memoryview(model)
    for start in range(0, len(view), GZIP_CHUNK):
        yield view[start : start + GZIP_CHUNK]


def source_size(model: ModelSource) -> int:
    return model.stat().st_size if isinstance(model, Path) else len(model)


def gzip_size(model: ModelSource) -> int:
    """Bytes of the model as a gzip file, counted without holding the compressed copy."""
    deflate = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, GZIP_WBITS)
    size = sum(len(deflate.compress(piece)) for piece in pieces(model))
    return size + len(deflate.flush())


def size_report(
    original: ModelSource, compressed: ModelSource, params: int, nonzero: int
) -> SizeReport:
    return SizeReport(
        original_bytes=source_size(original),
        compressed_bytes=source_size(compressed),
        ratio=source_size(original) / source_size(compressed),
        original_gzip_bytes=gzip_size(original),
        compressed_gzip_bytes=gzip_size(compressed),
        params=params,
        nonzero_params=nonzero,
        sparsity=1.0 - nonzero / params if params else 0.0,
    )


def onnx_report(model: ModelSource) -> OnnxReport:
    # The checker gets the bytes or the file, which it parses in C++: given a ModelProto it
    # would serialize a copy first. The facts are read before it runs, and the parsed model
    # let go.
    parsed = ModelProto.FromString(model.read_bytes() if isinstance(model, Path) else model)
    ir_version, model_opsets = parsed.ir_version, opsets(parsed)
    del parsed
    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model)
        checker = "passed"
    except onnx.checker.ValidationError as exc:
        checker = str(exc).strip().splitlines()[0]
    digest = hashlib.sha256()
    for piece in pieces(model):
        digest.update(piece)
    return OnnxReport(
        ir_version=ir_version,
        opsets=model_opsets,
        checker=checker,
        model_sha256=digest.hexdigest(),
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
    reference = outputs(original, evaluation.runs)
    scoring = plan_scoring(reference, evaluation.labels, metric, task)
    return score_outputs(scoring, reference, outputs(compressed, evaluation.runs))


# The compressed model while its report is made: onnxruntime reads it from here, and no
# backend picks it up, so a job that fails or is killed meanwhile leaves no model.onnx.
STAGED_MODEL = ".model.onnx.unreported"


def finish(job_dir: Path, model: bytes, report: Report, progress: Progress, facts: Facts) -> Report:
    """Write the model and its report, advice added to its notes, where the backend picks
    them up."""
    write_atomically(job_dir / STAGED_MODEL, model)
    return finish_report(job_dir, report, progress, facts)


def finish_report(job_dir: Path, report: Report, progress: Progress, facts: Facts) -> Report:
    """Put the staged model in place and write its report, advice added to its notes: the
    report is a job's last file."""
    report = report.model_copy(update={"notes": [*report.notes, *advise(report, facts)]})
    os.replace(job_dir / STAGED_MODEL, job_dir / MODEL_OUT)
    write_atomically(job_dir / REPORT_OUT, report.model_dump_json(indent=2).encode())
    progress("done", 1.0)
    return report
