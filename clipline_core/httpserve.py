"""The metrics endpoint of processes that are not web services: ``/metrics`` and probes.

The GPU daemon, the workers and the callback worker only need Prometheus to scrape them
and Kubernetes to probe them. :func:`serve` runs ``prometheus_client``'s own WSGI app
(:func:`prometheus_client.make_wsgi_app`: content negotiation, OpenMetrics, gzip,
``name[]`` filtering) on its threaded ``wsgiref`` server from a daemon thread, with two
probe routes beside it: ``/readyz`` (take traffic?) and ``/healthz`` (alias ``/livez``:
restart me?), each decided by a callable the process supplies; 200 when true, 503 when
false. Any other path is 404. Binds ``Settings.metrics_host``: 127.0.0.1 for the local
stack, 0.0.0.0 in pods (the chart and the operator set it).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


def probe_app(
    metrics: Callable[[dict[str, Any], StartResponse], Iterable[bytes]],
    ready: Callable[[], bool],
    live: Callable[[], bool],
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """A WSGI app: ``metrics`` on ``/metrics``, the probes on theirs, 404 elsewhere."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path in ("/healthz", "/livez"):
            ok = live()
            body = b"ok\n" if ok else b"stalled\n"
        elif path == "/readyz":
            ok = ready()
            body = b"ready\n" if ok else b"not ready\n"
        else:
            ok, body = False, b"not found\n"
            start_response("404 Not Found", _text_headers(body))
            return [body]
        start_response("200 OK" if ok else "503 Service Unavailable", _text_headers(body))
        return [body]

    return app


def _text_headers(body: bytes) -> list[tuple[str, str]]:
    return [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]


def serve(
    registry: Collector,
    port: int,
    host: str = "127.0.0.1",
    ready: Callable[[], bool] = lambda: True,
    live: Callable[[], bool] = lambda: True,
) -> ThreadingWSGIServer:
    """Serve ``registry`` and the probes on ``host:port`` (0: a free port) from a daemon
    thread; return the server (``.server_port``; stop with ``shutdown()`` and
    ``server_close()``). Raises :class:`OSError` when the address is taken."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, sockaddr = info[0][0], info[0][4]

    class Server(ThreadingWSGIServer):
        address_family = family

    app = probe_app(make_wsgi_app(registry), ready, live)
    server = make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
