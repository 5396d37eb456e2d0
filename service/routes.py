"""The /v1/jobs routes: submit, wait, list, read, download, cancel."""

import asyncio
import base64
import contextlib
import json
import math
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from tempfile import SpooledTemporaryFile
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response, Security
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from schemas.job import FINISHED, Job, JobLinks, JobPage, Problem
from schemas.params import PruneParams
from schemas.report import Report
from schemas.vocabulary import JobKind
from service.artifacts import JOB_ID
from service.auth import api_key_header, authenticate
from service.context import ServiceContext, context
from service.problems import MEDIA_TYPE, ProblemError, field_problems
from service.store import JobRow, aware, new_job_id
from workers import jobs
from workers.errors import one_line
from workers.jobs import report_html

MAX_WAIT_S = 60
MAX_PARAMS_CHARS = 65536
CHUNK = 1 << 20
UPLOADS = {"prune": ("model", "eval_data", "train_data"), "train": ("train_data", "eval_data")}
REQUIRED = {"prune": "model", "train": "train_data"}
FILE_NAMES = {"model": jobs.MODEL_IN, "eval_data": jobs.EVAL_DATA, "train_data": jobs.TRAIN_DATA}
PARAMS: dict[JobKind, type[BaseModel]] = {
    kind: entry.params for kind, entry in jobs.JOB_KINDS.items()
}
# The schema under the media type the service sends, and no other: with `"model": Problem`
# FastAPI documents the body under the route's own type (application/json, text/html) and
# leaves application/problem+json without a schema, so no client could validate a problem.
PROBLEM = {"content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
# Every route: no key or a wrong one, and invalid query or form input (a problem, not
# FastAPI's HTTPValidationError, which it documents for 422 unless told otherwise).
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses={401: PROBLEM, 422: PROBLEM})


async def owner(  # async for the reason `context` is: no thread round trip per request
    ctx: Annotated[ServiceContext, Depends(context)],
    key: Annotated[str | None, Security(api_key_header)],
) -> str:
    return authenticate(key, ctx.settings.keys)


Owner = Annotated[str, Depends(owner)]
Context = Annotated[ServiceContext, Depends(context)]


# Jobs that ended without results: asking for them again will never succeed.
NO_RESULTS = frozenset({"failed", "canceled"})


def _links(row: JobRow) -> JobLinks:
    base = f"/v1/jobs/{row.id}"
    if row.status in NO_RESULTS:
        return JobLinks(self=base)
    return JobLinks(
        self=base, model=f"{base}/model", report=f"{base}/report", report_html=f"{base}/report.html"
    )


def to_job(row: JobRow) -> Job:
    return Job(
        id=row.id,
        kind=row.kind,  # type: ignore[arg-type]
        status=row.status,  # type: ignore[arg-type]
        progress=row.progress,
        stage=row.stage,
        created_at=aware(row.created_at),  # type: ignore[arg-type]
        started_at=aware(row.started_at),
        finished_at=aware(row.finished_at),
        params=row.params,
        error=Problem.model_validate(row.error) if row.error else None,
        links=_links(row),
    )


def _params_keys(model: type[BaseModel]) -> str:
    """The params field's description: the model's own, then each key with its default and
    meaning, so Swagger UI shows them beside the field (JSON in a form field is a string)."""
    summary = " ".join((model.__doc__ or "").split())
    lines = [f"{model.__name__} as a JSON object. {summary}", ""]
    for name, field in model.model_fields.items():
        lines.append(f"- `{name}` (default `{_default(field)}`): {field.description or ''}")
    lines += ["", f"The full schema is {model.__name__} under Schemas below."]
    return "\n".join(lines)


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    return json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)


def _multipart_body(kind: str) -> dict[str, Any]:
    files = {
        name: {"type": "string", "format": "binary", "description": description}
        for name, description in {
            "model": "the ONNX model to prune",
            "eval_data": "CSV (header, label last) or NPZ to measure accuracy on",
            "train_data": "CSV or NPZ: fine-tuning data for prune, the data set for train",
        }.items()
        if name in UPLOADS[kind]
    }
    example = PARAMS[kind].model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]
    params = {
        "type": "string",
        "description": _params_keys(PARAMS[kind]),
        "example": json.dumps(example),
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [REQUIRED[kind]],
                        "properties": {**files, "params": params},
                    }
                }
            },
        }
    }


def _finite(text: str) -> float:
    """JSON numbers only: Python reads 1e999 as infinity, which no parameter can mean."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


def _not_a_number(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")  # Python's json reads NaN and Infinity


def _params(kind: str, text: str | None) -> BaseModel:
    if text and len(text) > MAX_PARAMS_CHARS:
        raise ProblemError(
            400, f"params is {len(text)} characters; the limit is {MAX_PARAMS_CHARS}"
        )
    try:
        data = json.loads(text, parse_float=_finite, parse_constant=_not_a_number) if text else {}
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge integers, deep nesting
        raise ProblemError(400, f"params is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProblemError(400, "params must be a JSON object")
    try:
        return PARAMS[kind].model_validate(data)
    except ValidationError as exc:
        errors = field_problems(list(exc.errors()), prefix="params", model=PARAMS[kind])
        detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
        raise ProblemError(422, detail, title="Invalid parameters", errors=errors) from exc


def _form_inputs(kind: str, form: FormData) -> tuple[dict[str, UploadFile], BaseModel]:
    """The uploads and params of a submit form, or the problem with it."""
    repeated = sorted({key for key in form if len(form.getlist(key)) > 1})
    if repeated:
        raise ProblemError(422, f"form field(s) {', '.join(repeated)} sent more than once")
    unknown = sorted(set(form.keys()) - {*UPLOADS[kind], "params"})
    if unknown:
        raise ProblemError(
            422,
            f"unknown form field(s) {', '.join(unknown)}; this endpoint takes "
            + ", ".join([*UPLOADS[kind], "params"]),
        )
    uploads = {}
    for name in UPLOADS[kind]:
        value = form.get(name)
        if value is None:
            continue
        if not isinstance(value, UploadFile):
            raise ProblemError(422, f"{name} must be a file upload, not a text field")
        uploads[name] = value
    if REQUIRED[kind] not in uploads:
        raise ProblemError(422, f"the {REQUIRED[kind]} file is required")
    params_field = form.get("params")
    if params_field is not None and not isinstance(params_field, str):
        raise ProblemError(422, "params must be a text field holding JSON, not a file")
    params = _params(kind, params_field)
    if isinstance(params, PruneParams):
        if params.fine_tune is not None and "train_data" not in uploads:
            raise ProblemError(
                422, "params.fine_tune needs a train_data file: the data to fine-tune the model on"
            )
        measured = "max_accuracy_drop" if params.max_accuracy_drop is not None else None
        measured = measured or ("sensitivity" if params.sensitivity else None)
        if measured and "eval_data" not in uploads:
            raise ProblemError(
                422, f"params.{measured} needs an eval_data file: the metric is measured on it"
            )
        calibrated = "criterion" if params.criterion != "magnitude" else None
        calibrated = calibrated or ("reconstruct" if params.reconstruct else None)
        if calibrated and "eval_data" not in uploads:
            raise ProblemError(
                422,
                f"params.{calibrated} needs an eval_data file: its rows are the calibration inputs",
            )
    return uploads, params


def _accept(
    ctx: ServiceContext, job_id: str, params: BaseModel, uploads: dict[str, UploadFile]
) -> JobRow:
    """Files to the job directory, then the reserved row becomes queued, then the backend:
    one trip to a thread, and no half-made job (files without a row, or the reverse)
    whatever happens on the way."""
    ctx.artifacts.create(job_id)
    try:
        for name, upload in uploads.items():
            if ctx.artifacts.save_input(job_id, FILE_NAMES[name], upload.file) == 0:
                raise ProblemError(422, f"the {name} file is empty")
        row = ctx.store.activate(job_id, params.model_dump(mode="json"))
        if row is None:  # not renewed for a lease: the service could not keep up
            raise ProblemError(
                503,
                "the upload lost its place in the queue before it was stored; send it again",
                headers={"Retry-After": "10"},
            )
    except BaseException:
        ctx.artifacts.delete(job_id)
        raise
    ctx.backend.submitted(job_id)
    return row


class _SpoolingParser(MultiPartParser):
    """Starlette's multipart parser with each file part spooled (past 1 MiB, on disk) in
    `spool_dir`. Starlette has no setting for where: the spool it makes for a part is swapped
    as the part's headers end, before anything is written to it."""

    def __init__(
        self, spool_dir: Path, headers: Headers, stream: AsyncGenerator[bytes, None], **limits: int
    ) -> None:
        super().__init__(headers, stream, **limits)
        self.spool_dir = spool_dir
        self.spools: list[SpooledTemporaryFile[bytes]] = []

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        upload = self._current_part.file
        if upload is not None:  # a file part
            upload.file.close()
            spool = SpooledTemporaryFile(  # noqa: SIM115  # closed by _form, whatever happens
                max_size=self.spool_max_size, dir=self.spool_dir
            )
            self.spools.append(spool)
            upload.file = spool  # type: ignore[assignment]  # what Starlette gives UploadFile


@contextlib.asynccontextmanager
async def _form(request: Request, spool_dir: Path, kind: str) -> AsyncIterator[FormData]:
    """The submit's form, read as request.form() reads it, with its files spooled in
    `spool_dir`. Every spool is closed on the way out, a part the body cut short too; being
    unnamed temporary files, they are gone then (and after a crash)."""
    fields = len(UPLOADS[kind])
    async with contextlib.aclosing(request.stream()) as stream:
        parser = _SpoolingParser(
            spool_dir, request.headers, stream, max_files=fields, max_fields=fields + 1
        )
        try:
            yield await parser.parse()
        except MultiPartException as exc:
            raise ProblemError(400, exc.message) from exc
        finally:
            for spool in parser.spools:
                spool.close()


@contextlib.asynccontextmanager
async def _holding(ctx: ServiceContext, job_id: str) -> AsyncIterator[None]:
    """Renew the job's reservation while its upload streams in and is stored: one that is
    not renewed for a lease (the process died) is given back by the next reservation."""

    async def renew() -> None:
        while True:
            await asyncio.sleep(ctx.settings.heartbeat_s)
            with contextlib.suppress(Exception):  # a missed renewal: the next one may land
                await run_in_threadpool(ctx.store.hold, job_id)

    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()


async def _wait_for_end(
    ctx: ServiceContext, row: JobRow, ended: asyncio.Event, wait: float
) -> JobRow:
    """The job's row once it has ended, or as it is when `wait` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while row.status not in FINISHED and (left := deadline - loop.time()) > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), min(left, ctx.backend.recheck_s))
        ended.clear()  # before the read: an end told from now on wakes the next round
        latest = await run_in_threadpool(ctx.store.get, row.id)
        if latest is None:
            raise ProblemError(404, f"job {row.id} was deleted while the request waited")
        row = latest
    return row


async def _submit(
    kind: str, request: Request, ctx: ServiceContext, who: str, wait: float
) -> Response:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ProblemError(
            415, f"send multipart/form-data (got {content_type or 'no content type'})"
        )
    # A slot in the queue before the body is read, counted in the transaction that takes it:
    # uploads under way hold one each, so concurrent or slow submits cannot pass the limit.
    job_id = new_job_id()
    limit, lease_s = ctx.settings.max_queued_jobs, ctx.settings.worker_lease_s
    waiting = await run_in_threadpool(ctx.store.reserve, job_id, who, kind, limit, lease_s)
    if waiting is not None:
        raise ProblemError(
            429,
            f"{waiting} jobs are waiting or uploading, the most this service queues; "
            "try again shortly",
            headers={"Retry-After": "10"},
        )
    row: JobRow | None = None
    try:
        with ctx.ends.watch(job_id) as ended:  # before the job can start: its end cannot slip
            async with (
                _holding(ctx, job_id),
                _form(request, ctx.artifacts.spool, kind) as form,
            ):
                uploads, params = _form_inputs(kind, form)
                row = await run_in_threadpool(_accept, ctx, job_id, params, uploads)
            row = await _wait_for_end(ctx, row, ended, wait)
    finally:
        if row is None:  # the upload failed (refused, too large, cut off): its slot goes back
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(ctx.store.release, job_id)
    job = to_job(row)
    status = 200 if job.status in FINISHED else 202
    return JSONResponse(
        job.model_dump(mode="json"), status_code=status, headers={"Location": job.links.self}
    )


WaitQuery = Annotated[
    float,
    Query(ge=0, le=MAX_WAIT_S, description="Wait up to this many seconds for the job to finish"),
]
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": Job, "description": "Accepted; poll the Location"},
    200: {"model": Job, "description": "Finished within `wait`"},
    # 404: the job was deleted while the request waited for it
    **{code: PROBLEM for code in (400, 404, 413, 415, 429, 503)},
}


@router.post(
    "/prune",
    status_code=202,
    response_model=Job,
    responses=SUBMIT_RESPONSES,
    openapi_extra=_multipart_body("prune"),
    summary="Prune an ONNX model",
)
async def submit_prune(request: Request, ctx: Context, who: Owner, wait: WaitQuery = 0) -> Response:
    return await _submit("prune", request, ctx, who, wait)


@router.post(
    "/train",
    status_code=202,
    response_model=Job,
    responses=SUBMIT_RESPONSES,
    openapi_extra=_multipart_body("train"),
    summary="Train a model with gradient clipping",
)
async def submit_train(request: Request, ctx: Context, who: Owner, wait: WaitQuery = 0) -> Response:
    return await _submit("train", request, ctx, who, wait)


def _cursor(row: JobRow) -> str:
    raw = f"{aware(row.created_at).isoformat()}|{row.id}"  # type: ignore[union-attr]
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _parse_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(job_id)
        return datetime.fromisoformat(created), job_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProblemError(400, "cursor is not one this service handed out") from exc


@router.get("", response_model=JobPage, responses={400: PROBLEM}, summary="The caller's jobs")
def list_jobs(
    ctx: Context,
    who: Owner,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="From the previous page's `next`")] = None,
) -> JobPage:
    rows = ctx.store.page(who, limit + 1, _parse_cursor(cursor) if cursor else None)
    items, more = rows[:limit], len(rows) > limit
    next_url = f"/v1/jobs?limit={limit}&cursor={_cursor(items[-1])}" if more else None
    return JobPage(items=[to_job(row) for row in items], next=next_url)


def _row(ctx: ServiceContext, who: str, job_id: str) -> JobRow:
    if job_id in PARAMS:  # GET /v1/jobs/prune: a submit path taken for a job id
        raise ProblemError(
            404,
            f"{job_id} is a submit path, not a job: POST /v1/jobs/{job_id} submits one; read "
            "a job at /v1/jobs/{id} with the id the submit answered",
        )
    row = ctx.store.get(job_id, owner=who) if JOB_ID.fullmatch(job_id) else None
    if row is None:  # someone else's job is as absent as a job that never was
        raise ProblemError(404, f"no job {job_id}")
    return row


def _finished_row(ctx: ServiceContext, who: str, job_id: str) -> JobRow:
    """The row of a job whose results exist; else 409 while it may still succeed, and 410
    with its own error once it never will (asking again is no use)."""
    row = _row(ctx, who, job_id)
    if row.status in NO_RESULTS:
        raise ProblemError(410, _no_results(row))
    if row.status != "succeeded":
        raise ProblemError(
            409,
            f"job {job_id} is {row.status}; results exist once it has succeeded: poll "
            f"GET /v1/jobs/{job_id} or submit with ?wait=",
        )
    return row


def _no_results(row: JobRow) -> str:
    if row.status == "canceled" or not row.error:
        return f"job {row.id} was {row.status} and has no results"
    return one_line(f"the job failed: {row.error.get('detail', '')}")


@router.get("/{job_id}", response_model=Job, responses={404: PROBLEM})
def get_job(job_id: str, ctx: Context, who: Owner) -> Job:
    return to_job(_row(ctx, who, job_id))


MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "The ONNX file",
    },
    304: {"description": "Not modified (If-None-Match)"},
    **{code: PROBLEM for code in (404, 409, 410)},
}
# RFC 9110 §8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; etagc = %x21 / %x23-7E / obs-text
# (a comma is an etagc, so a list is parsed tag by tag, not split on commas).
ENTITY_TAG = re.compile(r'(?:W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
AFTER_TAG = re.compile(r"[ \t]*(?:,|$)")


def _entity_tags(value: str) -> set[str] | None:
    """The opaque tags of one If-None-Match line (`"a", W/"b"`), or None if it does not parse.
    Empty list elements (`, ,`) are allowed, as RFC 9110 §5.6.1 says a recipient must."""
    tags: set[str] = set()
    at = 0
    while at < len(value):
        if value[at] in ", \t":
            at += 1
            continue
        tag = ENTITY_TAG.match(value, at)
        after = tag and AFTER_TAG.match(value, tag.end())
        if not tag or not after:
            return None
        tags.add(tag.group(1))
        at = after.end()
    return tags


def _not_modified(request: Request, opaque: str) -> bool:
    """If-None-Match names the current model (RFC 9110 §13.1.2): `*` (it exists), or any tag
    of the list, on any of the header's lines, equal by weak comparison (`W/` ignored). A line
    that does not parse is ignored, as the RFC allows: the full answer is always safe."""
    for line in request.headers.getlist("if-none-match"):
        line = line.strip(" \t")
        if line == "*" or opaque in (_entity_tags(line) or ()):
            return True
    return False


def _model_answer(job_id: str, request: Request, ctx: ServiceContext, who: str) -> Response:
    """GET and HEAD of the model: the same status and headers; only GET has a body."""
    _finished_row(ctx, who, job_id)
    with _gone_is_404(job_id):
        # Opened before answering: a DELETE from now on cannot cut the download short.
        handle = ctx.artifacts.model(job_id).open("rb")
        try:
            report = json.loads(ctx.artifacts.report(job_id).read_bytes())
        except BaseException:
            handle.close()
            raise
    opaque = report["onnx"]["model_sha256"]
    etag = f'"{opaque}"'
    if _not_modified(request, opaque):
        handle.close()
        return Response(status_code=304, headers={"ETag": etag})
    headers = {
        "ETag": etag,
        "Content-Length": str(os.fstat(handle.fileno()).st_size),
        "Content-Disposition": f'attachment; filename="clipprune-{job_id}.onnx"',
    }
    if request.method == "HEAD":
        handle.close()
        return Response(media_type="application/octet-stream", headers=headers)

    def chunks() -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers)


@router.get(
    "/{job_id}/model",
    response_class=Response,  # not JSON: the default class documents application/json for 200
    responses=MODEL_RESPONSES,
    summary="Download the compressed ONNX model",
)
def get_model(job_id: str, request: Request, ctx: Context, who: Owner) -> Response:
    return _model_answer(job_id, request, ctx, who)


# HEAD: the GET's headers (Content-Length, ETag, 304 and problems alike) without the body. Not
# in the OpenAPI document: it is GET's own semantics (RFC 9110 §9.3.2), not another operation.
@router.head("/{job_id}/model", response_class=Response, include_in_schema=False)
def head_model(job_id: str, request: Request, ctx: Context, who: Owner) -> Response:
    return _model_answer(job_id, request, ctx, who)


@contextlib.contextmanager
def _gone_is_404(job_id: str) -> Iterator[None]:
    """The job was deleted (or expired) between reading its row and its files."""
    try:
        yield
    except FileNotFoundError as exc:
        raise ProblemError(404, f"no job {job_id}") from exc


@router.get(
    "/{job_id}/report",
    response_model=Report,
    responses={code: PROBLEM for code in (404, 409, 410)},
    summary="Size and accuracy report",
)
def get_report(job_id: str, ctx: Context, who: Owner) -> Response:
    _finished_row(ctx, who, job_id)
    with _gone_is_404(job_id):
        return Response(ctx.artifacts.report(job_id).read_bytes(), media_type="application/json")


@router.get(
    "/{job_id}/report.html",
    response_class=HTMLResponse,
    responses={code: PROBLEM for code in (404, 409, 410)},
    summary="The report as a page",
)
def get_report_html(job_id: str, ctx: Context, who: Owner) -> HTMLResponse:
    row = _finished_row(ctx, who, job_id)
    page = ctx.artifacts.report_html(job_id)
    with _gone_is_404(job_id):
        if not page.exists():  # drawn on first request, then served from the job's directory
            report = Report.model_validate_json(ctx.artifacts.report(job_id).read_bytes())
            max_drop = row.params.get("max_accuracy_drop")
            html = report_html.render(row.id, row.kind, report, max_drop)
            jobs.write_atomically(page, html.encode())
        return HTMLResponse(page.read_text())


@router.delete(
    "/{job_id}",
    status_code=204,
    responses={404: PROBLEM},
    summary="Cancel the job if it is queued or running, and delete it with its files",
)
def delete_job(job_id: str, ctx: Context, who: Owner) -> Response:
    row = _row(ctx, who, job_id)
    if row.status not in FINISHED:
        ctx.store.cancel(job_id)
        ctx.backend.cancel(job_id)
    ctx.store.delete(job_id)  # the row first: from now on every read is a 404, not a half file
    ctx.ends.ended(job_id)  # a request waiting on it answers 404 now
    ctx.artifacts.delete(job_id)
    return Response(status_code=204)
