"""A small typed Python client of the clipline job API.

    from clipline.client import Client

    with Client("https://clips.example.com", api_key) as api:
        accepted = api.submit("https://cdn.example.com/v.mp4", ["https://cdn.example.com/p.jpg"])
        job = api.wait(accepted.id)
        if job.state == "succeeded":
            api.download(job.id, "clip.mp4")

``submit`` always sends an ``Idempotency-Key`` (a fresh one unless given), so it can
retry by itself on connection errors, 429 and 503 without ever creating two jobs.
Errors answered by the API raise :class:`ApiError` with the status, the stable
``code`` and the message. :func:`verify_callback` checks a completion callback's
signature (see ``docs/api.md``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from clipline_core import constants, signing
from clipline_core.errors import ApiError
from clipline_core.job import TERMINAL, JobState
from clipline_core.schema import CallbackEvent, JobAccepted, JobView

__all__ = ["ApiError", "Client", "verify_callback"]

_RETRY_STATUS = {429, 502, 503, 504}


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
        priority: str = constants.DEFAULT_PRIORITY.value,
        callback_url: str | None = None,
        upload_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobAccepted:
        """Enqueue a job; the same ``idempotency_key`` and body return the same job."""
        body: dict[str, Any] = {
            "video_url": video_url,
            "image_urls": list(image_urls),
            "title": title,
            "description": description,
            "duration_s": duration_s,
            "priority": priority,
        }
        if callback_url is not None:
            body["callback_url"] = callback_url
        if upload_url is not None:
            body["upload_url"] = upload_url
        key = idempotency_key or uuid.uuid4().hex
        resp = self._request(
            "POST",
            f"{constants.API_PREFIX}/jobs",
            retry=True,
            json=body,
            headers={constants.HEADER_IDEMPOTENCY_KEY: key},
        )
        return JobAccepted.model_validate_json(resp.content)

    def get(self, job_id: str) -> JobView:
        resp = self._request("GET", f"{constants.API_PREFIX}/jobs/{job_id}", retry=True)
        return JobView.model_validate_json(resp.content)

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
        """Poll until the job is terminal; ApiError ``timeout`` (status 0) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last: JobState | None = None
        delay = poll_s
        while True:
            job = self.get(job_id)
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
            time.sleep(min(delay, remaining))
            delay = min(max_poll_s, delay * 1.5)

    def download(self, job_id: str, dest: str | Path) -> Path:
        """Stream the highlight clip to ``dest`` (a file, or a directory to put it in)."""
        target = Path(dest)
        path = f"{constants.API_PREFIX}/jobs/{job_id}/highlight"
        with self._http.stream("GET", path) as resp:
            if not resp.is_success:
                resp.read()
                raise _error(resp)
            if target.is_dir():
                suffix = Path(httpx.URL(str(resp.url)).path).suffix
                disposition = resp.headers.get("content-disposition", "")
                if "filename=" in disposition:
                    suffix = Path(disposition.rsplit("filename=", 1)[1].strip('"; ')).suffix
                target = target / f"{job_id}{suffix or '.mp4'}"
            tmp = target.with_name(target.name + ".part")
            with open(tmp, "wb") as fh:
                for block in resp.iter_bytes(1 << 20):
                    fh.write(block)
            tmp.replace(target)
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
