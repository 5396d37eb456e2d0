"""Job entry points: every backend (command line, process pool, Celery) runs jobs through these.

A job directory holds the caller's files under input/ and receives model.onnx and report.json
(workers/jobs/files.py). Progress goes to a callback as (stage, fraction); the backend decides
where it is shown or stored. JOB_KINDS names, for each job kind, its parameters and its entry
point: the one table a backend needs.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from schemas.params import PruneParams, TrainParams
from schemas.report import Report
from schemas.vocabulary import JobKind
from workers.jobs.files import (
    EVAL_DATA,
    INPUT_DIR,
    MODEL_IN,
    MODEL_OUT,
    REPORT_OUT,
    TRAIN_DATA,
    remove_attempt_files,
    write_atomically,
)
from workers.jobs.progress import Progress, no_progress
from workers.jobs.prune import run_prune_job
from workers.jobs.train import run_train_job


@dataclass(frozen=True)
class JobEntry:
    params: type[BaseModel]  # what the job's params are validated as
    run: Callable[[Path, BaseModel, Progress], Report]


JOB_KINDS: dict[JobKind, JobEntry] = {
    "prune": JobEntry(PruneParams, run_prune_job),  # type: ignore[arg-type]
    "train": JobEntry(TrainParams, run_train_job),  # type: ignore[arg-type]
}


__all__ = [
    "EVAL_DATA",
    "INPUT_DIR",
    "JOB_KINDS",
    "MODEL_IN",
    "MODEL_OUT",
    "REPORT_OUT",
    "TRAIN_DATA",
    "JobEntry",
    "Progress",
    "no_progress",
    "remove_attempt_files",
    "run_prune_job",
    "run_train_job",
    "write_atomically",
]
