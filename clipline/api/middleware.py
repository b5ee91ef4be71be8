"""ASGI middleware of the job API: body limit, content type, request metrics.

Owns :class:`BodyGuard` (413 past ``api_max_body_bytes``, 415 for a body that is not
JSON, 400 for a client that goes away mid-body) and the ``clipline_api_requests_total``
/ ``clipline_api_request_seconds`` metrics it records per route template. Builds on
:mod:`clipline.api.errors`; must not import the routes or the factory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram

from clipline.api.errors import error_response
from clipline_core import constants
from clipline_core.errors import ErrorCode

log = logging.getLogger("clipline.api")
T = TypeVar("T")

REQUESTS = Counter(
    constants.Metric.API_REQUESTS_TOTAL,
    "API requests by method, route template and status",
    [constants.LABEL_METHOD, constants.LABEL_ROUTE, constants.LABEL_STATUS],
)
REQUEST_SECONDS = Histogram(
    constants.Metric.API_REQUEST_SECONDS,
    "API request latency by method and route template",
    [constants.LABEL_METHOD, constants.LABEL_ROUTE],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)


# ---------------------------------------------------------------------------
# ASGI middleware: body limit, content type, metrics.
# ---------------------------------------------------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyGuard:
    """Caps and buffers request bodies, checks JSON content type, records metrics."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                early, receive = await self._read_body(scope, receive)
                if early is not None:
                    await early(scope, receive, send_tracked)
                    return
            await self.app(scope, receive, send_tracked)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            REQUESTS.labels(method, template, str(status[0])).inc()
            REQUEST_SECONDS.labels(method, template).observe(time.perf_counter() - start)

    async def _read_body(
        self, scope: Scope, receive: Receive
    ) -> tuple[JSONResponse | None, Receive]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return error_response(
                    400, ErrorCode.MALFORMED_BODY, "invalid Content-Length"
                ), receive
            if int(declared) > self.max_body:
                return self._too_large(), receive
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = error_response(400, ErrorCode.MALFORMED_BODY, "client went away")
                return gone, receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return self._too_large(), receive
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        if body:
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json" and not ctype.endswith("+json"):
                return error_response(
                    415,
                    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                    "the request body must be JSON (Content-Type: application/json)",
                ), receive
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay

    def _too_large(self) -> JSONResponse:
        return error_response(
            413,
            ErrorCode.BODY_TOO_LARGE,
            f"the request body exceeds {self.max_body} bytes",
        )
