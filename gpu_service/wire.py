"""The result message format the daemon publishes and workers read (no torch needed).

One JSON object per processed item on the job's Redis list::

    {"job_id", "attempt", "chunk", "kind": "frames"|"refs", "frames": T,
     "outputs": {"<model>.<output>": {"shape": [...], "b64": <float32 bytes>}},
     "trusted": {"<model>": bool}, "device", "queue_wait_s", "inference_s",
     "error": null | "<what went wrong>"}
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np


def encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return {"shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.float32).reshape(d["shape"])
