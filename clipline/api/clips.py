"""How the job API answers ``GET /v1/jobs/{id}/highlight`` for a succeeded job.

Owns :func:`highlight_response`. The job document names the clip's key in the artifact
store (``highlight.artifact``, :mod:`clipline_core.artifacts`):

* a local-directory store: the file is streamed (``FileResponse``: one byte range, 206;
  a range outside the clip is 416 with the API's error body, like the relay's; a Range
  header this API does not serve as a range, several ranges say, gets the whole clip);
* an S3 store with ``artifact_serve = redirect`` (the default): 307 to a presigned GET
  URL valid ``artifact_url_ttl_s`` seconds (``Cache-Control: no-store``: the URL is a
  credential). The client downloads from the object store, the API moves no bytes;
* an S3 store with ``artifact_serve = stream``: the API relays the object (one byte
  range per request, 206 with ``Content-Range``), for clients that cannot reach the
  store's endpoint.

A clip that expired or was removed is 404, one uploaded to the job's ``upload_url`` is
404 naming it, and an unreachable store is 503 with ``Retry-After``. Jobs recorded before
artifact keys existed (a ``path`` under the local artifacts directory) are streamed as
before. Builds on :mod:`clipline.api.services`; must not import the routes or the factory.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path
from typing import Any

from fastapi import Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from clipline.api.services import Services
from clipline_core.artifacts import ArtifactInfo, ArtifactStore
from clipline_core.errors import ApiError, ClipError, ErrorCode
from clipline_core.job import Job

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _gone(job: Job) -> ApiError:
    h = job.highlight
    if h is not None and h.url:
        msg = (
            "the clip was uploaded to the upload_url given with the job; "
            "this API does not keep a copy"
        )
    else:
        msg = "the clip is no longer available here (expired or removed)"
    return ApiError(404, ErrorCode.NOT_FOUND, msg, job_id=job.id)


def _unavailable(job: Job, err: ClipError) -> ApiError:
    return ApiError(
        503,
        ErrorCode.UNAVAILABLE,
        f"the artifact store is unavailable: {err.message}",
        job_id=job.id,
        headers={"Retry-After": "5"},
    )


class _WholeFile(FileResponse):
    """A ``FileResponse`` that ignores the request's ``Range`` header."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]
        await super().__call__({**scope, "headers": headers}, receive, send)


def _file(path: Path, job_id: str, range_header: str | None) -> FileResponse:
    """The clip at ``path``: the range asked for when :func:`byte_range` serves it."""
    whole = byte_range(range_header, path.stat().st_size) is None
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return (_WholeFile if whole else FileResponse)(
        path,
        media_type=media_type,
        filename=f"{job_id}{path.suffix}",
        content_disposition_type="inline",
    )


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``(start, end)`` (end exclusive) a ``Range`` header asks of ``size`` bytes.

    None: the whole object (no header, or one this relay does not serve as a range, such
    as several ranges: answering 200 with everything is allowed). ``ApiError`` 416 when
    the range lies outside the object.
    """
    if not header:
        return None
    match = _RANGE_RE.match(header.strip().replace(" ", ""))
    if not match or (not match[1] and not match[2]):
        return None
    if match[1]:
        start = int(match[1])
        end = min(size, int(match[2]) + 1) if match[2] else size
    else:  # the last N bytes
        start, end = max(0, size - int(match[2])), size
    if start >= size or end <= start:
        raise ApiError(
            416,
            ErrorCode.INVALID_REQUEST,
            f"the range {header!r} lies outside the clip ({size} bytes)",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def _relay(
    store: ArtifactStore, info: ArtifactInfo, job: Job, range_header: str | None
) -> Response:
    wanted = byte_range(range_header, info.size)
    start, end = wanted or (0, info.size)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Length": str(end - start),
        "Content-Disposition": f'inline; filename="{job.id}.mp4"',
    }
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{info.size}"
    try:
        blocks = store.read(info.key, start, end)
    except FileNotFoundError:
        raise _gone(job) from None
    except ClipError as err:
        raise _unavailable(job, err) from err
    return StreamingResponse(
        blocks,
        status_code=206 if wanted is not None else 200,
        media_type=info.content_type,
        headers=headers,
    )


async def highlight_response(svc: Services, job: Job, range_header: str | None) -> Response:
    """The answer to a download of succeeded ``job``'s clip (see the module doc)."""
    h = job.highlight
    if h is not None and h.artifact:
        store = svc.artifact_store
        local = store.local_path(h.artifact)
        if local is not None:
            if not local.is_file():
                raise _gone(job)
            return _file(local, job.id, range_header)
        try:
            info = await svc.call(store.stat, h.artifact)
            if info is None:
                raise _gone(job)
            if svc.settings.artifact_serve == "stream":
                return await svc.call(_relay, store, info, job, range_header)
            url = await svc.call(store.url, h.artifact, svc.settings.artifact_url_ttl_s)
        except ClipError as err:
            raise _unavailable(job, err) from err
        if url is None:  # pragma: no cover - every remote store signs URLs
            raise _gone(job)
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    # A job recorded before artifact keys: its file under the local artifacts directory.
    path = Path(h.path).resolve() if h is not None and h.path else None
    if path is None or svc.artifacts not in path.parents or not path.is_file():
        raise _gone(job)
    return _file(path, job.id, range_header)
