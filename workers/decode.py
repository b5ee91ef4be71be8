"""Decode-and-sample stage: read a video with OpenCV and keep frames at a fixed rate.

**Which frames are kept** is a function of the frame index alone: with
``step = max(1, fps / sample_fps)`` the ``j``-th kept frame is frame
:func:`keep_index` ``(j) = ceil(j * step)``. Every reading strategy below keeps exactly
these frames, so they all hand the daemon the same pixels.

**Sparse sampling**: every frame is ``grab()``-ed (demux + decode) but only the kept
ones are ``retrieve()``-d (colour conversion and copy out of the decoder), resized and
written straight into the place the sink gives for their ordinal (a shared-memory
slot, :mod:`workers.preprocess`). Nothing but one decoded frame per reader is held at
full resolution.

**Parallel segments**: when the container allows accurate seeking, the kept ordinals
are split into ``K`` contiguous segments, each read by its own thread and
``VideoCapture`` that seeks to the segment's first kept frame. OpenCV seeks by
timestamp, which lands on the right frame only when the stream's timestamps follow
the frame index at a constant rate. So every reader checks each frame's timestamp
against ``t0 + index / fps`` (half a frame of tolerance), and at each boundary the
reader of the previous segment decodes one frame past its end and compares its
timestamp and pixels with the next segment's first frame. If any check fails the
parallel result is not used: when nothing past the first segment reached the sink's
consumer yet, the first reader simply carries on sequentially; otherwise the sink is
restarted under a new generation and the video is read again sequentially.
Containers whose timestamps do not fit (variable frame rate, AVIs with dropped
frames, streams with broken timing) therefore always end up read sequentially.

**Timestamps** are the decoder's presentation times (``CAP_PROP_POS_MSEC``) when they
increase strictly, else ``index / fps``. **Rotation** metadata is applied by the
decoder (portrait phone videos come out portrait); the angle is reported.

**Limits**: duration, frame count and resolution are checked against the container's
claims before decoding and against what really decodes while decoding
(``too_long``, ``resolution_too_high``). A stream that breaks mid-file keeps the
frames decoded before the break; fewer than ``min_decoded_frames`` is
``undecodable_video``.

This is the ``opencv`` decode backend and the reference the others
(:mod:`workers.decoders`: PyAV on the CPU, NVDEC on the GPU) keep the same frames,
timestamps and limits as.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from clipline_core import metrics as m
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings
from workers.preprocess import into

log = logging.getLogger("clipline.worker")

FALLBACK_FPS = 25.0
#: A segment must span at least this many frames, else reading is sequential.
MIN_SEGMENT_FRAMES = 64


class FrameSink(Protocol):
    """Where kept frames go: see :class:`workers.preprocess.ChunkedSink`."""

    @property
    def size(self) -> tuple[int, int]: ...

    def buffer(self, ordinal: int) -> np.ndarray: ...

    def commit(self, ordinal: int) -> None: ...

    def published_from(self, ordinal: int) -> bool: ...

    def truncate(self, count: int) -> None: ...

    def finish(self, count: int) -> None: ...

    def restart(self) -> None: ...


@dataclasses.dataclass
class VideoInfo:
    """What the decoder found; ``frame_times`` defaults to ``index / fps``."""

    fps: float
    width: int
    height: int
    declared_frames: int
    decoded_frames: int
    kept_timestamps: list[float]
    kept_indices: list[int] = dataclasses.field(default_factory=list)
    frame_times: np.ndarray | None = None  # presentation time of every decoded frame (s)
    rotation: int = 0
    mode: str = "sequential"  # sequential | parallel
    segments: int = 1
    fallback: str | None = None  # why a parallel read (or the configured backend) was not used
    decoder: str = "opencv"  # the backend that decoded (:mod:`workers.decoders`)

    def __post_init__(self) -> None:
        if self.frame_times is None:
            self.frame_times = np.arange(self.decoded_frames, dtype=np.float64) / self.fps

    @property
    def times(self) -> np.ndarray:
        assert self.frame_times is not None
        return self.frame_times

    @property
    def duration_s(self) -> float:
        if self.decoded_frames == 0:
            return 0.0
        return float(self.times[-1]) + 1.0 / self.fps

    def frames_between(self, start_s: float, end_s: float) -> tuple[int, int]:
        """(index of the first frame at or after ``start_s``, frames before ``end_s``)."""
        eps = 0.25 / self.fps
        first = int(np.searchsorted(self.times, start_s - eps, side="left"))
        last = int(np.searchsorted(self.times, end_s - eps, side="left"))
        return first, max(0, last - first)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fps": round(self.fps, 6),
            "width": self.width,
            "height": self.height,
            "rotation": self.rotation,
            "declared_frames": self.declared_frames,
            "decoded_frames": self.decoded_frames,
            "duration_s": round(self.duration_s, 6),
            "sampled_frames": len(self.kept_timestamps),
            "decode_mode": self.mode,
            "decode_segments": self.segments,
            "decoder": self.decoder,
        }


# ---------------------------------------------------------------------------
# Opening and probing.
# ---------------------------------------------------------------------------
def open_capture(path: Path, threads: int | None = None) -> cv2.VideoCapture:
    """Open ``path`` with OpenCV's FFmpeg backend, rotation metadata applied."""
    params = [] if threads is None else [cv2.CAP_PROP_N_THREADS, threads]
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        raise ClipError(ErrorCode.UNDECODABLE_VIDEO, "the video could not be opened by the decoder")
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    return cap


@dataclasses.dataclass
class Probe:
    fps: float
    width: int
    height: int
    declared: int
    rotation: int
    fps_known: bool


def probe(cap: cv2.VideoCapture, settings: Settings) -> tuple[float, int, int, int]:
    """(fps, width, height, declared frames), checked against the configured limits."""
    p = probe_video(cap, settings)
    return p.fps, p.width, p.height, p.declared


def probe_video(cap: cv2.VideoCapture, settings: Settings) -> Probe:
    """What the container claims, checked against the configured limits."""
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    fps_known = math.isfinite(fps) and 0.5 <= fps <= 1000.0
    if not fps_known:
        fps = FALLBACK_FPS
    width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
    height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    declared = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
    rotation = int(cap.get(cv2.CAP_PROP_ORIENTATION_META) or 0) % 360
    if max(width, height) > settings.max_resolution:
        raise ClipError(
            ErrorCode.RESOLUTION_TOO_HIGH,
            f"the video is {width}x{height}; "
            f"the limit is {settings.max_resolution} pixels per side",
        )
    if declared > settings.max_frames:
        raise ClipError(
            ErrorCode.TOO_LONG,
            f"the video has {declared} frames; the limit is {settings.max_frames} frames",
        )
    if fps_known and declared / fps > settings.max_duration_s:
        raise ClipError(
            ErrorCode.TOO_LONG,
            f"the video is {declared / fps:.0f} s long; "
            f"the limit is {settings.max_duration_s:.0f} s",
        )
    return Probe(fps, width, height, declared, rotation, fps_known)


def sample_step(fps: float, sample_fps: float) -> float:
    """Frames between kept frames (at least 1: every frame)."""
    return max(1.0, fps / sample_fps) if sample_fps > 0 else 1.0


def keep_index(j: int, step: float) -> int:
    """The frame index of the ``j``-th kept frame."""
    return math.ceil(j * step - 1e-6)


def kept_count(frames: int, step: float) -> int:
    """How many of the frames ``0 .. frames - 1`` are kept."""
    if frames <= 0:
        return 0
    j = max(0, int((frames - 1) / step) - 1)
    while keep_index(j, step) < frames:
        j += 1
    return j


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------
class _Limits:
    def __init__(self, settings: Settings) -> None:
        self.max_frames = settings.max_frames
        self.max_duration_s = settings.max_duration_s

    def check(self, index: int, t: float, t0: float) -> None:
        if index >= self.max_frames:
            raise ClipError(
                ErrorCode.TOO_LONG,
                f"the video has more than {self.max_frames} frames (the limit)",
            )
        if t - t0 > self.max_duration_s:
            raise ClipError(
                ErrorCode.TOO_LONG,
                f"the video is longer than the limit of {self.max_duration_s:.0f} s",
            )


def _msec(cap: cv2.VideoCapture) -> float:
    v = float(cap.get(cv2.CAP_PROP_POS_MSEC))
    return v / 1000.0 if math.isfinite(v) else math.nan


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).data, digest_size=16).digest()


@dataclasses.dataclass
class _Kept:
    ordinal: int
    index: int
    time: float


@dataclasses.dataclass
class _Reader:
    """State of one reader (a segment, or the whole video when sequential)."""

    cap: cv2.VideoCapture | None
    start: int  # first frame index
    end: int | None  # frame index to stop before (None: to the end of the stream)
    ordinal: int  # ordinal of the next kept frame
    times: list[float] = dataclasses.field(default_factory=list)
    kept: list[_Kept] = dataclasses.field(default_factory=list)
    index: int = 0  # index of the next frame to grab
    eof: bool = False
    first: tuple[float, bytes] | None = None  # (time, digest) of the first frame read
    witness: tuple[float, bytes] | None = None  # (time, digest) of frame ``end``
    witness_frame: np.ndarray | None = None
    problem: str | None = None


class _Shared:
    def __init__(self) -> None:
        self.stop = threading.Event()  # the parallel read is unusable: readers > 0 stop
        self.abort = threading.Event()  # an error ends the read: every reader stops
        self.reason: str | None = None
        self._lock = threading.Lock()

    def fail(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
        self.stop.set()


def _read(
    r: _Reader,
    sink: FrameSink,
    step: float,
    fps: float,
    limits: _Limits,
    t0: float | None,
    shared: _Shared | None,
    check_timing: bool,
) -> None:
    """Grab frames ``r.index ..`` until ``r.end`` (or the end), keeping the sampled ones."""
    h, w = sink.size
    tol = 0.5 / fps
    next_keep = keep_index(r.ordinal, step)
    cap = r.cap
    assert cap is not None
    origin = t0
    while True:
        if shared is not None and (shared.abort.is_set() or (r.start > 0 and shared.stop.is_set())):
            return  # an error elsewhere, or another reader found the parallel read unusable
        if r.end is not None and r.index >= r.end:
            if shared is not None and cap.grab():
                t = _msec(cap) or math.nan  # 0.0 past frame 0: no timestamp
                ok, frame = cap.retrieve()
                if ok and frame is not None and frame.size:
                    small = np.empty((h, w, 3), dtype=np.uint8)
                    into(frame, small)
                    r.witness = (t, _digest(small))
                    r.witness_frame = small
            return
        if not cap.grab():
            r.eof = True
            return
        t = _msec(cap)
        known = math.isfinite(t) and (t != 0.0 or r.index == 0)
        if not known:
            t = math.nan  # e.g. the last frame of a stream with B-frames: no timestamp
        if check_timing and shared is not None and known:
            expected = (t0 or 0.0) + r.index / fps
            if abs(t - expected) > tol:
                msg = (
                    f"frame {r.index} has timestamp {t:.4f} s, expected {expected:.4f} s "
                    "(timestamps do not follow the frame index)"
                )
                r.problem = r.problem or msg
                shared.fail(msg)
                check_timing = False
                if r.start > 0:
                    return
        if origin is None:
            origin = t if known else 0.0
        limits.check(r.index, t if known else origin + r.index / fps, origin)
        r.times.append(t)
        if r.index == next_keep:
            ok, frame = cap.retrieve()
            if not ok or frame is None or not frame.size:
                r.eof = True  # a frame that cannot be converted ends the stream here
                r.times.pop()
                return
            dst = sink.buffer(r.ordinal)
            into(frame, dst)
            if r.first is None and shared is not None and r.start > 0:
                r.first = (t, _digest(dst))
            sink.commit(r.ordinal)
            r.kept.append(_Kept(r.ordinal, r.index, t))
            r.ordinal += 1
            next_keep = keep_index(r.ordinal, step)
        elif r.first is None and shared is not None and r.start > 0:
            r.first = (t, b"")
        r.index += 1


def _times(raw: list[float], fps: float) -> np.ndarray:
    """Presentation times: the decoder's, gaps filled one frame on; else ``index / fps``."""
    arr = np.asarray(raw, dtype=np.float64)
    if arr.size == 0 or not math.isfinite(arr[0]):
        return np.arange(arr.size, dtype=np.float64) / fps
    for i in np.flatnonzero(~np.isfinite(arr)).tolist():
        arr[i] = arr[i - 1] + 1.0 / fps
    if arr.size == 1 or np.all(np.diff(arr) > 0):
        return arr
    return np.arange(arr.size, dtype=np.float64) / fps


def _segments(settings: Settings, requested: int | None) -> int:
    """``requested``, else ``Settings.decode_segments``."""
    return max(1, requested if requested is not None else settings.decode_segments)


def _threads(settings: Settings, requested: int | None, parallel: bool) -> int | None:
    """FFmpeg decoding threads per reader: ``requested``, else ``Settings.decode_threads``,
    else one per parallel reader and OpenCV's default for a sequential one.

    Parallel readers already occupy the cores; giving each FFmpeg's default of one
    thread per core oversubscribes them (measured on 2 cores: two readers of 1 thread
    each decoded MPEG-4 1.4x faster than two readers of 2 threads; see bench/README.md).
    """
    if requested is not None:
        return requested or None
    if settings.decode_threads > 0:
        return settings.decode_threads
    return 1 if parallel else None


def sample_video(
    path: Path,
    settings: Settings,
    sink: FrameSink,
    *,
    segments: int | None = None,
    threads: int | None = None,
) -> VideoInfo:
    """Decode ``path`` and write the frames kept at ``settings.sample_fps`` into ``sink``.

    ``segments`` (default ``Settings.decode_segments``, else 2) is the number of
    parallel readers to try; 1 reads sequentially. ``threads`` is FFmpeg's decoding
    threads per reader (default: see :func:`_threads`).
    """
    k = _segments(settings, segments)
    cap: cv2.VideoCapture | None = open_capture(path, _threads(settings, threads, k > 1))
    readers: list[_Reader] = []
    try:
        assert cap is not None
        p = probe_video(cap, settings)
        step = sample_step(p.fps, settings.sample_fps)
        limits = _Limits(settings)
        fallback: str | None = None
        if k > 1 and (not p.fps_known or p.declared < k * MIN_SEGMENT_FRAMES):
            fallback = "too short for parallel segments" if p.fps_known else "unknown fps"
            k = 1
        if k > 1:
            per_reader = _threads(settings, threads, True)
            outcome = _parallel(path, cap, p, settings, sink, step, k, limits, per_reader)
            cap = None  # owned (and released) by the parallel reader
            if isinstance(outcome, VideoInfo):
                return outcome
            fallback = outcome
            cap = open_capture(path, _threads(settings, threads, False))
        reader = _Reader(cap, 0, None, 0)
        readers.append(reader)
        _read(reader, sink, step, p.fps, limits, None, None, False)
        return _finish(p, sink, [reader], step, settings, "sequential", 1, fallback)
    finally:
        if cap is not None:
            cap.release()
        for r in readers:
            if r.cap is not None:
                r.cap.release()


def _parallel(
    path: Path,
    cap0: cv2.VideoCapture,
    p: Probe,
    settings: Settings,
    sink: FrameSink,
    step: float,
    k: int,
    limits: _Limits,
    threads: int | None,
) -> VideoInfo | str:
    """Read with ``k`` segment readers; the reason when the sink had to be restarted."""
    planned = kept_count(p.declared, step)
    ordinals = [planned * i // k for i in range(k)]
    starts = [keep_index(j, step) for j in ordinals]
    readers: list[_Reader] = []
    try:
        # Frame 0 fixes the time origin every reader checks its timestamps against.
        r0 = _Reader(cap0, 0, starts[1], 0)
        readers.append(r0)
        if not cap0.grab():
            raise ClipError(ErrorCode.UNDECODABLE_VIDEO, "no frame of the video could be decoded")
        t0 = _msec(cap0)
        ok, frame = cap0.retrieve()
        if not ok or frame is None or not frame.size:
            raise ClipError(ErrorCode.UNDECODABLE_VIDEO, "no frame of the video could be decoded")
        into(frame, sink.buffer(0))
        sink.commit(0)
        r0.times.append(t0)
        r0.kept.append(_Kept(0, 0, t0))
        r0.ordinal, r0.index = 1, 1
        shared = _Shared()
        if not math.isfinite(t0):
            shared.fail("the stream has no timestamps")
        for i in range(1, k):
            end = starts[i + 1] if i + 1 < k else None
            readers.append(_Reader(None, starts[i], end, ordinals[i], index=starts[i]))
        errors: list[BaseException] = []

        def run(r: _Reader) -> None:
            try:
                if r.cap is None:  # open and seek in this reader's own thread
                    r.cap = open_capture(path, threads)
                    if not r.cap.set(cv2.CAP_PROP_POS_FRAMES, r.start):
                        shared.fail(f"the container cannot seek to frame {r.start}")
                        return
                _read(r, sink, step, p.fps, limits, t0, shared, True)
            except BaseException as exc:
                errors.append(exc)
                shared.fail(f"{type(exc).__name__}: {exc}")
                shared.abort.set()

        pool = [
            threading.Thread(target=run, args=(r,), name=f"decode-{i}", daemon=True)
            for i, r in enumerate(readers)
        ]
        for th in pool:
            th.start()
        try:
            for th in pool:
                th.join()
        except BaseException:
            # Interrupted (soft time limit): stop the readers before their captures go.
            shared.abort.set()
            for th in pool:
                th.join()
            raise
        clip_errors = [e for e in errors if isinstance(e, ClipError)]
        if clip_errors and clip_errors[0].code != ErrorCode.UNDECODABLE_VIDEO:
            raise clip_errors[0]  # a limit (too long, ...) holds whichever way we read
        if any(not isinstance(e, ClipError) for e in errors):
            raise next(e for e in errors if not isinstance(e, ClipError))
        reason = shared.reason or _verify(readers, p.fps)
        if reason is None:
            return _finish(p, sink, readers, step, settings, "parallel", k, None)
        log.info("parallel decode of %s not usable (%s); reading sequentially", path.name, reason)
        # Fall back to the first reader, which read frames 0 .. starts[1] - 1 sequentially,
        # unless the consumer already has frames the other readers produced.
        if sink.published_from(ordinals[1]):
            for r in readers:
                if r.cap is not None:
                    r.cap.release()
            readers.clear()
            sink.restart()
            return reason
        sink.truncate(ordinals[1])
        if r0.eof:
            return _finish(p, sink, [r0], step, settings, "sequential", 1, reason)
        r0.end = None
        if r0.witness is not None and r0.witness_frame is not None:
            # The frame at starts[1] was decoded as the witness: it is kept frame ordinals[1].
            t, _ = r0.witness
            dst = sink.buffer(r0.ordinal)
            dst[...] = r0.witness_frame
            sink.commit(r0.ordinal)
            r0.times.append(t)
            r0.kept.append(_Kept(r0.ordinal, r0.index, t))
            r0.ordinal += 1
            r0.index += 1
            _read(r0, sink, step, p.fps, limits, None, None, False)
        return _finish(p, sink, [r0], step, settings, "sequential", 1, reason)
    finally:
        for r in readers:
            if r.cap is not None:
                r.cap.release()


def _verify(readers: list[_Reader], fps: float) -> str | None:
    """Why the segments do not join up into the sequential read, or None if they do."""
    for prev, nxt in itertools.pairwise(readers):
        if prev.problem or nxt.problem:
            return prev.problem or nxt.problem
        if prev.eof or prev.index != nxt.start:
            return f"the stream ended at frame {prev.index}, before frame {nxt.start}"
        if prev.witness is None or nxt.first is None:
            return f"frame {nxt.start} could not be decoded at a segment boundary"
        (ta, da), (tb, db) = prev.witness, nxt.first
        timed = math.isfinite(ta) and math.isfinite(tb)
        if (timed and abs(ta - tb) > 0.25 / fps) or (db and da != db):
            return f"seeking to frame {nxt.start} did not land on that frame"
    last = readers[-1]
    if last.problem:
        return last.problem
    if not last.times:
        return f"no frame decoded after seeking to frame {last.start}"
    return None


def _finish(
    p: Probe,
    sink: FrameSink,
    readers: list[_Reader],
    step: float,
    settings: Settings,
    mode: str,
    segments: int,
    fallback: str | None,
) -> VideoInfo:
    raw = [t for r in readers for t in r.times]
    kept = [kp for r in readers for kp in r.kept]
    decoded = len(raw)
    if decoded < settings.min_decoded_frames or not kept:
        raise ClipError(
            ErrorCode.UNDECODABLE_VIDEO,
            f"only {decoded} frame(s) of the video could be decoded; the stream is broken or empty",
        )
    times = _times(raw, p.fps)
    sink.finish(len(kept))
    m.FRAMES_DECODED.inc(len(kept))
    # The decoder reports the rotated size when it applies rotation metadata.
    return VideoInfo(
        fps=p.fps,
        width=p.width,
        height=p.height,
        declared_frames=p.declared,
        decoded_frames=decoded,
        kept_indices=[kp.index for kp in kept],
        kept_timestamps=[float(times[kp.index]) for kp in kept],
        frame_times=times,
        rotation=p.rotation,
        mode=mode,
        segments=segments,
        fallback=fallback,
    )


# ---------------------------------------------------------------------------
# Product images.
# ---------------------------------------------------------------------------
def load_image(path: Path, size: tuple[int, int], dst: np.ndarray, what: str) -> None:
    """Decode an image file (EXIF orientation applied) and write it resized (RGB) into ``dst``."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ClipError(ErrorCode.NOT_AN_IMAGE, f"{what} could not be decoded as an image")
    into(img, dst)


ImageLoader = Callable[[Path, tuple[int, int], np.ndarray, str], None]
