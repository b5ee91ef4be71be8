"""Decode-and-sample stage: read a video with OpenCV and keep frames at a fixed rate.

Sampling is sparse: every frame is ``grab()``-ed (demux + decode, cheap) but only
the kept ones are ``retrieve()``-d (colour conversion and copy out of the decoder),
resized to the daemon's input size and written straight into the destination the
caller supplies (a shared-memory slot). No full-resolution copy of the video is ever
held: one decoded frame at a time.

Container metadata can lie (a header may announce more frames than the stream
holds): the frame count, duration and timestamps reported are those of the frames
that actually decoded. A stream that breaks mid-file keeps the frames decoded before
the break; fewer than ``min_decoded_frames`` is ``undecodable_video``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from clipline import metrics as m
from clipline.config import Settings
from clipline.errors import ClipError, ErrorCode

FALLBACK_FPS = 25.0


class FrameSink(Protocol):
    """Where kept frames go, one ``[H, W, 3]`` uint8 RGB buffer at a time."""

    def frame_buffer(self) -> np.ndarray: ...

    def commit(self, timestamp_s: float) -> None: ...


@dataclasses.dataclass
class VideoInfo:
    fps: float
    width: int
    height: int
    declared_frames: int
    decoded_frames: int
    kept_timestamps: list[float]

    @property
    def duration_s(self) -> float:
        return self.decoded_frames / self.fps if self.fps > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "fps": round(self.fps, 6),
            "width": self.width,
            "height": self.height,
            "declared_frames": self.declared_frames,
            "decoded_frames": self.decoded_frames,
            "duration_s": round(self.duration_s, 6),
            "sampled_frames": len(self.kept_timestamps),
        }


def open_capture(path: Path) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise ClipError(ErrorCode.UNDECODABLE_VIDEO, "the video could not be opened by the decoder")
    return cap


def probe(cap: cv2.VideoCapture, settings: Settings) -> tuple[float, int, int, int]:
    """(fps, width, height, declared frames), enforcing the resolution limit."""
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    if not (math.isfinite(fps) and 0.5 <= fps <= 1000.0):
        fps = FALLBACK_FPS
    width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
    height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    if max(width, height) > settings.max_resolution:
        raise ClipError(
            ErrorCode.RESOLUTION_TOO_HIGH,
            f"the video is {width}x{height}; "
            f"the limit is {settings.max_resolution} pixels per side",
        )
    return fps, width, height, max(declared, 0)


def sample_video(
    path: Path, settings: Settings, sink: FrameSink, size: tuple[int, int]
) -> VideoInfo:
    """Decode ``path`` and push frames kept at ``settings.sample_fps`` into ``sink``.

    ``size`` is the (height, width) each kept frame is resized to.
    """
    cap = open_capture(path)
    try:
        fps, width, height, declared = probe(cap, settings)
        step = max(1.0, fps / settings.sample_fps)
        max_frames = min(settings.max_frames, int(settings.max_duration_s * fps) + 1)
        h, w = size
        small = np.empty((h, w, 3), dtype=np.uint8)
        kept: list[float] = []
        next_keep = 0.0
        index = 0
        while cap.grab():
            if index >= next_keep - 1e-6:
                ok, frame = cap.retrieve()
                if ok and frame is not None and frame.size:
                    cv2.resize(frame, (w, h), dst=small, interpolation=cv2.INTER_AREA)
                    cv2.cvtColor(small, cv2.COLOR_BGR2RGB, dst=sink.frame_buffer())
                    sink.commit(index / fps)
                    kept.append(index / fps)
                next_keep += step
            index += 1
            if index > max_frames:
                raise ClipError(
                    ErrorCode.TOO_LONG,
                    f"the video is longer than the limit of {settings.max_duration_s:.0f} s",
                )
    finally:
        cap.release()
    if index < settings.min_decoded_frames or len(kept) == 0:
        raise ClipError(
            ErrorCode.UNDECODABLE_VIDEO,
            f"only {index} frame(s) of the video could be decoded; the stream is broken or empty",
        )
    m.FRAMES_DECODED.inc(len(kept))
    return VideoInfo(fps, width, height, declared, index, kept)


def load_image(path: Path, size: tuple[int, int], dst: np.ndarray, what: str) -> None:
    """Decode an image file and write it resized (RGB) into ``dst``."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ClipError(ErrorCode.NOT_AN_IMAGE, f"{what} could not be decoded as an image")
    h, w = size
    small = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    cv2.cvtColor(small, cv2.COLOR_BGR2RGB, dst=dst)
