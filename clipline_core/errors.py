"""Stable error codes, and the exceptions that carry them: one enum for the whole system.

Every failure a user can see maps to one :class:`ErrorCode` and a message a person
understands: a failed job's ``error.code`` (:data:`JOB_CODES`) and the ``error.code`` of
an API error answer (:data:`REQUEST_CODES`) come from the same enum. Codes are part of
the API: never rename one, only add. :class:`ClipError` is a job's failure inside the
services; :class:`ApiError` is an HTTP error answer, raised by the API and parsed from
answers by the client. Imports only the standard library.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    """Closed set of failure codes reported in a job's ``error.code``."""

    INVALID_REQUEST = "invalid_request"
    FORBIDDEN_SOURCE = "forbidden_source"
    FETCH_FAILED = "fetch_failed"
    SOURCE_TIMEOUT = "source_timeout"  # a source stalled or missed the fetch deadline
    SOURCE_TOO_SLOW = "source_too_slow"  # a source sent below the minimum transfer rate
    SOURCE_TRUNCATED = "source_truncated"  # a source closed before its declared length
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    EMPTY_FILE = "empty_file"
    NOT_A_VIDEO = "not_a_video"
    NOT_AN_IMAGE = "not_an_image"
    UNDECODABLE_VIDEO = "undecodable_video"
    TOO_LONG = "too_long"
    RESOLUTION_TOO_HIGH = "resolution_too_high"
    GPU_UNAVAILABLE = "gpu_unavailable"
    BACKPRESSURE = "backpressure"
    RENDER_FAILED = "render_failed"
    UPLOAD_FAILED = "upload_failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    WORKER_LOST = "worker_lost"
    INTERNAL = "internal"
    # Codes of API error answers (4xx/5xx bodies), never of a failed job.
    MALFORMED_BODY = "malformed_body"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    CONFLICT = "conflict"
    NOT_READY = "not_ready"
    BODY_TOO_LARGE = "body_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    REQUEST_TIMEOUT = "request_timeout"  # the client sent its request too slowly (408)
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    # The worker's decode_backend cannot run on its node: ``clipline worker`` refuses to
    # start with it; a worker started otherwise (the local stack) fails its jobs with it.
    DECODER_UNAVAILABLE = "decoder_unavailable"


#: codes an API error answer may carry
REQUEST_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.MALFORMED_BODY,
        ErrorCode.FORBIDDEN_SOURCE,
        ErrorCode.UNAUTHENTICATED,
        ErrorCode.FORBIDDEN,
        ErrorCode.NOT_FOUND,
        ErrorCode.METHOD_NOT_ALLOWED,
        ErrorCode.IDEMPOTENCY_CONFLICT,
        ErrorCode.CONFLICT,
        ErrorCode.NOT_READY,
        ErrorCode.BODY_TOO_LARGE,
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        ErrorCode.REQUEST_TIMEOUT,
        ErrorCode.RATE_LIMITED,
        ErrorCode.UNAVAILABLE,
        ErrorCode.INTERNAL,
    }
)
#: codes a failed (or cancelled) job may carry
JOB_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.FORBIDDEN_SOURCE,
        ErrorCode.FETCH_FAILED,
        ErrorCode.SOURCE_TIMEOUT,
        ErrorCode.SOURCE_TOO_SLOW,
        ErrorCode.SOURCE_TRUNCATED,
        ErrorCode.NOT_FOUND,
        ErrorCode.TOO_LARGE,
        ErrorCode.EMPTY_FILE,
        ErrorCode.NOT_A_VIDEO,
        ErrorCode.NOT_AN_IMAGE,
        ErrorCode.UNDECODABLE_VIDEO,
        ErrorCode.TOO_LONG,
        ErrorCode.RESOLUTION_TOO_HIGH,
        ErrorCode.GPU_UNAVAILABLE,
        ErrorCode.DECODER_UNAVAILABLE,
        ErrorCode.BACKPRESSURE,
        ErrorCode.RENDER_FAILED,
        ErrorCode.UPLOAD_FAILED,
        ErrorCode.TIMEOUT,
        ErrorCode.CANCELLED,
        ErrorCode.WORKER_LOST,
        ErrorCode.INTERNAL,
    }
)

# Codes whose cause may go away by itself: the task retries with backoff first. A
# source that stalls, trickles or lies about its length (``source_*``) is not among
# them: the fetch bounds such a source by its own deadline and retries what may be a
# blip within it; another attempt of the job would only hold a worker as long again.
TRANSIENT_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.FETCH_FAILED,
        ErrorCode.GPU_UNAVAILABLE,
        ErrorCode.BACKPRESSURE,
        ErrorCode.UPLOAD_FAILED,
    }
)


class ClipError(Exception):
    """A failure with a stable code and a human-readable message."""

    def __init__(self, code: ErrorCode, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = code in TRANSIENT_CODES if transient is None else transient

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}

    def __repr__(self) -> str:
        return f"ClipError({self.code.value!r}, {self.message!r})"


class ApiError(Exception):
    """An HTTP error answer of the job API: status, stable code, message.

    The API raises it (``headers`` and ``details`` go into the answer); the client
    raises it for an error answer it received (``status`` 0: no answer at all;
    ``code`` is then a string the server sent, possibly one this version does not know).
    """

    def __init__(
        self,
        status: int,
        code: ErrorCode | str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: list[Any] | None = None,
        job_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.details = details
        self.job_id = job_id
        self.retry_after = retry_after
