"""Operations: liveness, readiness, metrics, and Swagger UI served from the service itself."""

import shutil
from pathlib import Path
from typing import Annotated

import fastapi_offline
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.context import ServiceContext, context

router = APIRouter(tags=["operations"])
ASSETS = "/docs/assets"
READINESS = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"enum": ["ok", "unavailable"]},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@router.get("/livez", summary="The process answers")
def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Database, worker pool and disk are usable",
    # Documented, 503 included: an orchestrator's probe and a client read the same document.
    responses={
        200: {"content": {"application/json": {"schema": READINESS}}},
        503: {
            "content": {"application/json": {"schema": READINESS}},
            "description": "A check failed; `checks` says which",
        },
    },
)
def readyz(ctx: Annotated[ServiceContext, Depends(context)]) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        ctx.store.ping()
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not ready"; the message says which
        checks["database"] = f"unreachable: {type(exc).__name__}"
    checks["workers"] = "ok" if ctx.backend.alive else "dispatcher stopped"
    free = shutil.disk_usage(ctx.settings.data_dir).free
    minimum = ctx.settings.min_free_disk_bytes
    checks["disk"] = "ok" if free >= minimum else f"{free} bytes free, below {minimum}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,  # documents text/plain, what Prometheus' format is
)
def metrics(ctx: Annotated[ServiceContext, Depends(context)]) -> Response:
    ctx.metrics.queue_depth.set(ctx.store.waiting())  # queued or uploading: what the limit counts
    ctx.metrics.running.set(ctx.store.count("running"))
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/docs", include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title="clipprune API",
        swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS}/favicon.png",
    )


def mount_assets(app: FastAPI) -> None:
    # Swagger UI 5 (it reads the OpenAPI 3.1 FastAPI writes), as fastapi-offline packages it.
    assets = StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static")
    app.mount(ASSETS, assets, name="docs-assets")
