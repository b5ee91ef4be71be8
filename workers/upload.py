"""Store a rendered clip at a presigned HTTP PUT URL given with the job.

The URL passes the same SSRF rules as a fetch (:func:`workers.fetch.check_url`), the
connection goes to the checked address, and redirects are not followed. The body is
streamed from the file with an explicit ``Content-Length`` (object stores refuse
chunked uploads to presigned URLs). Transient failures (HTTP 408/425/429/5xx, timeouts,
connection errors) are retried with exponential backoff up to ``fetch_retries`` times;
a refusal (another 4xx, e.g. an expired signature) is final. Either way the failure is
``upload_failed``.

The public address of the clip is the URL without its query string: the signature of
a presigned URL is a credential, so it never goes into the job's result (the request
itself keeps the URL until the job expires, since a retry needs it).
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx

from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings
from workers import fetch

_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_BLOCK = 1 << 20


def public_url(url: str) -> str:
    """``url`` without query string, fragment or user info."""
    p = urllib.parse.urlparse(url)
    netloc = p.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunparse((p.scheme, netloc, p.path, "", "", ""))


def _body(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            yield block


def _put_once(url: str, path: Path, settings: Settings, content_type: str) -> None:
    try:
        target, headers, extensions = fetch.pinned(url, settings)
    except ClipError as err:
        if err.code == ErrorCode.FORBIDDEN_SOURCE:
            raise
        raise ClipError(
            ErrorCode.UPLOAD_FAILED, f"cannot upload the clip: {err.message}", transient=False
        ) from err
    headers = {
        **headers,
        "Content-Type": content_type,
        "Content-Length": str(path.stat().st_size),
    }
    timeout = httpx.Timeout(settings.fetch_read_timeout_s, connect=settings.fetch_connect_timeout_s)
    where = public_url(url)
    try:
        with fetch.http_client(timeout) as client:
            resp = client.put(target, content=_body(path), headers=headers, extensions=extensions)
    except httpx.TimeoutException as exc:
        msg = f"timed out uploading the clip to {where}"
        raise ClipError(ErrorCode.UPLOAD_FAILED, msg) from exc
    except httpx.TransportError as exc:
        raise ClipError(
            ErrorCode.UPLOAD_FAILED, f"network error uploading the clip to {where}: {exc}"
        ) from exc
    if 200 <= resp.status_code < 300:
        return
    transient = resp.status_code in _TRANSIENT_STATUS
    raise ClipError(
        ErrorCode.UPLOAD_FAILED,
        f"the upload URL {where} answered HTTP {resp.status_code}",
        transient=transient,
    )


def put_file(
    url: str,
    path: Path,
    settings: Settings,
    content_type: str = "video/mp4",
    sleep: float = 0.25,
) -> str:
    """PUT ``path`` to the presigned ``url`` (with retries); return its public URL."""
    attempts = max(1, settings.fetch_retries + 1)
    for attempt in range(attempts):
        try:
            _put_once(url, path, settings, content_type)
            return public_url(url)
        except ClipError as err:
            if not err.transient or err.code != ErrorCode.UPLOAD_FAILED:
                raise
            if attempt + 1 >= attempts:
                raise ClipError(
                    ErrorCode.UPLOAD_FAILED,
                    f"{err.message} (gave up after {attempts} tries)",
                ) from err
        time.sleep(min(8.0, sleep * 2**attempt))
    raise AssertionError("unreachable")
