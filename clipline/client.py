"""A small typed Python client of the clipline job API.

    from clipline.client import Client

    with Client("https://clips.example.com", api_key) as api:
        accepted = api.submit("https://cdn.example.com/v.mp4", ["https://cdn.example.com/p.jpg"])
        job = api.wait(accepted.id)
        if job.state == "succeeded":
            api.download(job.id, "clip.mp4")

``submit`` always sends an ``Idempotency-Key`` (a fresh one unless given), so it can
retry by itself on connection errors, 429 and 503 without ever creating two jobs.
``list_jobs`` reads one page of the tenant's jobs (newest first) and ``iter_jobs`` every
page; ``get(id, wait_s=N)`` and ``wait`` ask the server to hold the answer until the job
ends (``Prefer: wait``) instead of polling.
Errors answered by the API raise :class:`ApiError` with the status, the stable
``code`` and the message. :func:`verify_callback` checks a completion callback's
signature (see ``docs/api.md``).
"""

from __future__ import annotations

import datetime
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from clipline_core import constants, signing
from clipline_core.errors import ApiError
from clipline_core.job import TERMINAL, JobState
from clipline_core.schema import CallbackEvent, JobAccepted, JobList, JobView

__all__ = ["ApiError", "Client", "verify_callback"]

_RETRY_STATUS = {429, 502, 503, 504}
#: the longest single wait the client asks a server for (servers cap it themselves too)
MAX_WAIT_S = 60
#: a time filter of the listing: unix seconds, an aware datetime or an RFC 3339 string
Instant = float | int | datetime.datetime | str


def _instant(value: Instant | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError("a datetime filter needs a timezone (datetime.timezone.utc, ...)")
        return value.isoformat()
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


def _states(state: str | JobState | Iterable[str | JobState] | None) -> str | None:
    if state is None:
        return None
    items = [state] if isinstance(state, str) else list(state)
    return ",".join(JobState(s).value for s in items) or None


def _error(resp: httpx.Response) -> ApiError:
    code, message, job_id = "http_error", resp.reason_phrase or f"HTTP {resp.status_code}", None
    try:
        info = resp.json().get("error", {})
        code = str(info.get("code", code))
        message = str(info.get("message", message))
        job_id = info.get("job_id")
    except (ValueError, AttributeError):
        pass
    retry_after: float | None = None
    value = resp.headers.get("Retry-After")
    if value is not None:
        try:
            retry_after = float(value)
        except ValueError:
            retry_after = None
    return ApiError(resp.status_code, code, message, retry_after=retry_after, job_id=job_id)


class Client:
    """Talks to one API server with one API key. Thread-safe (one httpx client)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.timeout_s = timeout_s
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "clipline-client/1"},
            timeout=timeout_s,
            transport=transport,
        )

    # -- plumbing ------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(self, method: str, path: str, *, retry: bool, **kwargs: Any) -> httpx.Response:
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt + 1 == attempts
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if last:
                    raise ApiError(0, "unreachable", f"{type(exc).__name__}: {exc}") from exc
                time.sleep(min(5.0, 0.2 * 2**attempt))
                continue
            if resp.is_success:
                return resp
            err = _error(resp)
            if last or resp.status_code not in _RETRY_STATUS:
                raise err
            time.sleep(min(30.0, err.retry_after or 0.2 * 2**attempt))
        raise AssertionError("unreachable")

    # -- the API -----------------------------------------------------------------------
    def submit(
        self,
        video_url: str,
        image_urls: list[str],
        *,
        title: str = "",
        description: str = "",
        duration_s: float = 5.0,
        aspect: str = "source",
        priority: str = constants.DEFAULT_PRIORITY.value,
        callback_url: str | None = None,
        upload_url: str | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, str | int | float | bool | None] | None = None,
    ) -> JobAccepted:
        """Enqueue a job; the same ``idempotency_key`` and body return the same job.

        ``metadata`` (JSON scalars under string keys; see ``docs/api.md`` for its limits)
        is stored with the job and comes back in its document and its callback.
        ``aspect`` is the clip's shape: ``source`` (the default, sent only when another
        is asked for), ``9:16``, ``1:1`` or ``4:5``.
        """
        body: dict[str, Any] = {
            "video_url": video_url,
            "image_urls": list(image_urls),
            "title": title,
            "description": description,
            "duration_s": duration_s,
            "priority": priority,
        }
        if aspect != "source":
            body["aspect"] = aspect
        if callback_url is not None:
            body["callback_url"] = callback_url
        if upload_url is not None:
            body["upload_url"] = upload_url
        if metadata:
            body["metadata"] = dict(metadata)
        key = idempotency_key or uuid.uuid4().hex
        resp = self._request(
            "POST",
            f"{constants.API_PREFIX}/jobs",
            retry=True,
            json=body,
            headers={constants.HEADER_IDEMPOTENCY_KEY: key},
        )
        return JobAccepted.model_validate_json(resp.content)

    def get(self, job_id: str, *, wait_s: float | None = None) -> JobView:
        """The job's document; with ``wait_s`` (whole seconds, at least 1), once it is
        terminal or that time passed (``Prefer: wait``, at most :data:`MAX_WAIT_S` and the
        server's own cap)."""
        return self._get(job_id, wait_s)[0]

    def _get(self, job_id: str, wait_s: float | None) -> tuple[JobView, bool]:
        """The job, and whether the server applied the wait asked for."""
        kwargs: dict[str, Any] = {}
        if wait_s is not None and wait_s >= 1:
            seconds = min(MAX_WAIT_S, math.floor(wait_s))
            kwargs["headers"] = {constants.HEADER_PREFER: f"wait={seconds}"}
            kwargs["timeout"] = self.timeout_s + seconds
        resp = self._request("GET", f"{constants.API_PREFIX}/jobs/{job_id}", retry=True, **kwargs)
        applied = constants.HEADER_PREFERENCE_APPLIED in resp.headers
        return JobView.model_validate_json(resp.content), applied

    def list_jobs(
        self,
        state: str | JobState | Iterable[str | JobState] | None = None,
        limit: int = 20,
        cursor: str | None = None,
        created_after: Instant | None = None,
        created_before: Instant | None = None,
    ) -> tuple[list[JobView], str | None]:
        """One page of the tenant's jobs, newest first, and the cursor of the next page
        (None after the last). ``state`` is one state or several; the time filters are
        exclusive bounds on ``created_at``. A page may be short (even empty) before the
        last when filters skip many jobs: go on while the cursor is not None."""
        params: dict[str, Any] = {"limit": limit}
        for name, value in (
            ("state", _states(state)),
            ("cursor", cursor),
            ("created_after", _instant(created_after)),
            ("created_before", _instant(created_before)),
        ):
            if value is not None:
                params[name] = value
        resp = self._request("GET", f"{constants.API_PREFIX}/jobs", retry=True, params=params)
        page = JobList.model_validate_json(resp.content)
        return page.jobs, page.next_cursor

    def iter_jobs(
        self,
        state: str | JobState | Iterable[str | JobState] | None = None,
        created_after: Instant | None = None,
        created_before: Instant | None = None,
        *,
        page_size: int = 100,
    ) -> Iterator[JobView]:
        """Every job of the tenant that matches, newest first, page by page."""
        cursor: str | None = None
        while True:
            jobs, cursor = self.list_jobs(
                state, page_size, cursor, created_after=created_after, created_before=created_before
            )
            yield from jobs
            if cursor is None:
                return

    def cancel(self, job_id: str) -> JobView:
        """Cancel a job that has not finished (ApiError 409 if it has)."""
        resp = self._request("DELETE", f"{constants.API_PREFIX}/jobs/{job_id}", retry=False)
        return JobView.model_validate_json(resp.content)

    def wait(
        self,
        job_id: str,
        timeout_s: float = 900.0,
        *,
        poll_s: float = 0.2,
        max_poll_s: float = 2.0,
        on_change: Callable[[JobView], None] | None = None,
    ) -> JobView:
        """The job once it is terminal; ApiError ``timeout`` (status 0) after ``timeout_s``.

        Without ``on_change`` the server holds each read until the job ends
        (``Prefer: wait``, up to :data:`MAX_WAIT_S` a request); with it, or from a server
        that does not wait, the job is polled (``poll_s`` growing to ``max_poll_s``) so
        that ``on_change`` sees every state it is found in.
        """
        deadline = time.monotonic() + timeout_s
        last: JobState | None = None
        delay = poll_s
        long_poll = on_change is None
        while True:
            remaining = deadline - time.monotonic()
            job, applied = self._get(job_id, remaining if long_poll else None)
            long_poll = long_poll and applied
            if job.state != last:
                last = job.state
                delay = poll_s
                if on_change is not None:
                    on_change(job)
            if job.state in TERMINAL:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(0, "timeout", f"job {job_id} is still {job.state.value}")
            if long_poll and remaining >= 1:
                continue  # the server waited: ask again at once
            time.sleep(min(delay, remaining))
            delay = min(max_poll_s, delay * 1.5)

    def download(self, job_id: str, dest: str | Path) -> Path:
        """Stream the highlight clip to ``dest``; return the file written.

        ``dest`` is a file name, or a directory to put ``<job id>.mp4`` in: one that
        exists, or any path ending in ``/`` (created with its parents). The clip is
        written to ``<name>.part`` and renamed when complete, so a failed download never
        leaves a partial file under the final name.
        """
        as_dir = str(dest).endswith(("/", os.sep)) or Path(dest).is_dir()
        target = Path(dest) / f"{job_id}.mp4" if as_dir else Path(dest)
        path = f"{constants.API_PREFIX}/jobs/{job_id}/highlight"
        # An object store answers with a redirect to a presigned URL; httpx drops the
        # Authorization header when it leaves the API's origin.
        with self._http.stream("GET", path, follow_redirects=True) as resp:
            if not resp.is_success:
                resp.read()
                raise _error(resp)
            if as_dir:
                target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            try:
                with open(tmp, "wb") as fh:
                    for block in resp.iter_bytes(1 << 20):
                        fh.write(block)
                tmp.replace(target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return target


def verify_callback(
    secret: str,
    body: bytes,
    signature_header: str | None,
    *,
    tolerance_s: float = signing.DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> CallbackEvent:
    """Check a callback's ``Clipline-Signature`` and parse its body.

    Raises :class:`clipline_core.signing.SignatureError` if the signature is missing,
    stale (outside ``tolerance_s``) or wrong.
    """
    signing.verify(secret, body, signature_header, tolerance_s, now)
    return CallbackEvent.model_validate_json(body)
