"""Jobs and problems as the HTTP API shows them."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from schemas.vocabulary import JobKind, JobStatus

FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


class FieldProblem(BaseModel):
    field: str  # dotted path, e.g. "params.sparsity"
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[FieldProblem] | None = None


class JobLinks(BaseModel):
    # The result links are null once a job has failed or was canceled: it has no results.
    self: str
    model: str | None = None
    report: str | None = None
    report_html: str | None = None


class Job(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    stage: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    params: dict[str, Any]
    error: Problem | None
    links: JobLinks


class JobPage(BaseModel):
    items: list[Job]
    next: str | None  # URL of the next (older) page, None on the last page
