"""Settings from the environment, prefix CLIPPRUNE_ (see README for each)."""

import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.vocabulary import Backend

MEMORY_SHARE = 0.7  # of the machine's memory, split between the workers; the rest: API, page cache
# The default's floor, for small machines with many workers: the test suite's jobs on the
# digits models stay under 0.3 GiB; its third-party models (README) need up to ~2 GiB, so give
# a machine that small fewer workers rather than a lower limit.
MIN_WORKER_MEMORY_BYTES = 2**30


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when a container has a smaller one."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def machine_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's)."""
    return len(os.sched_getaffinity(0))


def default_worker_threads(workers: int) -> int:
    return max(1, machine_cores() // workers)


def default_worker_memory_bytes(workers: int) -> int:
    return max(MIN_WORKER_MEMORY_BYTES, int(machine_memory_bytes() * MEMORY_SHARE / workers))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIPPRUNE_", extra="ignore")

    data_dir: Path = Path("data")
    database_url: str | None = None  # default: SQLite file in data_dir
    backend: Backend = "local"
    broker_url: str = "redis://127.0.0.1:6379/0"
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    api_keys: str = ""  # comma-separated; empty runs the service open
    max_upload_bytes: int = Field(512 * 2**20, ge=1024)
    job_timeout_s: float = Field(3600, gt=0)
    # One stage of a job (loading, an epoch, evaluating, ...): past it the job fails and its
    # worker process is replaced, even when the stage is stuck in native code
    stage_timeout_s: float = Field(600, gt=0)
    max_queued_jobs: int = Field(100, ge=1)
    job_ttl_s: float = Field(7 * 24 * 3600, gt=0)  # finished jobs and their files are deleted after
    min_free_disk_bytes: int = Field(256 * 2**20, ge=0)
    broker_prefix: str = "clipprune:"  # Redis key prefix: several deployments can share a Redis
    heartbeat_s: float = Field(5, gt=0)  # how often a running job renews its lease
    worker_lease_s: float = Field(60, gt=0)  # a job not heard from for this long is requeued
    # Hard limit of one worker process's memory (RLIMIT_DATA); None: default_worker_memory_bytes
    worker_memory_bytes: int | None = Field(None, ge=256 * 2**20)
    # BLAS/OpenMP threads per worker process; None: default_worker_threads (cores / workers)
    worker_threads: int | None = Field(None, ge=1, le=1024)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> "Settings":
        if self.worker_lease_s < 3 * self.heartbeat_s:
            raise ValueError("CLIPPRUNE_WORKER_LEASE_S must be at least 3 x CLIPPRUNE_HEARTBEAT_S")
        return self

    @model_validator(mode="after")
    def _worker_memory_from_the_machine(self) -> "Settings":
        if self.worker_memory_bytes is None:
            self.worker_memory_bytes = default_worker_memory_bytes(self.workers)
        if self.worker_threads is None:
            self.worker_threads = default_worker_threads(self.workers)
        return self

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'clipprune.db').resolve()}"

    @property
    def keys(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]
