"""Shared parts of the tests that run a real local stack under a real Prometheus.

Owns the processes a test starts (:class:`Procs`), the job API client with the stack's
key (:class:`Api`), a loopback callback receiver and the small HTTP/Prometheus helpers.
Imports the project only through :mod:`clipline.preview` (Prometheus range queries).
"""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from clipline import preview

TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as rsp:
        return str(rsp.read().decode())


def wait_http(url: str, what: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until ``url`` answers; fail at once if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        try:
            get(url, 2)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{what} not reachable at {url}")


class Procs:
    """Processes started by the test (logs under ``logs``), stopped in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.items: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.items.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self.items):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.items):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def state(view: dict[str, Any]) -> str | None:
    return view.get("state") or view.get("status")


class Api:
    """The job API over HTTP with the local stack's key."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The JSON answer; an HTTP error's body with its ``http_status``."""
        request = urllib.request.Request(
            f"{self.url}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as rsp:
                return json.load(rsp)
        except urllib.error.HTTPError as exc:
            return {"http_status": exc.code, **json.loads(exc.read() or b"{}")}

    def submit(self, video: Path | str, image: Path, priority: str, callback: str = "") -> str:
        body: dict[str, Any] = {
            "video_url": str(video),
            "image_urls": [str(image)],
            "priority": priority,
        }
        if callback:
            body["callback_url"] = callback
        payload = self.call("POST", "/v1/jobs", body)
        assert "http_status" not in payload, payload
        return str(payload.get("job_id") or payload["id"])

    def wait(self, job: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            view: dict[str, Any] = self.call("GET", f"/v1/jobs/{job}")
            if state(view) in TERMINAL:
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} did not finish: {view}")
            time.sleep(0.3)


def callback_receiver(received: list[str]) -> ThreadingHTTPServer:
    """A loopback HTTP server that accepts job callbacks (records their paths)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def has_data(prom: str, expr: str, start: float, end: float) -> bool:
    """Whether ``expr`` has any finite sample in ``[start, end]``."""
    series = preview.query_range(prom, expr, start, end, 1.0)
    return any(math.isfinite(v) for _, points in series for _, v in points)
