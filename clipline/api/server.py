"""How the job API is served: uvicorn, with every phase of a connection bounded in time.

uvicorn alone arms no timer on a connection until it has sent a first response: a
client that opens connections and sends nothing, or drips its headers a byte at a
time, holds each one for as long as it likes. :class:`BoundedHttpProtocol` (uvicorn's
httptools protocol) gives each request ``api_header_timeout_s`` to get its headers in,
counted from the connection's opening for the first request and from the first byte
for later ones, and caps their size (:data:`MAX_HEAD_BYTES`, 431): past either it
answers and closes the connection. The body has ``api_body_timeout_s`` once the headers
are in (:class:`clipline.api.middleware.BodyGuard`, 408); an idle keep-alive connection
is closed after ``api_keep_alive_s``; each process serves at most
``api_max_connections`` connections and requests at once (uvicorn answers 503 beyond).

Owns :class:`ServerConfig` (a uvicorn config that carries the header timeout to the
protocol, also into worker processes), :func:`server_config` (the one place the
server's limits are set, for ``clipline api`` and the tests) and :func:`run`. Must not
import the routes, the services or the factory (the app comes in as an import string
or an object).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from clipline_core.errors import ErrorCode
from clipline_core.settings import Settings

#: The most bytes a request line and headers may take together (431 past it).
MAX_HEAD_BYTES = 64 * 1024


class ServerConfig(uvicorn.Config):
    """A uvicorn config with the request-header deadline (seconds, 0: none)."""

    def __init__(self, app: Any, *, header_timeout_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s


def _answer(status: int, reason: str, code: ErrorCode, message: str) -> bytes:
    body = json.dumps({"error": {"code": code.value, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on request headers."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s = float(getattr(config, "header_timeout_s", 0.0))
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # bytes of a request's head have arrived, not all of it
        self._head_bytes = 0

    # -- the head's deadline ---------------------------------------------------------
    def _arm(self) -> None:
        if self._head_timer is None and self.header_timeout_s > 0:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _busy(self) -> bool:
        """A response to an earlier request on this connection is still being sent."""
        return self.cycle is not None and not self.cycle.response_complete

    def _timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._in_head and not self._busy():
            message = f"the request headers did not arrive within {self.header_timeout_s:g} s"
            self.transport.write(
                _answer(408, "Request Timeout", ErrorCode.REQUEST_TIMEOUT, message)
            )
        self.transport.close()

    # -- protocol and parser callbacks -------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._in_head:
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._disarm()
            if not self._busy():
                message = f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"
                self.transport.write(
                    _answer(
                        431, "Request Header Fields Too Large", ErrorCode.INVALID_REQUEST, message
                    )
                )
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()


def server_config(
    settings: Settings, app: Any, host: str, port: int, **kwargs: Any
) -> ServerConfig:
    """The uvicorn config of the API for ``settings`` (``kwargs`` go to uvicorn as given)."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": BoundedHttpProtocol,
        "ws": "none",
        "timeout_keep_alive": max(1, settings.api_keep_alive_s),
        "limit_concurrency": settings.api_max_connections or None,
        "access_log": settings.api_access_log,
        "backlog": 2048,
        "header_timeout_s": settings.api_header_timeout_s,
    }
    options.update(kwargs)
    return ServerConfig(app, **options)


def run(config: ServerConfig) -> bool:
    """Serve until SIGTERM/SIGINT in ``config.workers`` processes; False if it never started."""
    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return True
    server = uvicorn.Server(config)
    server.run()
    return bool(server.started)
