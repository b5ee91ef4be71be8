"""Highlight selection: turn the daemon's per-frame outputs into the best window.

Scoring (documented in the README):

1. **Product similarity** of each sampled frame to the product images, training-free,
   so it works on real footage without any learned weights:

   * colour-histogram intersection (8x8x8 RGB bins) — what colours the frame holds, in
     what amounts, wherever they are;
   * thumbnail correlation (8x8 RGB, zero-mean, cosine) — where the colours are;

   ``similarity = 0.6 * hist + 0.4 * (thumb + 1) / 2``, the best match over the images.
   When an embedding model with real weights is loaded, its cosine similarity is
   averaged in with weight 0.5.
2. **Visual activity**: the frame's motion (mean absolute change to the previous
   sampled frame) normalised by the video's largest; when a saliency model with real
   weights is loaded, its per-frame saliency is averaged in.
3. ``frame_score = 0.85 * similarity + 0.15 * activity``; the highlight is the window
   of the requested length with the highest mean frame score (earliest on ties).

A video not longer than the requested duration is its own highlight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gpu_service.wire import decode_array

W_HIST = 0.6
W_THUMB = 0.4
W_EMBED = 0.5
W_SIMILARITY = 0.85
W_ACTIVITY = 0.15


@dataclasses.dataclass
class Selection:
    start_s: float
    end_s: float
    score: float
    frame_scores: np.ndarray


def _concat(results: list[dict[str, Any]], name: str) -> np.ndarray | None:
    parts = [decode_array(r["outputs"][name]) for r in results if name in r["outputs"]]
    if not parts or len(parts) != len(results):
        return None
    return np.concatenate(parts, axis=0)


def _trusted(results: list[dict[str, Any]], model: str) -> bool:
    return bool(results) and all(r.get("trusted", {}).get(model, False) for r in results)


def frame_scores(frames: list[dict[str, Any]], refs: dict[str, Any]) -> np.ndarray:
    """Per-sampled-frame score in [0, 1] from the daemon's results (see module doc)."""
    hist = _concat(frames, "features.hist")
    thumb = _concat(frames, "features.thumb")
    motion = _concat(frames, "features.motion")
    if hist is None or thumb is None or motion is None:
        raise ValueError("results lack the features model's outputs")
    ref_hist = decode_array(refs["outputs"]["features.hist"])
    ref_thumb = decode_array(refs["outputs"]["features.thumb"])

    inter = np.minimum(hist[:, None, :], ref_hist[None, :, :]).sum(axis=-1)  # [N, R]
    corr = (thumb @ ref_thumb.T + 1.0) / 2.0  # [N, R]
    sim = W_HIST * inter + W_THUMB * corr
    if _trusted(frames, "embed") and _trusted([refs], "embed"):
        emb = _concat(frames, "embed.embed")
        ref_emb = (
            decode_array(refs["outputs"]["embed.embed"])
            if "embed.embed" in refs["outputs"]
            else None
        )
        if emb is not None and ref_emb is not None:
            sim = (1 - W_EMBED) * sim + W_EMBED * (emb @ ref_emb.T + 1.0) / 2.0
    similarity = sim.max(axis=1)

    activity = motion / motion.max() if motion.size and motion.max() > 0 else np.zeros_like(motion)
    if _trusted(frames, "saliency"):
        sal = _concat(frames, "saliency.saliency")
        if sal is not None and sal.max() > sal.min():
            sal = (sal - sal.min()) / (sal.max() - sal.min())
            activity = 0.5 * activity + 0.5 * sal
    return np.clip(W_SIMILARITY * similarity + W_ACTIVITY * activity, 0.0, 1.0)


def best_window(
    timestamps: np.ndarray, scores: np.ndarray, duration_s: float, length_s: float
) -> Selection:
    """The ``length_s`` window with the highest mean frame score within ``[0, duration_s]``."""
    if len(timestamps) != len(scores):
        raise ValueError(f"{len(timestamps)} timestamps but {len(scores)} scores")
    if duration_s <= length_s or len(scores) == 0:
        score = float(scores.mean()) if len(scores) else 0.0
        return Selection(0.0, duration_s, score, scores)
    latest = duration_s - length_s
    starts = np.unique(np.concatenate([timestamps[timestamps <= latest], [latest]]))
    best_start, best_score = 0.0, -1.0
    for s in starts.tolist():
        mask = (timestamps >= s - 1e-9) & (timestamps < s + length_s - 1e-9)
        if not mask.any():
            continue
        val = float(scores[mask].mean())
        if val > best_score + 1e-9:
            best_start, best_score = s, val
    return Selection(best_start, best_start + length_s, best_score, scores)


def select(
    results: list[dict[str, Any]], timestamps: list[float], duration_s: float, length_s: float
) -> Selection:
    """Choose the highlight from all of a job's results (frame chunks and the refs chunk)."""
    refs = [r for r in results if r["kind"] == "refs"]
    frames = sorted((r for r in results if r["kind"] == "frames"), key=lambda r: r["chunk"])
    if len(refs) != 1:
        raise ValueError(f"expected one reference result, got {len(refs)}")
    scores = frame_scores(frames, refs[0])
    return best_window(np.asarray(timestamps, dtype=np.float64), scores, duration_s, length_s)
