"""The job model: what a backend asks for, and the state machine a job moves through.

``JobSpec`` is the request (shared with the HTTP API, which validates bodies with it);
``JobState`` is the closed set of states with the named sets ``TERMINAL`` and
``ACTIVE``; ``Job`` is the record stored in Redis (see :mod:`clipline_core.store`)::

    queued -> fetching -> decoding -> inferring -> rendering -> succeeded
       \\_________\\___________\\____________\\___________\\----> failed | cancelled
"""

from __future__ import annotations

import enum
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from clipline_core.constants import DEFAULT_PRIORITY, PriorityClass

MAX_URL_LENGTH = 4096
MAX_IMAGES = 8


class JobState(enum.StrEnum):
    QUEUED = "queued"
    FETCHING = "fetching"
    DECODING = "decoding"
    INFERRING = "inferring"
    RENDERING = "rendering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# The non-terminal states in the order a job moves through them.
PROGRESSION: tuple[JobState, ...] = (
    JobState.QUEUED,
    JobState.FETCHING,
    JobState.DECODING,
    JobState.INFERRING,
    JobState.RENDERING,
)
# The states a worker holds a job in (under a lease).
ACTIVE: frozenset[JobState] = frozenset(PROGRESSION) - {JobState.QUEUED}
# Stages in order, as reported in timings.
STAGES: tuple[str, ...] = ("fetch", "decode", "inference", "render")


class JobSpec(BaseModel):
    """A highlight request. Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    video_url: str = Field(
        ...,
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL or allowed local path",
    )
    image_urls: list[str] = Field(
        ..., min_length=1, max_length=MAX_IMAGES, description="product images (http(s) or local)"
    )
    title: str = Field("", max_length=300)
    description: str = Field("", max_length=5000)
    duration_s: float = Field(5.0, ge=0.5, le=60.0, description="highlight length in seconds")
    priority: PriorityClass = DEFAULT_PRIORITY
    callback_url: str | None = Field(None, max_length=MAX_URL_LENGTH)
    upload_url: str | None = Field(
        None, max_length=MAX_URL_LENGTH, description="presigned HTTP PUT URL for the clip"
    )

    @field_validator("image_urls")
    @classmethod
    def _image_urls(cls, v: list[str]) -> list[str]:
        for u in v:
            if not u or len(u) > MAX_URL_LENGTH:
                raise ValueError("each image URL must be 1-4096 characters")
        return v

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


class JobError(BaseModel):
    code: str
    message: str


class ProductBox(BaseModel):
    """The product's box in one verified frame: time (s), box (x, y, w, h as fractions)."""

    t: float
    box: list[float]


class ProductEvidence(BaseModel):
    """Where the product is in the highlight, from the localizer."""

    found: bool = Field(description="the product was seen in the chosen window")
    score: float = Field(description="mean per-frame evidence over the window, 0-1")
    frames: int = Field(description="sampled frames in the window")
    verified_frames: int = Field(description="frames where geometry verified the product")
    mean_inliers: float = Field(description="mean verified keypoint matches per frame")
    box: list[float] | None = Field(
        None, description="the product's box over the clip: x, y, w, h as fractions of the picture"
    )
    boxes: list[ProductBox] = Field(default_factory=list, description="per verified frame")


class Highlight(BaseModel):
    start_s: float
    end_s: float
    score: float
    path: str | None = None
    url: str | None = None
    caption: str | None = None
    codec: str | None = None
    audio: bool | None = None
    frames: int | None = None
    product: ProductEvidence | None = None


class Job(BaseModel):
    """A job as stored; ``timings`` maps stage names (and ``queued``/``total``) to seconds."""

    id: str
    state: JobState
    spec: JobSpec
    attempt: int = 0
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: JobError | None = None
    highlight: Highlight | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    video: dict[str, Any] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def summary(self) -> dict[str, Any]:
        """The public JSON shape of a job's outcome (CLI ``--json`` and the API)."""
        t = self.timings
        return {
            "job_id": self.id,
            "status": self.state.value,
            "highlight": self.highlight.model_dump() if self.highlight else None,
            "error": self.error.model_dump() if self.error else None,
            "timings": {
                "queued_s": t.get("queued"),
                "fetch_s": t.get("fetch"),
                "decode_s": t.get("decode"),
                "inference_s": t.get("inference"),
                "render_s": t.get("render"),
                "total_s": t.get("total"),
            },
            "attempts": self.attempt,
            "video": self.video or None,
        }
