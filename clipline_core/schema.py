"""The public JSON shapes of the job API, shared by the server, the client and callbacks.

The request body of ``POST /v1/jobs`` is :class:`clipline_core.job.JobSpec` itself (the
workers' model, unknown fields rejected). This module holds what the API sends back:
:class:`JobView` (the body of ``GET /v1/jobs/{id}``, also the ``job`` of a callback
event), :class:`JobList` (``GET /v1/jobs``), :class:`JobAccepted`, :class:`ErrorBody`
(its ``code`` one of :data:`API_ERROR_CODES`) and :class:`CallbackEvent`, plus
:func:`job_view`, which turns a stored :class:`clipline_core.job.Job` into its view. The
``EXAMPLE_*`` documents are the examples of the published OpenAPI document (a test
validates each against its schema).

It imports only pydantic, the error codes and the job model, so workers and clients can
use it without the web framework.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from clipline_core import constants
from clipline_core.constants import PriorityClass
from clipline_core.errors import JOB_CODES, REQUEST_CODES, ErrorCode
from clipline_core.job import (
    ACTIVE,
    Aspect,
    Job,
    JobProgress,
    JobState,
    MetadataValue,
    ProductEvidence,
    Reframe,
)

#: every code an error answer's ``error.code`` may be (the enum of the published schema)
API_ERROR_CODES: frozenset[ErrorCode] = REQUEST_CODES | JOB_CODES
#: the ``event`` of a callback, per terminal state
EVENT_FOR_STATE: dict[JobState, str] = {
    JobState.SUCCEEDED: constants.EVENT_JOB_SUCCEEDED,
    JobState.FAILED: constants.EVENT_JOB_FAILED,
    JobState.CANCELLED: constants.EVENT_JOB_CANCELLED,
}

_ID = "3f2a9c4e8b7d41a6b0c5d2e1f4a7b8c9"
_QUEUED_ID = "9b1c7e2d5a8f4c3b8e6d1a0f2c4b6d8e"


def _links(job_id: str) -> dict[str, str]:
    path = f"{constants.API_PREFIX}/jobs/{job_id}"
    return {"self": path, "highlight": path + "/highlight"}


EXAMPLE_JOB: dict[str, Any] = {
    "id": _ID,
    "state": "succeeded",
    "priority": "high",
    "title": "Blue kettle",
    "duration_s": 5.0,
    "aspect": "9:16",
    "callback": True,
    "metadata": {"order_id": "A-1042", "sku": 31337},
    "created_at": 1700000000.1,
    "updated_at": 1700000004.2,
    "started_at": 1700000000.2,
    "finished_at": 1700000004.2,
    "attempts": 1,
    "timings": {
        "queued_s": 0.1,
        "fetch_s": 0.3,
        "decode_s": 0.9,
        "inference_s": 1.1,
        "render_s": 0.8,
        "total_s": 4.1,
    },
    "result": {
        "start_s": 12.0,
        "end_s": 17.0,
        "score": 0.81,
        "caption": None,
        "codec": "h264",
        "uploaded": False,
        "url": None,
        "download": _links(_ID)["highlight"],
        "product": None,
        "aspect": "9:16",
        "width": 594,
        "height": 1056,
        "reframe": {
            "source": [1920, 1080],
            "crop": [606, 1080],
            "standard": False,
            "note": "smaller than the standard 1080x1920: the source's 9:16 window is 606x1080 px",
            "follow": "product",
            "path": [
                {"t": 12.0, "x": 402, "y": 0, "w": 606, "h": 1080},
                {"t": 14.5, "x": 655, "y": 0, "w": 606, "h": 1080},
                {"t": 16.96, "x": 701, "y": 0, "w": 606, "h": 1080},
            ],
        },
    },
    "error": None,
    "progress": None,
    "links": _links(_ID),
}
EXAMPLE_QUEUED_JOB: dict[str, Any] = {
    **EXAMPLE_JOB,
    "id": _QUEUED_ID,
    "state": "queued",
    "callback": False,
    "metadata": {},
    "created_at": 1699999990.5,
    "updated_at": 1699999990.5,
    "started_at": None,
    "finished_at": None,
    "attempts": 0,
    "timings": dict.fromkeys(EXAMPLE_JOB["timings"]),
    "result": None,
    "links": _links(_QUEUED_ID),
}
EXAMPLE_ACCEPTED: dict[str, Any] = {
    "id": _ID,
    "state": "queued",
    "replayed": False,
    "links": _links(_ID),
}
EXAMPLE_LIST: dict[str, Any] = {
    "jobs": [EXAMPLE_JOB, EXAMPLE_QUEUED_JOB],
    "next_cursor": "MTY5OTk5OTk5MC41OjliMWM3ZTJkNWE4ZjRjM2I4ZTZkMWEwZjJjNGI2ZDhl",
}
EXAMPLE_ERROR: dict[str, Any] = {
    "error": {
        "code": "invalid_request",
        "message": "invalid request: duration_s: Input should be less than or equal to 60",
        "details": [
            {"loc": ["body", "duration_s"], "message": "Input should be less than or equal to 60"}
        ],
    }
}
EXAMPLE_EVENT: dict[str, Any] = {
    "id": "evt_5d41402abc4b2a76b9719d911017c592",
    "event": constants.EVENT_JOB_SUCCEEDED,
    "created": 1700000004,
    "job": EXAMPLE_JOB,
}


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(default_factory=list, description="where in the request")
    message: str


class ErrorInfo(BaseModel):
    code: ErrorCode = Field(
        description="stable machine-readable code (clipline_core.errors.ErrorCode): "
        "never renamed, only added to"
    )
    message: str = Field(description="what went wrong, for a person")
    details: list[ErrorDetail] | None = None
    job_id: str | None = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the API has this body."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_ERROR]})

    error: ErrorInfo


class Links(BaseModel):
    self: str
    highlight: str


class JobTimings(BaseModel):
    queued_s: float | None = None
    fetch_s: float | None = None
    decode_s: float | None = None
    inference_s: float | None = None
    render_s: float | None = None
    total_s: float | None = None


class JobResult(BaseModel):
    """The chosen highlight of a succeeded job."""

    start_s: float = Field(description="start of the highlight in the source video")
    end_s: float
    score: float
    caption: str | None = None
    codec: str | None = None
    uploaded: bool = Field(
        False, description="the clip was PUT to the job's upload_url (not kept by the API)"
    )
    url: str | None = Field(
        None, description="where it was uploaded: the upload_url without its query string"
    )
    download: str | None = Field(
        None, description="relative URL of the clip on this API, when it keeps it"
    )
    product: ProductEvidence | None = Field(
        None, description="where the product is in the highlight (the product localizer)"
    )
    aspect: Aspect | None = Field(None, description="the clip's shape (the job's aspect)")
    width: int | None = Field(None, description="the clip's picture width (px)")
    height: int | None = Field(None, description="the clip's picture height (px)")
    reframe: Reframe | None = Field(
        None, description="the crop path of a 9:16, 1:1 or 4:5 clip (null for source)"
    )


class JobFailure(BaseModel):
    code: str = Field(description="stable failure code (clipline_core.errors.ErrorCode)")
    message: str


class JobView(BaseModel):
    """A job as the API shows it (``GET /v1/jobs/{id}`` and callback events)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_JOB]})

    id: str
    state: JobState
    priority: PriorityClass
    title: str
    duration_s: float
    aspect: Aspect = Aspect.SOURCE
    callback: bool = Field(description="a completion callback is registered")
    metadata: dict[str, MetadataValue] = Field(
        default_factory=dict, description="the metadata the job was submitted with ({}: none)"
    )
    created_at: float = Field(description="unix time the job was accepted")
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int
    timings: JobTimings
    result: JobResult | None = None
    error: JobFailure | None = None
    progress: JobProgress | None = Field(
        None, description="how far the job has come, while a worker runs it (else null)"
    )
    links: Links


class JobList(BaseModel):
    """A page of the tenant's jobs, newest first (``GET /v1/jobs``)."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_LIST]})

    jobs: list[JobView]
    next_cursor: str | None = Field(
        description="pass as cursor for the next page; null on the last page (a page may "
        "hold fewer jobs than the limit, even none, before the last)"
    )


class JobAccepted(BaseModel):
    """The answer to ``POST /v1/jobs`` while the job runs (202)."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_ACCEPTED]})

    id: str
    state: JobState
    replayed: bool = Field(
        description="an earlier request with the same Idempotency-Key created this job"
    )
    links: Links


class CallbackEvent(BaseModel):
    """The body POSTed to a job's callback URL when it reaches a terminal state."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_EVENT]})

    id: str = Field(description="event id; the same on every delivery attempt (deduplicate)")
    event: str = Field(
        description="job.succeeded | job.failed | job.cancelled",
        json_schema_extra={"enum": list(EVENT_FOR_STATE.values())},
    )
    created: int = Field(description="unix time the event was created")
    job: JobView


def job_path(job_id: str) -> str:
    return f"{constants.API_PREFIX}/jobs/{job_id}"


def links(job_id: str) -> Links:
    return Links(self=job_path(job_id), highlight=job_path(job_id) + "/highlight")


def job_view(job: Job) -> JobView:
    """The public view of a stored job (server-side paths and upload URLs left out)."""
    t = job.timings
    result: JobResult | None = None
    if job.state == JobState.SUCCEEDED and job.highlight is not None:
        h = job.highlight
        result = JobResult(
            start_s=h.start_s,
            end_s=h.end_s,
            score=h.score,
            caption=h.caption,
            codec=h.codec,
            uploaded=bool(h.url),
            url=h.url,
            download=job_path(job.id) + "/highlight" if h.path or h.artifact else None,
            product=h.product,
            aspect=h.aspect,
            width=h.width,
            height=h.height,
            reframe=h.reframe,
        )
    return JobView(
        id=job.id,
        state=job.state,
        priority=job.spec.priority,
        title=job.spec.title,
        duration_s=job.spec.duration_s,
        aspect=job.spec.aspect,
        callback=bool(job.spec.callback_url),
        metadata=dict(job.spec.metadata or {}),
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempt,
        timings=JobTimings(
            queued_s=t.get("queued"),
            fetch_s=t.get("fetch"),
            decode_s=t.get("decode"),
            inference_s=t.get("inference"),
            render_s=t.get("render"),
            total_s=t.get("total"),
        ),
        result=result,
        error=JobFailure(code=job.error.code, message=job.error.message) if job.error else None,
        progress=job.progress if job.state in ACTIVE else None,
        links=links(job.id),
    )
