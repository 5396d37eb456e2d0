"""Job directories on disk: uploads streamed in, results read out, whole jobs removed."""

import errno
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

from workers import jobs

CHUNK = 1 << 20
JOB_ID = re.compile(r"[0-9a-f]{32}")  # what new_job_id() makes; anything else is no job
# The errors a write gets when the disk (or the user's quota on it) is full: neither the
# caller's fault nor a bug, and gone once space is freed.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        # Where multipart uploads spool while the request streams in: on the data directory's
        # disk, which /readyz checks, not the system's temporary directory.
        self.spool = root / "uploads"
        self.spool.mkdir(exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def job_ids(self) -> list[str]:
        """The ids of the job directories there are (other entries are not the store's)."""
        with os.scandir(self.root) as entries:
            return [
                entry.name
                for entry in entries
                if JOB_ID.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
            ]

    def create(self, job_id: str) -> Path:
        path = self.job_dir(job_id)
        (path / jobs.INPUT_DIR).mkdir(parents=True)
        return path

    def save_input(self, job_id: str, name: str, source: BinaryIO) -> int:
        """Copy an upload into the job's input/ in chunks; returns its size in bytes."""
        target = self.job_dir(job_id) / jobs.INPUT_DIR / name
        size = 0
        with target.open("wb") as out:
            while chunk := source.read(CHUNK):
                out.write(chunk)
                size += len(chunk)
        return size

    def model(self, job_id: str) -> Path:
        return self.job_dir(job_id) / jobs.MODEL_OUT

    def report(self, job_id: str) -> Path:
        return self.job_dir(job_id) / jobs.REPORT_OUT

    def report_html(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "report.html"

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
