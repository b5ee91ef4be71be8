"""The public JSON shapes of the job API, shared by the server, the client and callbacks.

The request body of ``POST /v1/jobs`` is :class:`clipline_core.job.JobSpec` itself (the
workers' model, unknown fields rejected). This module holds what the API sends back:
:class:`JobView` (the body of ``GET /v1/jobs/{id}``, also the ``job`` of a callback
event), :class:`JobAccepted`, :class:`ErrorBody` and :class:`CallbackEvent`, plus
:func:`job_view`, which turns a stored :class:`clipline_core.job.Job` into its view.

It imports only pydantic and the job model, so workers and clients can use it without
the web framework.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from clipline_core import constants
from clipline_core.constants import PriorityClass
from clipline_core.job import Job, JobState, ProductEvidence


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(default_factory=list, description="where in the request")
    message: str


class ErrorInfo(BaseModel):
    code: str = Field(description="stable machine-readable code (ErrorCode)")
    message: str = Field(description="what went wrong, for a person")
    details: list[ErrorDetail] | None = None
    job_id: str | None = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the API has this body."""

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


class JobFailure(BaseModel):
    code: str = Field(description="stable failure code (clipline_core.errors.ErrorCode)")
    message: str


class JobView(BaseModel):
    """A job as the API shows it (``GET /v1/jobs/{id}`` and callback events)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    state: JobState
    priority: PriorityClass
    title: str
    duration_s: float
    callback: bool = Field(description="a completion callback is registered")
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int
    timings: JobTimings
    result: JobResult | None = None
    error: JobFailure | None = None
    links: Links


class JobAccepted(BaseModel):
    """The answer to ``POST /v1/jobs`` (202)."""

    id: str
    state: JobState
    replayed: bool = Field(
        description="an earlier request with the same Idempotency-Key created this job"
    )
    links: Links


class CallbackEvent(BaseModel):
    """The body POSTed to a job's callback URL when it reaches a terminal state."""

    id: str = Field(description="event id; the same on every delivery attempt (deduplicate)")
    event: str = Field(description="job.succeeded | job.failed | job.cancelled")
    created: int = Field(description="unix time the event was created")
    job: JobView


EVENT_FOR_STATE: dict[JobState, str] = {
    JobState.SUCCEEDED: constants.EVENT_JOB_SUCCEEDED,
    JobState.FAILED: constants.EVENT_JOB_FAILED,
    JobState.CANCELLED: constants.EVENT_JOB_CANCELLED,
}


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
            download=job_path(job.id) + "/highlight" if h.path else None,
            product=h.product,
        )
    return JobView(
        id=job.id,
        state=job.state,
        priority=job.spec.priority,
        title=job.spec.title,
        duration_s=job.spec.duration_s,
        callback=bool(job.spec.callback_url),
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
        links=links(job.id),
    )
