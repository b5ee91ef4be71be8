"""The result message format the daemon publishes and workers read (no torch needed).

One JSON object per processed item, pushed onto the job's Redis list
(``constants.results_key(deployment, job_id)``)::

    {"job_id", "attempt", "chunk", "kind": "frames"|"refs", "frames": T,
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
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

#: the message fields every reader may rely on
REQUIRED_FIELDS: tuple[str, ...] = (
    "job_id",
    "attempt",
    "chunk",
    "kind",
    "frames",
    "outputs",
    "trusted",
    "device",
    "error",
)


def encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return {"shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.float32).reshape(d["shape"])


def result_message(
    *,
    job_id: str,
    attempt: int,
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
        "attempt": attempt,
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
