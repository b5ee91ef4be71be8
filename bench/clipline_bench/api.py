"""Benchmark: job submissions and reads per second through the HTTP API, and their latency.

``clipline bench api`` drives a running API (``--url`` and ``--api-key``; without them
it starts ``clipline api`` itself on a free loopback port, with a throw-away key and
deployment on the configured Redis, and removes that deployment's keys afterwards).
Only the submission side is measured: no worker consumes the queue. ``--concurrency``
keep-alive connections are in flight. The load generator is a minimal HTTP/1.1 client
on asyncio streams (``--client raw``, default): ``httpx.AsyncClient`` spends around a
millisecond of CPU per request or more, so on a small machine it would measure itself.
One closed-loop phase is always repeated with httpx as the client
(``post_saturate_httpx_client``), and ``--client httpx`` runs every phase with it.

Phases, in one run:

``post_saturate`` / ``get_saturate``
    closed loop: every client sends its next request as soon as the previous one is
    answered. Gives the maximum accepted rate; latency then follows Little's law
    (concurrency / rate), so it is reported but not the latency figure that matters.
``post_paced`` / ``get_paced``
    open loop at ``--rate`` requests/s over the same clients (request *i* is due at
    ``start + i / rate``); latency is measured from the due time, so a stall is not
    hidden by the clients waiting (no coordinated omission). This is the latency at
    the target load.
``healthz_saturate``
    the HTTP floor: the same closed loop on ``GET /healthz`` (no auth, no Redis).
``direct_submit``
    the floor below HTTP: :func:`workers.submit.submit` called in one thread of this
    process (job store + Celery producer), no API at all.

Output: a table (stdout, or stderr with ``--json``) and JSON (``--json`` prints it on
stdout; it is always written to ``--out``)::

    {"phases": {"post_saturate": {"rps", "p50_ms", "p99_ms", ...}, ...},
     "targets": {"submissions_per_s_ge_500": ..., "post_p99_lt_50ms_at_rate": ...}, ...}

``--quick`` (CI) sends a few hundred requests so the code cannot rot; its figures are
not meaningful. The client shares the machine with the server: on a small machine the
figures are those of both together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx

from clipline_core import constants

DEFAULT_OUT = Path("bench") / "results" / "api.json"
TARGET_RPS = 500.0
TARGET_P99_MS = 50.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("CLIPLINE_API_URL", ""))
    parser.add_argument("--api-key", default=os.environ.get("CLIPLINE_API_KEY", ""))
    parser.add_argument("--concurrency", type=int, default=50, help="clients in flight")
    parser.add_argument("--requests", type=int, default=6000, help="requests per closed phase")
    parser.add_argument("--rate", type=float, default=TARGET_RPS, help="paced phases: req/s")
    parser.add_argument("--paced-seconds", type=float, default=8.0, help="length of a paced phase")
    parser.add_argument(
        "--server-workers", type=int, default=2, help="uvicorn workers of a self-started API"
    )
    parser.add_argument("--redis-url", default="", help="Redis for a self-started API")
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: raw asyncio HTTP/1.1 (default) or httpx.AsyncClient",
    )
    parser.add_argument("--quick", action="store_true", help="a few requests (CI smoke run)")
    parser.add_argument("--json", action="store_true", help="print the JSON on stdout")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")


# ---------------------------------------------------------------------------
# A self-started API.
# ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def self_hosted(redis_url: str, workers: int) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """``(url, key, deployment, info)`` of a ``clipline api`` started for the run."""
    from clipline.api.auth import entry, new_key

    key = new_key()
    deployment = f"bench-api-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    state = tempfile.mkdtemp(prefix="clipline-bench-api-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    env.update(
        CLIPLINE_DEPLOYMENT=deployment,
        CLIPLINE_REDIS_URL=redis_url,
        CLIPLINE_API_KEYS=entry("bench", key),
        CLIPLINE_API_WORKERS=str(workers),
        CLIPLINE_STATE_DIR=state,
        CLIPLINE_API_ACCESS_LOG="0",
    )
    log = open(Path(state) / "api.log", "wb")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "clipline.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the API exited: {(Path(state) / 'api.log').read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not become ready")
            time.sleep(0.1)
        info = {
            "workers": workers,
            "loop": _have("uvloop"),
            "http": _have("httptools"),
            "pid": proc.pid,
        }
        yield url, key, deployment, info
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        if proc.poll() is None:
            proc.kill()
        log.close()
        _purge(redis_url, deployment)


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process tree (the API server and its workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def _have(module: str) -> str:
    try:
        __import__(module)
        return module
    except ImportError:
        return "asyncio" if module == "uvloop" else "h11"


def _purge(redis_url: str, deployment: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for pattern in (
            constants.redis_prefix(deployment) + ":*",
            constants.queue_name(deployment) + "*",
            f"_kombu.binding*{deployment}*",
        ):
            keys = list(client.scan_iter(match=pattern, count=2000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
    finally:
        client.close()


# ---------------------------------------------------------------------------
# Load generation.
# ---------------------------------------------------------------------------
def _job_body(i: int) -> dict[str, Any]:
    return {
        "video_url": f"https://cdn.example.com/bench/{i}.mp4",
        "image_urls": [f"https://cdn.example.com/bench/{i}.jpg"],
        "title": f"bench product {i}",
        "duration_s": 5.0,
        "priority": ("high", "normal", "low")[i % 3],
    }


class Conn(Protocol):
    """One client connection: ``request`` returns the status code and the body."""

    async def request(
        self, method: str, path: str, body: bytes | None = None, idem: str | None = None
    ) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


class RawConn:
    """HTTP/1.1 keep-alive over asyncio streams: the cheapest honest client.

    It speaks just what this API answers (``Content-Length`` bodies), so its cost per
    request is a few tens of microseconds and the figures are the server's.
    """

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port = host, port
        self.head = f"Host: {host}:{port}\r\nAuthorization: Bearer {key}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.reader, self.writer

    async def request(
        self, method: str, path: str, body: bytes | None = None, idem: str | None = None
    ) -> tuple[int, bytes]:
        reader, writer = await self._open()
        extra = b""
        if body is not None:
            extra += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        if idem is not None:
            extra += f"{constants.HEADER_IDEMPOTENCY_KEY}: {idem}\r\n".encode()
        writer.write(
            f"{method} {path} HTTP/1.1\r\n".encode() + self.head + extra + b"\r\n" + (body or b"")
        )
        try:
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionError("the server closed the connection")
            status = int(status_line.split(b" ", 2)[1])
            length = 0
            close = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                lowered = name.strip().lower()
                if lowered == b"content-length":
                    length = int(value.strip())
                elif lowered == b"connection" and value.strip().lower() == b"close":
                    close = True
            payload = await reader.readexactly(length) if length else b""
        except (OSError, ValueError, asyncio.IncompleteReadError):
            await self.close()
            raise
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


class HttpxConn:
    """The same interface over a shared ``httpx.AsyncClient``."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(
        self, method: str, path: str, body: bytes | None = None, idem: str | None = None
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if idem is not None:
            headers[constants.HEADER_IDEMPOTENCY_KEY] = idem
        resp = await self.client.request(method, path, content=body, headers=headers)
        return resp.status_code, resp.content

    async def close(self) -> None:
        return None


Request = Callable[[Conn, int], Awaitable[tuple[int, bytes]]]
_CLIENT_ERRORS = (OSError, ValueError, asyncio.IncompleteReadError, httpx.HTTPError)


async def _closed(conns: list[Conn], request: Request, total: int, ok: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(total))

    async def worker(conn: Conn) -> None:
        for i in counter:
            start = time.perf_counter()
            try:
                code = str((await request(conn, i))[0])
            except _CLIENT_ERRORS as exc:
                code = type(exc).__name__
            latencies.append(time.perf_counter() - start)
            if code != str(ok):
                errors[code] = errors.get(code, 0) + 1

    begin = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    wall = time.perf_counter() - begin
    return _stats(latencies, errors, wall)


async def _paced(
    conns: list[Conn], request: Request, rate: float, seconds: float, ok: int
) -> dict[str, Any]:
    total = max(1, int(rate * seconds))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(total))
    begin = time.perf_counter() + 0.05

    async def worker(conn: Conn) -> None:
        for i in counter:
            due = begin + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                code = str((await request(conn, i))[0])
            except _CLIENT_ERRORS as exc:
                code = type(exc).__name__
            latencies.append(time.perf_counter() - due)
            if code != str(ok):
                errors[code] = errors.get(code, 0) + 1

    await asyncio.gather(*(worker(c) for c in conns))
    wall = time.perf_counter() - begin
    out = _stats(latencies, errors, wall)
    out["offered_rps"] = rate
    return out


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def _stats(latencies: list[float], errors: dict[str, int], wall: float) -> dict[str, Any]:
    lat = sorted(latencies)
    ok = len(lat) - sum(errors.values())
    return {
        "requests": len(lat),
        "ok": ok,
        "errors": errors,
        "wall_s": round(wall, 3),
        "rps": round(ok / wall, 1) if wall > 0 else 0.0,
        "p50_ms": round(_pct(lat, 0.50) * 1e3, 2),
        "p90_ms": round(_pct(lat, 0.90) * 1e3, 2),
        "p99_ms": round(_pct(lat, 0.99) * 1e3, 2),
        "max_ms": round(lat[-1] * 1e3, 2) if lat else None,
    }


async def _drive(
    url: str, key: str, args: argparse.Namespace, log: Any, server_pid: int | None
) -> dict[str, Any]:
    quick = bool(args.quick)
    total = 300 if quick else args.requests
    seconds = 1.0 if quick else args.paced_seconds
    rate = min(args.rate, 200.0) if quick else args.rate
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    phases: dict[str, Any] = {}
    ids: list[str] = []
    run_tag = uuid.uuid4().hex[:6]
    jobs = f"{constants.API_PREFIX}/jobs"

    async def post(conn: Conn, i: int) -> tuple[int, bytes]:
        status, payload = await conn.request("POST", jobs, json.dumps(_job_body(i)).encode())
        if status == 202 and len(ids) < 10_000:
            ids.append(json.loads(payload)["id"])
        return status, payload

    async def post_idem(conn: Conn, i: int) -> tuple[int, bytes]:
        body = json.dumps(_job_body(i)).encode()
        return await conn.request("POST", jobs, body, idem=f"{run_tag}-{i}")

    async def get(conn: Conn, i: int) -> tuple[int, bytes]:
        return await conn.request("GET", f"{jobs}/{ids[i % len(ids)]}")

    async def healthz(conn: Conn, i: int) -> tuple[int, bytes]:
        return await conn.request("GET", "/healthz")

    raw: list[Conn] = [RawConn(host, port, key) for _ in range(args.concurrency)]
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30.0
    ) as client:
        shared = HttpxConn(client)
        via_httpx: list[Conn] = [shared] * args.concurrency
        conns = via_httpx if args.client == "httpx" else raw
        await _closed(conns, post, min(200, total), 202)  # warm-up
        plan: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            ("healthz_saturate", lambda: _closed(conns, healthz, total, 200)),
            ("post_saturate", lambda: _closed(conns, post, total, 202)),
            ("post_idempotent_saturate", lambda: _closed(conns, post_idem, total, 202)),
            ("get_saturate", lambda: _closed(conns, get, total, 200)),
            ("post_paced", lambda: _paced(conns, post, rate, seconds, 202)),
            ("get_paced", lambda: _paced(conns, get, rate, seconds, 200)),
        ]
        if args.client != "httpx":
            # The same closed loop with httpx as the client, for comparison.
            plan.append(
                ("post_saturate_httpx_client", lambda: _closed(via_httpx, post, total // 4, 202))
            )
        for name, phase in plan:
            cpu0 = cpu_seconds(server_pid) if server_pid else None
            phases[name] = await phase()
            p = phases[name]
            if cpu0 is not None and server_pid and p["requests"]:
                used = cpu_seconds(server_pid) - cpu0
                p["server_cpu_ms_per_req"] = round(used * 1e3 / p["requests"], 3)
            print(
                f"  {name:<28} {p['rps']:>8.1f} req/s  p50 {p['p50_ms']:>7.2f} ms  "
                f"p99 {p['p99_ms']:>7.2f} ms  errors {sum(p['errors'].values())}",
                file=log,
                flush=True,
            )
            await asyncio.sleep(0.5)
    for conn in raw:
        await conn.close()
    return phases


def _direct_submit(redis_url: str, n: int) -> dict[str, Any]:
    """submit() in one thread of this process: the floor below HTTP."""
    import redis

    from clipline_core.job import JobSpec
    from clipline_core.settings import Settings
    from clipline_core.store import JobStore
    from workers.app import make_app
    from workers.submit import submit

    deployment = f"bench-direct-{uuid.uuid4().hex[:8]}"
    settings = Settings(deployment=deployment, redis_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    store = JobStore(client, deployment)
    app = make_app(settings)
    app.conf.task_send_sent_event = False  # as the API's producer
    spec = JobSpec(**_job_body(0))
    try:
        for _ in range(min(100, n)):
            submit(store, app, spec)
        latencies = []
        cpu = time.process_time()
        begin = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            submit(store, app, spec)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - begin
        cpu = time.process_time() - cpu
    finally:
        client.close()
        _purge(redis_url, deployment)
    out = _stats(latencies, {}, wall)
    out["server_cpu_ms_per_req"] = round(cpu * 1e3 / n, 3)  # this process is the "server"
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cpu_model": model,
        "python": platform.python_version(),
        "httpx": httpx.__version__,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"API load: {report['concurrency']} {report['client']} clients, server {report['server']}",
        f"{'phase':<28} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7}"
        f" {'server cpu ms/req':>18}",
    ]
    for name, p in report["phases"].items():
        lines.append(
            f"{name:<28} {p['rps']:>9.1f} {p['p50_ms']:>8.2f} {p['p90_ms']:>8.2f} "
            f"{p['p99_ms']:>8.2f} {sum(p['errors'].values()):>7}"
            f" {p.get('server_cpu_ms_per_req', float('nan')):>18.3f}"
        )
    for name, ok in report.get("targets", {}).items():
        lines.append(f"target {name}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    log = sys.stderr if args.json else sys.stdout
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    report: dict[str, Any] = {
        "quick": bool(args.quick),
        "client": args.client,
        "concurrency": args.concurrency,
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
    }
    from clipline_bench.handoff import redis_server

    with contextlib.ExitStack() as stack:
        if args.url:
            if not args.api_key:
                print("--url needs --api-key (or CLIPLINE_API_KEY)", file=sys.stderr)
                return 2
            url, key = args.url.rstrip("/"), args.api_key
            report["server"] = {"url": url}
            redis_url = None
        else:
            redis_url = stack.enter_context(redis_server(args.redis_url))
            if redis_url is None:
                print("no Redis server reachable or embeddable", file=sys.stderr)
                return 2
            url, key, deployment, info = stack.enter_context(
                self_hosted(redis_url, args.server_workers)
            )
            report["server"] = {"self_started": True, "deployment": deployment, **info}
        print(f"driving {url} ...", file=log, flush=True)
        pid = report["server"].get("pid")
        report["phases"] = asyncio.run(_drive(url, key, args, log, pid))
        if redis_url is not None:
            n = 300 if args.quick else min(args.requests, 3000)
            report["phases"]["direct_submit"] = _direct_submit(redis_url, n)
    phases = report["phases"]
    report["targets"] = {
        "submissions_per_s_ge_500": phases["post_saturate"]["rps"] >= TARGET_RPS,
        "post_p99_lt_50ms_at_rate": (
            phases["post_paced"]["p99_ms"] < TARGET_P99_MS
            and phases["post_paced"]["offered_rps"] >= TARGET_RPS
            and not phases["post_paced"]["errors"]
        ),
    }
    report["machine"] = machine()
    text = json.dumps(report, indent=2)
    print(table(report), file=log)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(out)
    if args.json:
        print(text)
    errors = sum(sum(p["errors"].values()) for p in phases.values())
    return 1 if errors else 0
