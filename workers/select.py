"""Highlight selection: turn the daemon's per-frame outputs into the best window.

With the product localizer's outputs (the default model set), the window is the one
where the product is found: :mod:`workers.localize` (verified geometry, colour over
regions for low-texture products, no reward for motion), and the selection carries
``product`` (found, verified frames, mean inliers, the product's box over the clip).

Without them (a model set without ``localizer``), the whole-frame scorer below, kept
for comparison (``clipline bench quality`` measures both):

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

from gpu_service.protocol import EMBED, FEATURES, SALIENCY, JobResults
from workers import localize

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
    #: where the product is (``highlight.product``); None from the whole-frame scorer
    product: dict[str, Any] | None = None


def frame_scores(results: JobResults) -> np.ndarray:
    """Per-sampled-frame score in [0, 1] from the daemon's results (see module doc)."""
    hist = results.concat(FEATURES["hist"])
    thumb = results.concat(FEATURES["thumb"])
    motion = results.concat(FEATURES["motion"])
    ref_hist = results.ref(FEATURES["hist"])
    ref_thumb = results.ref(FEATURES["thumb"])
    if hist is None or thumb is None or motion is None or ref_hist is None or ref_thumb is None:
        raise ValueError("results lack the features model's outputs")

    inter = np.minimum(hist[:, None, :], ref_hist[None, :, :]).sum(axis=-1)  # [N, R]
    corr = (thumb @ ref_thumb.T + 1.0) / 2.0  # [N, R]
    sim = W_HIST * inter + W_THUMB * corr
    if results.trusted(EMBED.model):
        emb = results.concat(EMBED["embed"])
        ref_emb = results.ref(EMBED["embed"])
        if emb is not None and ref_emb is not None:
            sim = (1 - W_EMBED) * sim + W_EMBED * (emb @ ref_emb.T + 1.0) / 2.0
    similarity = sim.max(axis=1)

    activity = motion / motion.max() if motion.size and motion.max() > 0 else np.zeros_like(motion)
    if results.trusted(SALIENCY.model):
        sal = results.concat(SALIENCY["saliency"])
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
    results: JobResults, timestamps: list[float], duration_s: float, length_s: float
) -> Selection:
    """Choose the highlight from all of a job's results (frame chunks and the refs chunk)."""
    if results.refs is None:
        raise ValueError("expected one reference result, got none")
    ts = np.asarray(timestamps, dtype=np.float64)
    if localize.has_localizer(results):
        ev = localize.evidence(results)
        win = localize.choose_window(ts, ev.evidence, duration_s, length_s)
        product = localize.summary(ev, ts, win)
        return Selection(win.start_s, win.end_s, win.score, ev.evidence, product)
    scores = frame_scores(results)
    return best_window(np.asarray(timestamps, dtype=np.float64), scores, duration_s, length_s)
