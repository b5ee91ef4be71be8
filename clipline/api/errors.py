"""The job API's error answers: one body shape, one code enum, one handler per source.

Owns :func:`error_response` (every 4xx/5xx body is :class:`clipline_core.schema.ErrorBody`
with a :class:`clipline_core.errors.ErrorCode`), the documented error responses of the
routes (``AUTH_RESPONSES``, ``JOB_RESPONSES``) and :func:`install_handlers`, which maps
:class:`clipline_core.errors.ApiError`, validation errors, HTTP errors and an unreachable
Redis or queue to those bodies. Must not import the routes, the services or the factory.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import redis
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import KombuError
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipline_core.errors import ApiError, ErrorCode
from clipline_core.schema import (
    ErrorBody,
    ErrorDetail,
    ErrorInfo,
)

log = logging.getLogger("clipline.api")
T = TypeVar("T")


def error_response(
    status: int,
    code: ErrorCode | str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    details: list[ErrorDetail] | None = None,
    job_id: str | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorInfo(code=code, message=message, details=details, job_id=job_id))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def doc(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: doc("missing or unknown API key"),
    403: doc("the API key lacks the scope this route needs"),
    429: doc("rate limit exceeded (see Retry-After)"),
    503: doc("Redis or the queue is unreachable"),
}
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    404: doc("no such job (or it belongs to another API key)"),
    422: doc("invalid path parameter"),
}


def install_handlers(app: FastAPI) -> None:
    """Every error becomes ``{\"error\": {\"code\", \"message\", ...}}``."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(
            exc.status,
            exc.code,
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
                message=str(e.get("msg", "invalid")),
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
        code = {
            404: ErrorCode.NOT_FOUND,
            405: ErrorCode.METHOD_NOT_ALLOWED,
            400: ErrorCode.MALFORMED_BODY,
        }.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        return error_response(
            exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)
        )

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
