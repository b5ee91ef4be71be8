"""Helpers of the API tests: a live uvicorn server, API keys, local HTTP servers.

``live_api`` runs the real application under uvicorn on a free loopback port (in a
thread of the test process) against the real Redis, with its own deployment name so
its jobs and queue never mix with other tests. No worker consumes that queue: these
tests exercise the submission side. The end-to-end tests (``test_api_e2e.py``) run
the real GPU daemon and Celery worker through :class:`clipline.stack.LocalStack`.

``FileServer`` serves a directory over HTTP on 127.0.0.1 (the video and image URLs of
jobs); ``Receiver`` records callback POSTs and answers each with the next status of a
script (e.g. 500, 500, then 200).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
import uvicorn

from clipline.api.auth import entry, new_key
from clipline.api.server import server_config
from clipline.client import Client
from clipline_core import constants
from clipline_core.settings import Settings

CALLBACK_SECRET = "whsec-test-" + "x" * 24


def purge(client: redis.Redis, deployment: str) -> None:
    """Delete every Redis key of a deployment (jobs, queue lists, Kombu bindings)."""
    patterns = [
        constants.redis_prefix(deployment) + ":*",
        constants.queue_name(deployment) + "*",
        f"_kombu.binding.*{deployment}*",
        f"_kombu.binding_permanent.*{deployment}*",
    ]
    for pattern in patterns:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])


@dataclasses.dataclass
class Keys:
    full: str
    reader: str
    other: str

    def entries(self) -> str:
        return ",".join(
            [
                entry("full", self.full),
                entry("reader", self.reader, frozenset({"read"}), tenant="full"),
                entry("other", self.other),
            ]
        )


def make_keys() -> Keys:
    return Keys(full=new_key(), reader=new_key(), other=new_key())


class LiveServer:
    """uvicorn serving an ASGI app in a background thread on a free port.

    Configured as ``clipline api`` configures it (:func:`clipline.api.server.server_config`:
    its protocol, timeouts and connection limit), from ``settings``.
    """

    def __init__(self, app: Any, settings: Settings) -> None:
        config = server_config(
            settings, app, "127.0.0.1", 0, log_level="warning", access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclasses.dataclass
class Api:
    url: str
    settings: Settings
    keys: Keys
    app: Any
    server: LiveServer | None = None

    def client(self, key: str | None = None, **kwargs: Any) -> Client:
        return Client(self.url, key or self.keys.full, **kwargs)


def api_settings(settings: Settings, keys: Keys, **changes: Any) -> Settings:
    return settings.replace(
        api_keys=keys.entries(),
        callback_secret=CALLBACK_SECRET,
        api_port=0,
        **changes,
    )


@contextlib.contextmanager
def running_api(settings: Settings, keys: Keys, client: redis.Redis) -> Iterator[Api]:
    from clipline.api import create_app

    app = create_app(settings)
    server = LiveServer(app, settings)
    url = server.start()
    try:
        yield Api(url, settings, keys, app, server)
    finally:
        server.stop()
        app.state.services.close()
        purge(client, settings.deployment)


# ---------------------------------------------------------------------------
# Local HTTP servers.
# ---------------------------------------------------------------------------
class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


class FileServer:
    """Serves ``root`` at http://127.0.0.1:PORT/ from a thread.

    ``/slow/NAME`` serves ``NAME`` in 20 pieces over about ``slow_s`` seconds (a job
    whose fetch takes that long, to cancel it while it runs).
    """

    def __init__(self, root: Path, slow_s: float = 4.0) -> None:
        root = root.resolve()

        class Handler(_Quiet):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                if not self.path.startswith("/slow/"):
                    super().do_GET()
                    return
                data = (root / self.path.removeprefix("/slow/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                step = len(data) // 20 + 1
                try:
                    for i in range(0, len(data), step):
                        self.wfile.write(data[i : i + step])
                        self.wfile.flush()
                        time.sleep(slow_s / 20)
                except (BrokenPipeError, ConnectionResetError):
                    return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclasses.dataclass
class Received:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


class Receiver:
    """Records POSTs (and PUTs); answers with ``script`` statuses in turn, then ``default``."""

    def __init__(self, script: list[int] | None = None, default: int = 200) -> None:
        self.script = list(script or [])
        self.default = default
        self.received: list[Received] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with outer.cond:
                    status = outer.script.pop(0) if outer.script else outer.default
                    outer.received.append(
                        Received(time.time(), self.path, dict(self.headers.items()), body, status)
                    )
                    outer.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def wait_for(self, count: int, timeout_s: float) -> list[Received]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.received) >= count, timeout_s)
            return list(self.received)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
