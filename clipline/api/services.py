"""What the job API's handlers share, and how a job spec is checked before it is queued.

Owns :class:`Services` (settings, Redis, the job store with its end-of-job hook, the
Celery app that sends jobs, the key ring, the rate limiter, the artifact store the
clips are served from, the waits of ``Prefer: wait``, a small thread pool for blocking
calls) and :func:`check_spec`
(http(s) sources only, local paths only where allowed, literal addresses refused by the
fetch stage's SSRF rules, callbacks only with a secret). Must not import the routes or the factory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import re
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Celery

from clipline.api.auth import KeyConfigError, KeyRing, RateLimiter, load_keys
from clipline.api.waiting import Waiters
from clipline_core.artifacts import ArtifactStore, open_store
from clipline_core.errors import ApiError, ClipError, ErrorCode
from clipline_core.job import JobSpec
from clipline_core.schema import (
    ErrorDetail,
)
from clipline_core.settings import Settings
from workers import callbacks, fetch
from workers.app import make_app

log = logging.getLogger("clipline.api")
T = TypeVar("T")

API_VERSION = "1.0.0"
_JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_IDEMPOTENCY_RE = r"^[\x21-\x7e]{1,255}$"


class Services:
    """What the handlers share: settings, Redis, the job store, Celery, keys, limiter."""

    def __init__(self, settings: Settings) -> None:
        keys = load_keys(settings)
        if not keys:
            raise KeyConfigError(
                "no API keys are configured: set CLIPLINE_API_KEYS or CLIPLINE_API_KEY_FILE "
                "(python -m clipline.api new-key makes one)"
            )
        self.settings = settings
        self.keyring = KeyRing(keys)
        self.redis_url = settings.redis_url or "redis://127.0.0.1:6379/0"
        self.redis = redis.Redis.from_url(
            self.redis_url,
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            health_check_interval=30,
        )
        self.celery: Celery = make_app(settings)
        self.store = callbacks.job_store(settings, self.redis, self.celery)
        self.celery.conf.task_send_sent_event = False
        self.limiter = RateLimiter(
            self.redis, settings.deployment, settings.api_rate_limit, settings.api_rate_burst
        )
        self.artifacts = settings.artifacts_path.resolve()
        #: where the workers keep the clips (a local directory or an S3 bucket)
        self.artifact_store: ArtifactStore = open_store(settings)
        #: ``Prefer: wait=N`` (each wait listens on its own pub/sub connection)
        self.waiters = Waiters(self.redis_url, settings.api_max_wait_s, settings.api_max_waiters)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, settings.api_threads), thread_name_prefix="clipline-api"
        )

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking (Redis, Celery) function on the API's own small thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
        self.redis.close()


# ---------------------------------------------------------------------------
# Request checks.
# ---------------------------------------------------------------------------
def _invalid(field: str, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> None:
    detail = ErrorDetail(loc=["body", field], message=message)
    raise ApiError(422, code, f"{field}: {message}", details=[detail])


def _check_remote(field: str, url: str, settings: Settings) -> None:
    """An http(s) URL with a host; literal addresses must pass the SSRF rules now.

    Host names are resolved and checked when the URL is used (fetch, callback).
    """
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port
    except ValueError as exc:
        _invalid(field, f"not a valid URL ({exc})")
        return
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        _invalid(field, "must be an http(s) URL")
        return
    host = parsed.hostname
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = host.lower().rstrip(".") == "localhost"
    if not literal:
        return
    try:
        fetch.resolve_checked(host, port or (443 if parsed.scheme == "https" else 80), settings)
    except ClipError as err:
        _invalid(field, err.message, ErrorCode.FORBIDDEN_SOURCE)


def _check_source(field: str, source: str, settings: Settings) -> None:
    if source.startswith(("http://", "https://")):
        _check_remote(field, source, settings)
        return
    if not settings.api_allow_local_paths:
        _invalid(field, "must be an http(s) URL")
    path = source.removeprefix("file://")
    if "://" in path or not path.startswith("/"):
        _invalid(field, "must be an http(s) URL or an absolute local path")


def check_spec(spec: JobSpec, settings: Settings, callbacks_enabled: bool) -> None:
    """The API's rules on top of the model's: source schemes, SSRF, callbacks set up."""
    _check_source("video_url", spec.video_url, settings)
    for i, url in enumerate(spec.image_urls):
        _check_source(f"image_urls[{i}]", url, settings)
    if spec.callback_url is not None:
        if not callbacks_enabled:
            _invalid("callback_url", "callbacks are not enabled on this server (no secret)")
        _check_remote("callback_url", spec.callback_url, settings)
    if spec.upload_url is not None:
        _check_remote("upload_url", spec.upload_url, settings)
