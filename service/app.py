"""The FastAPI app factory: `create_app(settings)`; no module-level app, no globals."""

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.params import PruneParams, TrainParams
from schemas.report import Report
from schemas.vocabulary import Backend
from service import ops, routes
from service.artifacts import ArtifactStore
from service.context import Backend as JobBackend
from service.context import ServiceContext
from service.job_ends import JobEnds
from service.local_backend import LocalBackend
from service.logs import configure_logging, request_id
from service.metrics import Metrics
from service.problems import ProblemBodyLimit, install_handlers
from service.settings import Settings
from service.store import UPLOADING, JobStore, aware, now

log = logging.getLogger("clipprune.http")
EXPIRY_INTERVAL_S = 300
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # echoed in headers and logs: nothing else
PROBES = frozenset({"/livez", "/readyz", "/metrics"})  # healthy probes log at debug only
COUNT_INTERVAL_S = 1.0


class RequestContext:
    """Request id (X-Request-ID in and out), one JSON log line and metrics per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], template, str(status)).inc()
            probe = scope["path"] in PROBES and status < 400
            log.log(
                logging.DEBUG if probe else logging.INFO,
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
            request_id.reset(token)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated document, plus the params and report schemas the form fields carry."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=app.description
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (PruneParams, TrainParams, Report):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(definition.pop("$defs", {}))
            components[model.__name__] = definition
        app.openapi_schema = schema
    return app.openapi_schema


def _celery_backend(settings: Settings, store: JobStore, ends: JobEnds) -> JobBackend:
    from service.celery_backend import CeleryBackend  # celery is imported only when chosen

    return CeleryBackend(settings, store)


# What runs the jobs, by CLIPPRUNE_BACKEND: one factory per name of the Backend vocabulary.
BACKENDS: dict[Backend, Callable[[Settings, JobStore, JobEnds], JobBackend]] = {
    "local": LocalBackend,
    "celery": _celery_backend,
}


def make_backend(settings: Settings, store: JobStore, ends: JobEnds) -> JobBackend:
    return BACKENDS[settings.backend](settings, store, ends)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.database)
        artifacts = ArtifactStore(settings.data_dir)

        await asyncio.to_thread(_sweep_orphans, store, artifacts, settings.worker_lease_s)

        ends = JobEnds()
        backend = make_backend(settings, store, ends)
        app.state.context = ServiceContext(settings, store, artifacts, backend, metrics, ends)
        if not settings.keys:
            log.warning(
                "no API keys configured (CLIPPRUNE_API_KEYS): the service is open to anyone "
                "who can reach it"
            )
        await backend.start()
        expiry = asyncio.create_task(_expire(store, artifacts, settings.job_ttl_s))
        counting = asyncio.create_task(_count_finished(store, metrics))
        log.info("clipprune ready", extra={"path": str(settings.data_dir)})
        try:
            yield
        finally:
            expiry.cancel()
            counting.cancel()
            await backend.stop()

    app = FastAPI(
        title="clipprune",
        version="0.1.0",
        description="Makes models smaller: magnitude pruning and gradient-clipped training. "
        "Every job answers 202 with a Location to poll; errors are application/problem+json.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    install_handlers(app, settings.max_upload_bytes)
    app.include_router(routes.router)
    app.include_router(ops.router)
    ops.mount_assets(app)
    app.add_middleware(ProblemBodyLimit, max_body_size=settings.max_upload_bytes)
    app.add_middleware(RequestContext, metrics=metrics)
    return app


def _sweep_orphans(store: JobStore, artifacts: ArtifactStore, lease_s: float) -> None:
    """Remove the job directories whose job is gone: those with no job row (a crash between a
    DELETE's or expiry's row and its files), and those of a reservation not renewed for a
    lease (a crash during the upload's copy; the row is given back too, as a submit would).

    No grace period beyond the lease, even with several API processes on one data directory
    and database (the Celery backend): a submit's row is committed before its directory is
    made and renewed while the upload lasts, so a directory listed before its row is read,
    and found without one or with a lapsed one, belongs to no upload under way.
    """
    cutoff = now() - timedelta(seconds=lease_s)
    for job_id in artifacts.job_ids():
        row = store.get(job_id)
        if row is not None and row.status == UPLOADING and aware(row.heartbeat_at) < cutoff:
            store.release(job_id)
        elif row is not None:
            continue
        artifacts.delete(job_id)
        log.warning("removed the directory of a job that is gone", extra={"job_id": job_id})


async def _expire(store: JobStore, artifacts: ArtifactStore, ttl_s: float) -> None:
    def expire_once() -> None:
        for job_id in store.expired(ttl_s):
            store.delete(job_id)  # the row first, as DELETE does: reads 404 rather than fail
            artifacts.delete(job_id)

    while True:
        try:
            await asyncio.to_thread(expire_once)
        except Exception:  # a database hiccup must not end expiry for the process's life
            log.exception("expiring old jobs failed; trying again later")
        await asyncio.sleep(EXPIRY_INTERVAL_S)


async def _count_finished(store: JobStore, metrics: Metrics) -> None:
    """Count jobs into the metrics as they finish, whichever process finished them."""
    since = now()
    counted: set[str] = set()
    while True:
        await asyncio.sleep(COUNT_INTERVAL_S)
        try:
            rows = await asyncio.to_thread(store.finished_since, since)
        except Exception:  # counted on the next round
            log.exception("counting finished jobs failed")
            continue
        for row in rows:
            if row.id in counted:
                continue
            counted.add(row.id)
            metrics.jobs.labels(row.kind, row.status).inc()
            if row.started_at is not None and row.finished_at is not None:
                seconds = (row.finished_at - row.started_at).total_seconds()
                metrics.job_seconds.labels(row.kind).observe(seconds)
        if rows:
            # rows finished in the same instant as the newest stay in `counted` one more round
            newest = max(aware(row.finished_at) for row in rows)  # type: ignore[type-var]
            counted = {row.id for row in rows if aware(row.finished_at) == newest}
            since = newest
