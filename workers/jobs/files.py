"""The job directory: the caller's files under input/, and what a job writes beside them.

Every backend (command line, process pool, Celery) lays a job out this way.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from workers.errors import InputError

INPUT_DIR = "input"
MODEL_IN = "model.onnx"
EVAL_DATA = "eval_data"
TRAIN_DATA = "train_data"
MODEL_OUT = "model.onnx"
REPORT_OUT = "report.json"
# What an attempt writes on its way to the job's result (a prune job's candidates, the model
# while its report is made) lives in a directory of its own with this prefix: a job delivered
# twice may run twice at once (a lease that lapsed while its worker lived), and neither run may
# take or delete the other's files. Gone when the attempt ends; one whose worker died leaves
# its own, which the job's next run, or its end, removes (remove_attempt_files).
ATTEMPT_PREFIX = ".attempt-"


@contextmanager
def upload_field(field: str) -> Iterator[None]:
    """Input errors raised inside name the upload `field` ("eval_data: not a readable ..."):
    one reader serves every field, so only the job knows which one it was reading."""
    try:
        yield
    except InputError as exc:
        raise type(exc)(f"{field}: {exc}") from exc


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


@contextmanager
def attempt_dir(job_dir: Path) -> Iterator[Path]:
    """A directory of this attempt's own in the job directory, removed when it ends."""
    path = Path(tempfile.mkdtemp(prefix=ATTEMPT_PREFIX, dir=job_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_attempt_files(job_dir: Path) -> None:
    """Every attempt's directory: for whoever ends a job, or takes it over from a run whose
    worker died, so that they do not hold disk until the job expires."""
    for attempt in job_dir.glob(f"{ATTEMPT_PREFIX}*"):
        shutil.rmtree(attempt, ignore_errors=True)
