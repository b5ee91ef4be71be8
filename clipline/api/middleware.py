"""ASGI middleware of the job API: body limit, content type, request metrics.

Owns :class:`BodyGuard` (413 past ``api_max_body_bytes``, 415 for a body that is not
JSON, 400 for a client that goes away mid-body, 408 ``request_timeout`` with the
connection closed for a body that does not arrive within ``api_body_timeout_s``; a
body is read, bounded the same way, whatever the method, and an answer given before
the body is in closes the connection, so a request that declares a body it never sends
cannot hold its connection) and the ``clipline_api_requests_total``
/ ``clipline_api_request_seconds`` metrics it records per route template. Builds on
:mod:`clipline.api.errors`; must not import the routes or the factory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from fastapi.responses import JSONResponse

from clipline.api.errors import error_response
from clipline_core import metrics
from clipline_core.errors import ErrorCode

log = logging.getLogger("clipline.api")
T = TypeVar("T")

#: ``clipline_api_requests_total`` / ``clipline_api_request_seconds`` (declared with their
#: owner, the API, in :mod:`clipline_core.metrics`)
REQUESTS = metrics.API_REQUESTS
REQUEST_SECONDS = metrics.API_REQUEST_SECONDS


# ---------------------------------------------------------------------------
# ASGI middleware: body limit, content type, metrics.
# ---------------------------------------------------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


_BODY_METHODS = ("POST", "PUT", "PATCH")
# An answer given before the whole body was read closes the connection: the rest of the
# body would otherwise keep it open (each byte that arrives restarts the server's
# keep-alive timer).
_CLOSE = {"Connection": "close"}


def _declares_body(scope: Scope) -> bool:
    """The request announces a body (a non-zero Content-Length, or chunked)."""
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" 0")):
            return True
    return False


class BodyGuard:
    """Caps, times and buffers request bodies, checks JSON content type, records metrics.

    ``body_timeout_s`` (0: none) bounds the whole body read, from the moment the
    headers are in.
    """

    def __init__(self, app: ASGIApp, max_body: int, body_timeout_s: float = 0.0) -> None:
        self.app = app
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s

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
            if scope["method"] in _BODY_METHODS or _declares_body(scope):
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
                    400, ErrorCode.MALFORMED_BODY, "invalid Content-Length", headers=_CLOSE
                ), receive
            if int(declared) > self.max_body:
                return self._too_large(), receive
        chunks: list[bytes] = []
        size = 0
        more = True
        try:
            async with asyncio.timeout(self.body_timeout_s if self.body_timeout_s > 0 else None):
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
        except TimeoutError:
            return error_response(
                408,
                ErrorCode.REQUEST_TIMEOUT,
                f"the request body did not arrive within {self.body_timeout_s:g} s",
                headers=_CLOSE,
            ), receive
        body = b"".join(chunks)
        if body and scope["method"] in _BODY_METHODS:
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
            headers=_CLOSE,
        )
