"""A tiny threaded HTTP endpoint for ``/metrics``, ``/healthz`` and ``/readyz``.

The GPU daemon and the workers are not web services; they only need Prometheus to
scrape them and Kubernetes to probe them. This serves exactly that from a daemon
thread, with readiness decided by a callable the process supplies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/livez"):
            ok = self.server.live()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"stalled\n", "text/plain")
        elif path == "/readyz":
            ok = self.server.ready()
            self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
        else:
            self._reply(404, b"not found\n", "text/plain")

    def _reply(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    ready: Callable[[], bool]
    live: Callable[[], bool]


def serve(
    port: int,
    ready: Callable[[], bool] = lambda: True,
    host: str = "0.0.0.0",
    registry: CollectorRegistry = REGISTRY,
    live: Callable[[], bool] = lambda: True,
) -> _Server:
    """Serve on ``host:port`` from a daemon thread; return the server (``.server_port``).

    ``ready`` decides ``/readyz`` (take traffic?), ``live`` decides ``/healthz`` and
    ``/livez`` (restart me?): a process whose main loop is stuck should fail ``live``.
    """
    server = _Server((host, port), _Handler)
    server.registry = registry
    server.ready = ready
    server.live = live
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
