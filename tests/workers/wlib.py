"""Helpers of the worker tests: a real local HTTP server, generated media, settings.

:class:`Origin` is a real HTTP server on 127.0.0.1 (a thread of the test process)
whose routes serve files, fail a given number of times first, reset connections,
stall, hold a request until the test releases it, redirect, or accept PUT uploads. It
counts the requests per path, so tests can see retries and duplicate work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import socket
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from clipline_core.settings import Settings
from workers import ffmpeg as ffmpeg_tool


@dataclasses.dataclass
class Route:
    body: bytes = b""
    status: int = 200
    fail_first: int = 0  # answer ``fail_status`` to the first N requests
    fail_status: int = 503
    reset_first: int = 0  # close the connection without an answer N times
    gate: threading.Event | None = None  # hold the request until set
    stall_s: float = 0.0  # send headers, then wait this long before the body
    no_length: bool = False  # no Content-Length (connection-close framing)
    declared_length: int | None = None
    location: str | None = None  # a redirect
    put_statuses: list[int] = dataclasses.field(default_factory=list)  # PUT answers in turn
    hits: int = 0
    uploads: list[tuple[dict[str, str], bytes]] = dataclasses.field(default_factory=list)
    entered: threading.Event = dataclasses.field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _route(self) -> Route | None:
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            route = self.server.routes.get(path)
            if route is not None:
                route.hits += 1
        return route

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            self._answer(404, b"no such route\n")
            return
        route.entered.set()
        if route.gate is not None:
            route.gate.wait(120)
        if route.reset_first > 0:
            route.reset_first -= 1
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if route.fail_first > 0:
            route.fail_first -= 1
            self._answer(route.fail_status, b"try again\n")
            return
        if route.location:
            self.send_response(302)
            self.send_header("Location", route.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(route.status)
        if route.no_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            length = route.declared_length
            self.send_header("Content-Length", str(len(route.body) if length is None else length))
        self.end_headers()
        if route.stall_s:
            self.wfile.flush()
            time.sleep(route.stall_s)
        with contextlib.suppress(OSError):
            self.wfile.write(route.body)

    def do_PUT(self) -> None:
        route = self._route()
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length else b""
        if route is None:
            self._answer(404, b"")
            return
        status = route.put_statuses.pop(0) if route.put_statuses else 200
        if status == 200:
            route.uploads.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self._answer(status, b"")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Route]
    lock: threading.Lock


class Origin:
    """A real HTTP server on loopback; ``add(path, ...)`` defines what a path does."""

    def __init__(self) -> None:
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.routes = {}
        self.server.lock = threading.Lock()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, path: str, **kw: Any) -> Route:
        route = Route(**kw)
        self.server.routes[path] = route
        return route

    def file(self, path: str, src: Path, **kw: Any) -> str:
        self.add(path, body=src.read_bytes(), **kw)
        return self.base + path

    def close(self) -> None:
        for route in self.server.routes.values():
            if route.gate is not None:
                route.gate.set()
        self.server.shutdown()
        self.server.server_close()


def worker_settings(base: Settings, **changes: Any) -> Settings:
    """Fast-failing fetch settings for tests (few, quick retries)."""
    return base.replace(
        fetch_retries=2, fetch_connect_timeout_s=2.0, fetch_read_timeout_s=2.0, **changes
    )


@dataclasses.dataclass(frozen=True)
class Clips:
    """Videos the tests make themselves with OpenCV."""

    mjpeg: Path  # 10 s, 24 fps, 320x240 MJPEG AVI (parallel-eligible)
    tiny: Path  # 2 s, 12 fps, 160x120
    product: Path


@dataclasses.dataclass(frozen=True)
class FfClips:
    """Videos made with ffmpeg (None when it is not installed)."""

    h264: Path | None
    vfr: Path | None
    rotated: Path | None
    plain: Path | None  # the unrotated source of ``rotated``


def ffmpeg_exe() -> str | None:
    """The ffmpeg the tests make media with: the one the workers render with (the
    imageio-ffmpeg wheel's, else one on PATH), so no system ffmpeg is needed."""
    tool = ffmpeg_tool.find("auto")
    return tool.path if tool is not None else shutil.which("ffmpeg")


def _ffmpeg(*args: str) -> None:
    ffmpeg = ffmpeg_exe()
    assert ffmpeg is not None
    subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-y", *args], check=True)


def need(path: Path | None, why: str = "ffmpeg is not installed") -> Path:
    if path is None:
        pytest.skip(why)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def corrupt_avi_frame(src: Path, dest: Path, frame: int) -> Path:
    """Copy an AVI with the data of video frame ``frame`` zeroed (a break mid-file)."""
    data = bytearray(src.read_bytes())
    movi = data.find(b"movi")
    pos, seen = movi + 4, -1
    while True:
        pos = data.find(b"00dc", pos)
        assert pos > 0, "frame not found"
        seen += 1
        if seen == frame:
            break
        pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little")
    size = int.from_bytes(data[pos + 4 : pos + 8], "little")
    data[pos + 8 : pos + 8 + size] = bytes(size)
    dest.write_bytes(bytes(data))
    return dest


from clipline_core.procs import pid_alive  # noqa: E402, F401 - tests import it from here
