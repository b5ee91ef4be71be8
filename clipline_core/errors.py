"""Stable error codes and the exception that carries them.

Every failure a user can see maps to one :class:`ErrorCode` and a message a person
understands. Codes are part of the API: never rename one, only add.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Closed set of failure codes reported in a job's ``error.code``."""

    INVALID_REQUEST = "invalid_request"
    FORBIDDEN_SOURCE = "forbidden_source"
    FETCH_FAILED = "fetch_failed"
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


# Codes whose cause may go away by itself: the task retries with backoff first.
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
