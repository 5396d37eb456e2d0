"""RFC 9457 problem details for every error the service answers with."""

import difflib
import json
import logging
from typing import Any, get_args

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.job import FieldProblem, Problem
from service.artifacts import DISK_FULL

log = logging.getLogger("clipprune.http")

MEDIA_TYPE = "application/problem+json"
# What pydantic puts before a validator's own message: the message alone says what to fix.
LIBRARY_PREFIXES = ("Value error, ", "Assertion failed, ")
TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    410: "Gone",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
    507: "Insufficient storage",
}


class ProblemError(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        errors: list[FieldProblem] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.problem = Problem(
            title=title or TITLES.get(status, "Error"), status=status, detail=detail, errors=errors
        )
        self.headers = headers


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=MEDIA_TYPE,
        headers=headers,
    )


def field_problems(
    errors: list[Any], prefix: str = "", model: type[BaseModel] | None = None
) -> list[FieldProblem]:
    """pydantic's errors as problems a person can act on: an unknown key of `model` names
    the closest known one, and pydantic's own prefixes ("Value error, ") are dropped."""
    problems = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = ".".join([prefix, *location] if prefix else location) or prefix or "request"
        message = _without_library_prefix(error.get("msg", "invalid"))
        if error.get("type") == "extra_forbidden" and model is not None and location:
            message = _unknown_key(model, location)
        problems.append(FieldProblem(field=field, message=message))
    return problems


def _without_library_prefix(message: str) -> str:
    for library_prefix in LIBRARY_PREFIXES:
        message = message.removeprefix(library_prefix)
    return message


def _unknown_key(model: type[BaseModel], location: list[str]) -> str:
    *parents, key = location
    known = _keys_at(model, parents)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    return f"unknown key {key!r}; {hint}"


def _keys_at(model: type[BaseModel], parents: list[str]) -> list[str]:
    """The keys the object at `parents` (a path of field names) takes; [] when the path leads
    to no model (a list, a dict, or a type pydantic reports by name)."""
    for name in parents:
        field = model.model_fields.get(name)
        nested = _model_in(field.annotation) if field is not None else None
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, also when it is optional (`FineTuneParams | None`)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def too_large(limit: int) -> Problem:
    return Problem(
        title="Content too large",
        status=413,
        detail=f"the request body is larger than {limit} bytes (CLIPPRUNE_MAX_UPLOAD_BYTES); "
        "send a smaller file",
    )


def install_handlers(app: FastAPI, upload_limit: int) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(_: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc.problem, exc.headers)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 413:  # Starlette's body limit, hit while the form streamed in
            return problem_response(too_large(upload_limit))
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        problem = Problem(title=TITLES.get(status, "Error"), status=status, detail=detail)
        return problem_response(problem, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_problems(list(exc.errors()))
        detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
        return problem_response(
            Problem(title="Invalid request", status=422, detail=detail, errors=errors)
        )

    @app.exception_handler(OSError)
    async def _disk_full(_: Request, exc: OSError) -> JSONResponse:
        # A full disk (an upload that cannot be stored) is the operator's to fix, not a bug:
        # say so, as a 507 the client can retry later, rather than a bare 500.
        if exc.errno not in DISK_FULL:
            raise exc  # to the handler of every other error, below
        log.error("the disk is full: %s", exc)
        problem = Problem(
            title=TITLES[507],
            status=507,
            detail="the service's disk is full; try again later",
        )
        return problem_response(problem)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        problem = Problem(
            title="Internal error", status=500, detail="an unexpected error; see the service log"
        )
        return problem_response(problem)


class ProblemBodyLimit:
    """Starlette's RequestBodyLimitMiddleware answers 413 in plain text; make it a problem.

    Wraps the limit middleware and rewrites only its own plain-text 413 response.
    """

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        from starlette.middleware.body_limit import RequestBodyLimitMiddleware

        self.app = RequestBodyLimitMiddleware(app, max_body_size=max_body_size)
        self.limit = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rewriting = False

        async def send_problem(message: Message) -> None:
            nonlocal rewriting
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                rewriting = message["status"] == 413 and headers.get(
                    b"content-type", b""
                ).startswith(b"text/plain")
                if rewriting:
                    body = self._body()
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 413,
                            "headers": [
                                (b"content-type", MEDIA_TYPE.encode()),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
            if not rewriting:
                await send(message)

        await self.app(scope, receive, send_problem)

    def _body(self) -> bytes:
        return too_large(self.limit).model_dump_json(exclude_none=True).encode()
