"""The job model: what a backend asks for, and the state machine a job moves through.

``JobSpec`` is the request (shared with the HTTP API, which validates bodies with it);
``Aspect`` the closed set of clip shapes a job may ask for (``source`` keeps the
source's picture; the others are cut out of it along a crop path, :class:`Reframe`);
``JobState`` is the closed set of states with the named sets ``TERMINAL`` and
``ACTIVE``; ``Job`` is the record stored in Redis (see :mod:`clipline_core.store`)::

    queued -> fetching -> decoding -> inferring -> rendering -> succeeded
       \\_________\\___________\\____________\\___________\\----> failed | cancelled
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from clipline_core.constants import DEFAULT_PRIORITY, PriorityClass

MAX_URL_LENGTH = 4096
MAX_IMAGES = 8
MAX_TITLE_LENGTH = 300
MAX_DESCRIPTION_LENGTH = 5000
MIN_DURATION_S = 0.5
MAX_DURATION_S = 60.0

#: No control character (NUL, CR, LF, ...): such a string names no file and no valid URL.
SOURCE_PATTERN = r"^[^\x00-\x1f\x7f]+$"
#: A URL or local path of a job: 1-4096 characters matching :data:`SOURCE_PATTERN`. The
#: constraints are part of the published schema, so the document says what is enforced.
Source = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_URL_LENGTH, pattern=SOURCE_PATTERN),
]

#: Limits of a job's ``metadata``: keys, key length, a value's length serialised as
#: compact JSON, and the whole object's size in UTF-8 bytes serialised the same way.
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 512
MAX_METADATA_BYTES = 4096
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_METADATA_KEY_LENGTH)]
#: A JSON scalar: string (its quotes count towards the value limit), integer, finite
#: number, boolean or null.
MetadataValue = (
    Annotated[str, StringConstraints(strict=True, max_length=MAX_METADATA_VALUE_LENGTH - 2)]
    | Annotated[int, Field(strict=True)]
    | Annotated[float, Field(strict=True, allow_inf_nan=False)]
    | Annotated[bool, Field(strict=True)]
    | None
)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


class Aspect(enum.StrEnum):
    """The shape of a job's clip: the source's own, or a vertical or square crop of it."""

    SOURCE = "source"
    VERTICAL = "9:16"
    SQUARE = "1:1"
    PORTRAIT = "4:5"


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
    """A highlight request. Unknown fields are rejected; duration_s is a finite number."""

    # Every limit lives here, in the model: the API validates with it and publishes its
    # schema, so the two cannot differ. duration_s is strict: a JSON number only (no
    # string, no boolean), and only a finite one.

    model_config = ConfigDict(extra="forbid", frozen=True)

    video_url: Source = Field(..., description="http(s) URL or allowed local path")
    image_urls: list[Source] = Field(
        ..., min_length=1, max_length=MAX_IMAGES, description="product images (http(s) or local)"
    )
    title: str = Field("", max_length=MAX_TITLE_LENGTH)
    description: str = Field("", max_length=MAX_DESCRIPTION_LENGTH)
    duration_s: float = Field(
        5.0,
        ge=MIN_DURATION_S,
        le=MAX_DURATION_S,
        strict=True,
        allow_inf_nan=False,
        description="highlight length in seconds",
    )
    aspect: Aspect = Field(
        Aspect.SOURCE,
        description=(
            "the clip's shape: source (the source's picture, as it is), or 9:16, 1:1 or "
            "4:5, cut out of the source along a crop path that keeps the product in frame"
        ),
    )
    priority: PriorityClass = DEFAULT_PRIORITY
    callback_url: Source | None = Field(None, description="URL to POST the signed outcome to")
    upload_url: Source | None = Field(None, description="presigned HTTP PUT URL for the clip")
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        None,
        max_length=MAX_METADATA_KEYS,
        description=(
            "the caller's own data, stored with the job and returned as given in the job "
            f"and its callback: at most {MAX_METADATA_KEYS} keys of 1-"
            f"{MAX_METADATA_KEY_LENGTH} characters, each value a JSON scalar of at most "
            f"{MAX_METADATA_VALUE_LENGTH} characters as compact JSON, the whole object at "
            f"most {MAX_METADATA_BYTES} bytes as compact UTF-8 JSON"
        ),
        examples=[{"order_id": "A-1042", "sku": 31337, "campaign": None}],
    )

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Serialised-size limits (the schema states them; JSON Schema cannot check them).

        An empty object is no metadata (same job, same idempotency fingerprint).
        """
        if not value:
            return None
        for key, item in value.items():
            if len(_compact(item)) > MAX_METADATA_VALUE_LENGTH:
                raise ValueError(
                    f"the value of {key!r} exceeds {MAX_METADATA_VALUE_LENGTH} characters as JSON"
                )
        if len(_compact(value).encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata exceeds {MAX_METADATA_BYTES} bytes as JSON")
        return value

    def canonical_json(self) -> str:
        data = self.model_dump(mode="json")
        if data.get("metadata") is None:
            del data["metadata"]  # a spec without metadata keeps its fingerprint
        if data.get("aspect") == Aspect.SOURCE.value:
            del data["aspect"]  # so does one with the default aspect
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


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


class CropKey(BaseModel):
    """A keyframe of a crop path: source time (s) and the crop window (source pixels)."""

    t: float
    x: int
    y: int
    w: int
    h: int


class Reframe(BaseModel):
    """How a vertical or square clip was cut out of the source picture."""

    source: list[int] = Field(description="the source picture's width and height (px)")
    crop: list[int] = Field(description="the crop window's width and height (source px)")
    standard: bool = Field(
        description="the clip has the aspect's standard size (1080x1920, 1080x1080, "
        "1080x1350); false: the source is too small for it and the clip is not upscaled"
    )
    note: str | None = Field(None, description="why the clip is smaller than standard")
    follow: str = Field(
        description="what the path follows: product (its verified boxes), attention "
        "(a saliency map), or centre (the product was not seen)"
    )
    path: list[CropKey] = Field(
        default_factory=list,
        description="keyframes of the crop window; it moves linearly between them, frame "
        "by frame, and stays at the last one after it",
    )


class Highlight(BaseModel):
    start_s: float
    end_s: float
    score: float
    path: str | None = None  # the clip's file, when the artifact store is a local directory
    url: str | None = None  # where it was PUT (the job's upload_url without its query)
    artifact: str | None = None  # its key in the artifact store (clipline_core.artifacts)
    caption: str | None = None
    codec: str | None = None
    audio: bool | None = None
    frames: int | None = None
    product: ProductEvidence | None = None
    aspect: Aspect | None = None
    width: int | None = None  # the clip's picture (px)
    height: int | None = None
    reframe: Reframe | None = None  # the crop path of a vertical or square clip


class JobProgress(BaseModel):
    """How far a running job has come: its worker writes this at most every ~0.5 s.

    Stored as JSON in the job hash's ``progress`` field (:meth:`JobStore.set_progress
    <clipline_core.store.JobStore.set_progress>`); shown by ``clipline`` and the API's
    job document while the job runs.
    """

    stage: str = Field(description="the job's state when written: fetching, decoding, ...")
    frames: int = Field(0, description="sampled frames decoded so far")
    chunks_done: int = Field(0, description="chunks (frames and product images) scored so far")
    chunks: int = Field(
        0, description="chunks sent to the GPU daemon so far (the total once decoding ends)"
    )
    at: float = Field(0.0, description="unix time this was written")


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
    progress: JobProgress | None = None

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
