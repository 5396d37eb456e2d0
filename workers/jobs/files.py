"""The job directory: the caller's files under input/, and what a job writes beside them.

Every backend (command line, process pool, Celery) lays a job out this way.
"""

import os
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
# The files a prune job writes and judges on its way to the one it returns, in a directory of
# this prefix per attempt; gone when the attempt ends (one whose worker died leaves its own,
# which the job's next run, or its end, removes: remove_attempt_files).
CANDIDATES_PREFIX = ".candidates-"


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
