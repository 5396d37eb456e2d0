"""What the routes share: built once by the app's lifespan, reached through request.app.state."""

from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from service.artifacts import ArtifactStore
from service.job_ends import JobEnds
from service.metrics import Metrics
from service.settings import Settings
from service.store import JobStore


class Backend(Protocol):
    """What the routes need from whatever runs the jobs (local pool or Celery)."""

    # How often a request waiting on a job reads its row again without being told of an end:
    # the poll where jobs end in other processes, a safety net where this one ends them all.
    recheck_s: float

    @property
    def alive(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def submitted(self, job_id: str) -> None: ...

    def cancel(self, job_id: str) -> None: ...


@dataclass
class ServiceContext:
    settings: Settings
    store: JobStore
    artifacts: ArtifactStore
    backend: Backend
    metrics: Metrics
    ends: JobEnds


# async, though it awaits nothing: FastAPI runs a plain-def dependency on a worker thread, a
# round trip per request (and per dependency) for what is an attribute read.
async def context(request: Request) -> ServiceContext:
    return request.app.state.context
