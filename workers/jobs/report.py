"""Report assembly shared by the job kinds: sizes, the ONNX facts, the two models evaluated
side by side, and the files a finished job leaves."""

import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

import onnx
from isal import isal_zlib

from schemas.report import AccuracyReport, LatencyReport, OnnxReport, Report, SizeReport
from schemas.vocabulary import MetricChoice, Task
from workers.evaluate.data import EvalData
from workers.evaluate.metrics import plan_scoring, score_outputs
from workers.evaluate.runtime import Feeds, ModelSource, compressed_outputs, latency, outputs
from workers.graph.load import opsets
from workers.graph.wire import model_header
from workers.jobs.advice import Facts, advise
from workers.jobs.files import MODEL_OUT, REPORT_OUT, attempt_dir, write_atomically
from workers.jobs.progress import Progress

T = TypeVar("T")

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
            # No name here holds the piece last handed out: its reader alone lets it go.
            yield from iter(functools.partial(file.read, GZIP_CHUNK), b"")
        return
    view = memoryview(model)
    for start in range(0, len(view), GZIP_CHUNK):
        yield view[start : start + GZIP_CHUNK]


def source_size(model: ModelSource) -> int:
    return model.stat().st_size if isinstance(model, Path) else len(model)


def gzip_size(
    model: ModelSource,
    digest: "hashlib._Hash | None" = None,
    turn: AbstractContextManager[object] | None = None,
) -> int:
    """Bytes of the model as a gzip file, counted without holding the compressed copy;
    `digest`, when given, is fed the same bytes on the way (one read of the file for both).
    Each piece is read, compressed and let go holding `turn` (Beside.turn)."""
    deflate = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, GZIP_WBITS)
    size = 0
    stream = pieces(model)
    turn = turn if turn is not None else contextlib.nullcontext()
    while True:
        with turn:
            piece = next(stream, None)
            if piece is None:
                return size + len(deflate.flush())
            size += len(deflate.compress(piece))
            if digest is not None:
                digest.update(piece)
            del piece


def size_report(
    original: ModelSource,
    compressed: ModelSource,
    params: int,
    nonzero: int,
    gzip_sizes: tuple[int, int],
) -> SizeReport:
    """`gzip_sizes`: gzip_size of the original and of the compressed model."""
    return SizeReport(
        original_bytes=source_size(original),
        compressed_bytes=source_size(compressed),
        ratio=source_size(original) / source_size(compressed),
        original_gzip_bytes=gzip_sizes[0],
        compressed_gzip_bytes=gzip_sizes[1],
        params=params,
        nonzero_params=nonzero,
        sparsity=1.0 - nonzero / params if params else 0.0,
    )


def file_report(
    original: ModelSource, compressed: ModelSource, params: int, nonzero: int
) -> tuple[SizeReport, OnnxReport]:
    """The sizes of both models and the compressed one's ONNX facts. The compressed file is
    read once for both its gzip size and its SHA-256 (each had a read of its own)."""
    digest = hashlib.sha256()
    gzip_sizes = gzip_size(original), gzip_size(compressed, digest)
    size = size_report(original, compressed, params, nonzero, gzip_sizes)
    return size, onnx_report(compressed, digest.hexdigest())


def onnx_report(model: ModelSource, sha256: str) -> OnnxReport:
    # The checker gets the bytes or the file, which it parses in C++: given a ModelProto it
    # would serialize a copy first.
    header = model_header(model)
    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model)
        checker = "passed"
    except onnx.checker.ValidationError as exc:
        checker = str(exc).strip().splitlines()[0]
    return OnnxReport(
        ir_version=header.ir_version,
        opsets=opsets(header),
        checker=checker,
        model_sha256=sha256,
    )


def job_threads() -> int:
    """The threads a job may keep busy at once: in a service worker its WORKER_THREADS, which
    the worker's runner puts in OMP_NUM_THREADS before any job (service/runner.py); on the
    command line, every core this process may run on."""
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return int(limit) if limit.isdigit() and int(limit) > 0 else len(os.sched_getaffinity(0))


class Beside:
    """A second thread for work that releases the GIL (gzip and SHA-256 over a file) while the
    job goes on (onnxruntime, which runs on the job's own thread): reading a 270 MB model for
    the report beside the check on generated inputs took 2 s one after the other. With one
    thread allowed (job_threads), each piece runs on the job's thread instead, when its result
    is first asked for. Pieces run one at a time, in the order handed over. `turn`: held by the
    job while it needs the memory or the machine to itself; a piece that takes it between its
    steps waits meanwhile, holding nothing large."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, "clipprune-beside") if job_threads() > 1 else None
        self.turn = threading.RLock()  # reentrant: with one thread, pieces run on the job's

    def submit(self, work: Callable[[], T]) -> Callable[[], T]:
        """`work` started (or put off, with one thread); the call that returns its result."""
        if self.pool is None:
            return functools.cache(work)
        return self.pool.submit(work).result

    def __enter__(self) -> "Beside":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:  # a job that failed meanwhile waits for the piece running
            self.pool.shutdown(cancel_futures=True)


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
    return score_outputs(scoring, reference, compressed_outputs(compressed, evaluation.runs))


def finish(job_dir: Path, model: bytes, report: Report, progress: Progress, facts: Facts) -> Report:
    """Write the model and its report, advice added to its notes, where the backend picks
    them up."""
    with attempt_dir(job_dir) as attempt:
        staged = attempt / MODEL_OUT
        write_atomically(staged, model)
        return finish_report(job_dir, staged, report, progress, facts)


def finish_report(
    job_dir: Path, staged: Path, report: Report, progress: Progress, facts: Facts
) -> Report:
    """Put the model staged in the attempt's directory in place and write its report, advice
    added to its notes: the report is a job's last file. Until then no backend picks the model
    up, so a job that fails or is killed while its report is made leaves no model.onnx."""
    report = report.model_copy(update={"notes": [*report.notes, *advise(report, facts)]})
    os.replace(staged, job_dir / MODEL_OUT)
    write_atomically(job_dir / REPORT_OUT, report.model_dump_json(indent=2).encode())
    progress("done", 1.0)
    return report
