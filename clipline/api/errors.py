"""The job API's error answers: one body shape, one code enum, one handler per source.

Owns :func:`error_response` (every 4xx/5xx body is :class:`clipline_core.schema.ErrorBody`
with a :class:`clipline_core.errors.ErrorCode`), the documented error responses of the
routes (:func:`doc`, with an example body and the headers it carries; ``AUTH_RESPONSES``,
``JOB_RESPONSES``) and :func:`install_handlers`, which maps
:class:`clipline_core.errors.ApiError`, validation errors, HTTP errors and an unreachable
Redis or queue to those bodies. A 405 names in ``Allow`` every method the path serves
(:func:`allowed_methods`), and ``OPTIONS`` on a known path answers 204 with that list.
Must not import the routes, the services or the factory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import redis
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import KombuError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from clipline_core.errors import ApiError, ErrorCode
from clipline_core.job import SOURCE_PATTERN
from clipline_core.schema import (
    ErrorBody,
    ErrorDetail,
    ErrorInfo,
)

log = logging.getLogger("clipline.api")
T = TypeVar("T")


def error_response(
    status: int,
    code: ErrorCode,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    details: list[ErrorDetail] | None = None,
    job_id: str | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorInfo(code=code, message=message, details=details, job_id=job_id))
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True), status_code=status, headers=headers
    )


def header(
    description: str, schema: dict[str, Any] | None = None, *, required: bool = False
) -> dict[str, Any]:
    """A response header as the OpenAPI document declares it."""
    out: dict[str, Any] = {"description": description, "schema": schema or {"type": "string"}}
    if required:
        out["required"] = True
    return out


def retry_after(required: bool) -> dict[str, Any]:
    return header(
        "seconds to wait before retrying", {"type": "integer", "minimum": 1}, required=required
    )


def doc(
    description: str,
    code: ErrorCode | None = None,
    *,
    headers: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An error response of a route: the body (with an example of ``code``), its headers."""
    out: dict[str, Any] = {"model": ErrorBody, "description": description}
    if code is not None:
        example = {"error": {"code": code.value, "message": description}}
        out["content"] = {"application/json": {"example": example}}
    if headers:
        out["headers"] = headers
    return out


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: doc(
        "missing or unknown API key",
        ErrorCode.UNAUTHENTICATED,
        headers={"WWW-Authenticate": header('Bearer realm="clipline"', required=True)},
    ),
    403: doc("the API key lacks the scope this route needs", ErrorCode.FORBIDDEN),
    429: doc(
        "rate limit exceeded (see Retry-After)",
        ErrorCode.RATE_LIMITED,
        headers={"Retry-After": retry_after(True)},
    ),
    503: doc(
        "Redis or the queue is unreachable",
        ErrorCode.UNAVAILABLE,
        headers={"Retry-After": retry_after(False)},
    ),
}
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    404: doc("no such job (or it belongs to another API key)", ErrorCode.NOT_FOUND),
    422: doc("invalid path parameter", ErrorCode.INVALID_REQUEST),
}


def _message(error: Mapping[str, Any]) -> str:
    """A validation error for a person (the source pattern spelled out in words)."""
    ctx = error.get("ctx") or {}
    if error.get("type") == "string_pattern_mismatch" and ctx.get("pattern") == SOURCE_PATTERN:
        return "must not contain control characters (NUL, CR, LF, ...)"
    return str(error.get("msg", "invalid"))


def _routes(routes: Iterable[Any]) -> Iterator[BaseRoute]:
    """Every route, routers included without a prefix looked into (FastAPI wraps them)."""
    for route in routes:
        inner = getattr(route, "routes", None)
        if inner is None:
            inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None:
            yield from _routes(inner)
        elif isinstance(route, BaseRoute):
            yield route


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at the request's path, and OPTIONS."""
    methods = {"OPTIONS"}
    for route in _routes(request.app.router.routes):
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_handlers(app: FastAPI) -> None:
    """Every error becomes ``{\"error\": {\"code\", \"message\", ...}}``."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(
            exc.status,
            ErrorCode(exc.code),
            exc.message,
            headers=exc.headers,
            details=exc.details,
            job_id=exc.job_id,
        )

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        details = [
            ErrorDetail(
                loc=[p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
                message=_message(e),
            )
            for e in errors[:20]
        ]
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(
                400, ErrorCode.MALFORMED_BODY, "the body is not valid JSON", details=details
            )
        summary = "; ".join(
            f"{'.'.join(str(p) for p in d.loc[1:]) or d.loc[0] if d.loc else '?'}: {d.message}"
            for d in details[:3]
        )
        return error_response(
            422, ErrorCode.INVALID_REQUEST, f"invalid request: {summary}", details=details
        )

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette names only the first route that matches the path; a resource's
            # methods are spread over several routes (GET and DELETE /v1/jobs/{id}).
            allow = ", ".join(allowed_methods(request))
            if request.method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": allow})
            headers = {**(headers or {}), "Allow": allow}
        code = {
            404: ErrorCode.NOT_FOUND,
            405: ErrorCode.METHOD_NOT_ALLOWED,
            400: ErrorCode.MALFORMED_BODY,
        }.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("backend unavailable: %s: %s", type(exc).__name__, exc)
        return error_response(
            503,
            ErrorCode.UNAVAILABLE,
            "the job store or queue is unavailable; retry later",
            headers={"Retry-After": "1"},
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(redis.RedisError, on_unavailable)
    app.add_exception_handler(KombuError, on_unavailable)
