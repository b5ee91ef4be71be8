"""The worker <-> daemon protocol: typed messages and their JSON wire form (no torch).

Owns the result message format the daemon publishes and workers read, the caption
request and answer, the heartbeat's model field, the names of every model output
(:data:`FEATURES`, :data:`LOCALIZER`, ...: models declare theirs from here and the
workers' selector reads them by the same constants) and the typed views a worker uses
(:class:`ChunkResult`, :class:`CaptionResult`, :class:`JobResults`). Imports numpy and
the standard library only: workers import it without torch. Must not import the daemon,
the models or anything of the workers.

One JSON object per processed item, pushed onto the job's Redis list
(``constants.results_key(deployment, job_id)``)::

    {"job_id", "generation", "chunk", "kind": "frames"|"refs", "frames": T,
     "outputs": {"<model>.<output>": {"shape": [...], "b64": <float32 bytes>}},
     "trusted": {"<model>": bool}, "backends": {"<model>": "<backend>"},
     "device", "queue_wait_s", "inference_s", "latency_s", "batch", "batch_seq",
     "error": null | "<what went wrong>"}

``frames`` is the item's own frame count: every output's first dimension is ``T``
(padding the daemon added to batch the item is never sent). ``queue_wait_s`` is the
time from the item's publication in shared memory to its batch being formed,
``inference_s`` the device time of its batch (all models), ``latency_s`` the time from
publication to the result being handed to Redis, ``batch`` the number of real items
in its batch and ``batch_seq`` the daemon's running batch number (batches run in that
order). An item the daemon could not process carries ``error`` and empty ``outputs``;
workers fail the job with that reason. Readers must ignore fields they do not know.

Captions. A worker asks for a highlight caption by pushing one :class:`CaptionRequest`
(JSON ``{"job_id", "generation", "title", "description", "priority", "requested_at",
"expires_at"}``, times in epoch seconds) onto ``constants.caption_requests_key``; see
:mod:`gpu_service.captions`. The daemon answers on the same results list with one
more message of ``kind`` ``"caption"``: the fields above with ``chunk`` =
``CAPTION_CHUNK`` (-2), ``frames`` 0, empty ``outputs``, ``trusted`` =
``{"copywriter": bool}``, plus ``"caption": null | "<one line>"``. ``generation`` echoes
the request's. ``error`` set means this caption failed (the job does not: it finishes
without a caption); ``caption`` null without an error means the model had nothing to
say. ``queue_wait_s`` and ``latency_s`` count from ``requested_at``, ``batch`` is the
number of requests decoded together and ``batch_seq`` numbers caption batches apart
from frame batches.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

#: the message fields every reader may rely on
REQUIRED_FIELDS: tuple[str, ...] = (
    "job_id",
    "generation",
    "chunk",
    "kind",
    "frames",
    "outputs",
    "trusted",
    "device",
    "error",
)

#: ``kind`` of a caption answer, and the ``chunk`` number it carries
CAPTION_KIND = "caption"
CAPTION_CHUNK = -2
#: a request's texts are cut to these lengths (whitespace runs collapsed) before sending
MAX_REQUEST_TITLE_CHARS = 300
MAX_REQUEST_DESCRIPTION_CHARS = 1000


@dataclasses.dataclass(frozen=True)
class ModelOutputs:
    """The outputs one model produces: ``FEATURES["hist"] == "features.hist"``."""

    model: str
    keys: tuple[str, ...]

    def __getitem__(self, key: str) -> str:
        if key not in self.keys:
            raise KeyError(f"model {self.model!r} has no output {key!r} (it has {self.keys})")
        return f"{self.model}.{key}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{self.model}.{k}" for k in self.keys)


#: colour histogram, thumbnail and motion of every frame (training-free)
FEATURES = ModelOutputs("features", ("hist", "thumb", "motion"))
#: per-frame saliency (TASED-Net)
SALIENCY = ModelOutputs("saliency", ("saliency",))
#: per-frame image embedding (ViT)
EMBED = ModelOutputs("embed", ("embed",))
#: matched keypoint pairs against the job's product images, colour cells, the picture's
#: rectangle inside the letterbox and a status (see gpu_service.models.localizer)
LOCALIZER = ModelOutputs("localizer", ("pairs", "colour", "content", "status"))
#: the localizer's ``status`` per picture: this daemon had not seen the job's product
#: images (the worker retries the job), matched against them, a product image itself
LOCALIZER_NO_REFS, LOCALIZER_MATCHED, LOCALIZER_REFS = 0.0, 1.0, 2.0
#: per-frame cosine to the job's title and description (``text`` [1]) and to each of its
#: product images (``image`` [8], zero padded) under a CLIP model (gpu_service.models.clip)
CLIP = ModelOutputs("clip", ("text", "image"))


def encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return {"shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.float32).reshape(d["shape"])


def result_message(
    *,
    job_id: str,
    generation: int,
    chunk: int,
    kind: str,
    frames: int,
    outputs: Mapping[str, np.ndarray],
    trusted: Mapping[str, bool],
    backends: Mapping[str, str],
    device: str,
    queue_wait_s: float,
    inference_s: float,
    latency_s: float,
    batch: int,
    batch_seq: int,
    error: str | None = None,
) -> dict[str, Any]:
    """The message for one item (``outputs`` already cut to the item's ``frames``)."""
    return {
        "error": error,
        "job_id": job_id,
        "generation": generation,
        "chunk": chunk,
        "kind": kind,
        "frames": frames,
        "outputs": {k: encode_array(v) for k, v in outputs.items()},
        "trusted": dict(trusted),
        "backends": dict(backends),
        "device": device,
        "queue_wait_s": round(queue_wait_s, 6),
        "inference_s": round(inference_s, 6),
        "latency_s": round(latency_s, 6),
        "batch": batch,
        "batch_seq": batch_seq,
    }


def dumps(message: Mapping[str, Any]) -> str:
    """The JSON text pushed to Redis (compact)."""
    return json.dumps(message, separators=(",", ":"))


def loads(raw: bytes | str) -> dict[str, Any]:
    """Parse one message; raise ``ValueError`` if a required field is missing."""
    msg: dict[str, Any] = json.loads(raw)
    missing = [f for f in REQUIRED_FIELDS if f not in msg]
    if missing:
        raise ValueError(f"result message lacks {', '.join(missing)}")
    return msg


# ---------------------------------------------------------------------------
# Captions.
# ---------------------------------------------------------------------------
def _squash(text: str, limit: int) -> str:
    return " ".join(text.split())[:limit]


@dataclasses.dataclass(frozen=True)
class CaptionRequest:
    """One job's request for a caption (what a worker pushes; see the module docstring)."""

    job_id: str
    generation: int
    title: str
    description: str = ""
    priority: int = 1
    requested_at: float = 0.0
    expires_at: float = 0.0

    @classmethod
    def make(
        cls,
        *,
        job_id: str,
        generation: int,
        title: str,
        description: str,
        priority: int,
        now: float,
        ttl_s: float,
    ) -> CaptionRequest:
        """A request with its texts normalised and cut, expiring ``ttl_s`` after ``now``."""
        return cls(
            job_id=job_id,
            generation=generation,
            title=_squash(title, MAX_REQUEST_TITLE_CHARS),
            description=_squash(description, MAX_REQUEST_DESCRIPTION_CHARS),
            priority=priority,
            requested_at=now,
            expires_at=now + ttl_s,
        )

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: bytes | str) -> CaptionRequest:
        """Parse a request; ``ValueError`` if it is not one (unknown fields are ignored)."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"caption request is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("caption request is not a JSON object")
        try:
            req = cls(
                job_id=data["job_id"],
                generation=data["generation"],
                title=data.get("title", ""),
                description=data.get("description", ""),
                priority=data.get("priority", 1),
                requested_at=float(data.get("requested_at", 0.0)),
                expires_at=float(data.get("expires_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid caption request: {exc!r}") from None
        if not isinstance(req.job_id, str) or not req.job_id:
            raise ValueError("invalid caption request: job_id must be a non-empty string")
        if not isinstance(req.generation, int) or not isinstance(req.priority, int):
            raise ValueError("invalid caption request: generation and priority must be integers")
        if not isinstance(req.title, str) or not isinstance(req.description, str):
            raise ValueError("invalid caption request: title and description must be strings")
        return req


def caption_message(
    *,
    request: CaptionRequest,
    caption: str | None,
    model: str,
    trusted: bool,
    device: str,
    queue_wait_s: float,
    inference_s: float,
    latency_s: float,
    batch: int,
    batch_seq: int,
    error: str | None = None,
) -> dict[str, Any]:
    """The answer to one caption request (``caption`` None when ``error`` is set)."""
    return {
        "error": error,
        "job_id": request.job_id,
        "generation": request.generation,
        "chunk": CAPTION_CHUNK,
        "kind": CAPTION_KIND,
        "frames": 0,
        "outputs": {},
        "caption": None if error else caption,
        "trusted": {model: bool(trusted)},
        "backends": {model: "eager"},
        "device": device,
        "queue_wait_s": round(queue_wait_s, 6),
        "inference_s": round(inference_s, 6),
        "latency_s": round(latency_s, 6),
        "batch": batch,
        "batch_seq": batch_seq,
    }


def caption_of(results: Iterable[Mapping[str, Any]]) -> str | None:
    """The caption among a job's results: None if absent, failed or empty."""
    caption = JobResults.from_messages(results).caption
    return caption.caption if caption is not None else None


def parse_models(field: str) -> dict[str, tuple[str, bool]]:
    """The heartbeat's ``models`` field (``name:backend:trusted,...``) as a mapping."""
    out: dict[str, tuple[str, bool]] = {}
    for part in field.split(","):
        name, _, rest = part.strip().partition(":")
        backend, _, trusted = rest.partition(":")
        if name:
            out[name] = (backend, trusted.strip() == "1")
    return out


# ---------------------------------------------------------------------------
# Typed views of a job's results (what the worker's selector reads).
# ---------------------------------------------------------------------------
FRAMES_KIND = "frames"
REFS_KIND = "refs"


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    """The daemon's answer for one chunk (video frames or the product images)."""

    job_id: str
    generation: int
    chunk: int
    kind: str
    frames: int
    outputs: Mapping[str, np.ndarray]
    trusted: Mapping[str, bool]
    backends: Mapping[str, str]
    device: str
    error: str | None = None

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> ChunkResult:
        return cls(
            job_id=str(msg["job_id"]),
            generation=int(msg["generation"]),
            chunk=int(msg["chunk"]),
            kind=str(msg["kind"]),
            frames=int(msg["frames"]),
            outputs={k: decode_array(v) for k, v in msg.get("outputs", {}).items()},
            trusted=dict(msg.get("trusted", {})),
            backends=dict(msg.get("backends", {})),
            device=str(msg.get("device", "")),
            error=msg.get("error"),
        )


@dataclasses.dataclass(frozen=True)
class CaptionResult:
    """The daemon's answer to a caption request."""

    job_id: str
    generation: int
    caption: str | None
    error: str | None
    trusted: bool

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> CaptionResult:
        text = msg.get("caption")
        return cls(
            job_id=str(msg["job_id"]),
            generation=int(msg["generation"]),
            caption=text if isinstance(text, str) and text and not msg.get("error") else None,
            error=msg.get("error"),
            trusted=any(bool(v) for v in msg.get("trusted", {}).values()),
        )


@dataclasses.dataclass(frozen=True)
class JobResults:
    """All of one job's results: the refs chunk, the frame chunks in order, the caption."""

    refs: ChunkResult | None
    frames: tuple[ChunkResult, ...]
    caption: CaptionResult | None = None

    @classmethod
    def from_messages(cls, messages: Iterable[Mapping[str, Any]]) -> JobResults:
        refs: list[ChunkResult] = []
        frames: list[ChunkResult] = []
        caption: CaptionResult | None = None
        for msg in messages:
            kind = msg.get("kind")
            if kind == CAPTION_KIND:
                caption = CaptionResult.from_message(msg)
            elif kind == REFS_KIND:
                refs.append(ChunkResult.from_message(msg))
            elif kind == FRAMES_KIND:
                frames.append(ChunkResult.from_message(msg))
        if len(refs) > 1:
            raise ValueError(f"expected at most one reference result, got {len(refs)}")
        return cls(refs[0] if refs else None, tuple(sorted(frames, key=lambda r: r.chunk)), caption)

    def concat(self, name: str) -> np.ndarray | None:
        """Output ``name`` of every frame chunk, concatenated along frames; None if any
        chunk lacks it."""
        if not self.frames or any(name not in r.outputs for r in self.frames):
            return None
        return np.concatenate([r.outputs[name] for r in self.frames], axis=0)

    def ref(self, name: str) -> np.ndarray | None:
        """Output ``name`` of the product images (None without refs or that output)."""
        return None if self.refs is None else self.refs.outputs.get(name)

    def trusted(self, model: str) -> bool:
        """Whether every frame chunk (and the refs, when present) trusts ``model``."""
        chunks = [*self.frames, *([self.refs] if self.refs is not None else [])]
        return bool(chunks) and all(r.trusted.get(model, False) for r in chunks)
