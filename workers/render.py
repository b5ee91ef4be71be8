"""Render stage: cut the chosen window out of the source into a browser-playable clip.

With an ffmpeg (:mod:`workers.ffmpeg` picks it from the ``ffmpeg`` setting: by default
the static one in the ``imageio-ffmpeg`` wheel, else the system's) the clip is H.264
(yuv420p, ``+faststart``) with the source's audio re-encoded to AAC, in MP4. With none
it is VP9 in MP4 written by OpenCV's bundled FFmpeg libraries (no audio: OpenCV cannot
carry it). MPEG-4 part 2 (``mp4v``) is never used: browsers do not play it.

The clip keeps the source frame rate and holds exactly ``round(length * fps)`` frames,
counted from the frames that really decode (not from container metadata).

A vertical or square clip (a :class:`workers.reframe.CropPath`) is cut in the same
pass: with ffmpeg, a ``crop`` filter whose ``x``/``y`` expressions are the path's
keyframes as a piecewise-linear function of the frame number (a flat sum of clipped
ramps), then ``scale`` to the path's size; audio as always. With OpenCV, each frame is
cropped at its own window and resized. A clip of the source's aspect is rendered as it
always was.

A clip is owner-only (0600, whatever the umask), as is a directory made for it (0700):
it shows a customer's product and may not be public.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import cv2

from clipline_core.errors import ClipError, ErrorCode
from workers import ffmpeg as ffmpeg_tool
from workers.decode import open_capture
from workers.reframe import CropPath


@dataclasses.dataclass
class Rendered:
    path: Path
    frames: int
    fps: float
    codec: str
    audio: bool
    width: int | None = None  # the clip's picture (px), when known
    height: int | None = None


def render(
    src: Path,
    dest: Path,
    start_s: float,
    frames: int,
    fps: float,
    ffmpeg: str,
    timeout_s: float = 300.0,
    *,
    first_frame: int | None = None,
    crop: CropPath | None = None,
) -> Rendered:
    """Write ``frames`` frames from ``start_s`` of ``src`` to ``dest`` (an .mp4).

    ``ffmpeg`` is the ``ffmpeg`` setting: ``auto``, ``bundled``, ``system``, a path or
    name, or empty for the OpenCV fallback (see :mod:`workers.ffmpeg`).
    ``first_frame`` is the index of the decoded frame at ``start_s`` (the OpenCV path
    counts decoded frames; without it, ``round(start_s * fps)``). ``crop``: the crop
    path of a vertical or square clip (one window per output frame; the last one holds
    if the path is shorter).
    """
    if frames < 1:
        raise ClipError(ErrorCode.RENDER_FAILED, "nothing to render: the window holds no frame")
    if crop is not None and len(crop) == 0:
        raise ClipError(ErrorCode.RENDER_FAILED, "the crop path holds no frame")
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tool = ffmpeg_tool.find(ffmpeg)
    if tool is not None:
        return _render_ffmpeg(tool, src, dest, start_s, frames, fps, timeout_s, crop)
    first = round(start_s * fps) if first_frame is None else first_frame
    return _render_opencv(src, dest, first, frames, fps, crop)


def _ramps(keys: list[int], values: list[float]) -> str:
    """An ffmpeg expression of the frame number ``n``: linear between ``(key, value)``
    points, held after the last (a sum of clipped ramps, no nesting)."""
    terms = [f"{values[0] + 1e-3:.4f}"]  # a hair above: crop truncates, the path floors
    for a, b, va, vb in zip(keys, keys[1:], values, values[1:], strict=False):
        slope = (vb - va) / (b - a)
        if abs(slope) < 1e-7:
            continue
        terms.append(f"{'-' if slope < 0 else '+'}{abs(slope):.6f}*clip(n-{a},0,{b - a})")
    return "".join(terms)


def crop_filter(path: CropPath) -> str:
    """The ffmpeg filters that cut ``path`` out of each frame and scale it to its size."""
    keys = path.keyframes()
    cw, ch = path.crop
    ow, oh = path.size
    x = _ramps(keys, [float(path.x[k]) for k in keys])
    y = _ramps(keys, [float(path.y[k]) for k in keys])
    return f"crop=w={cw}:h={ch}:x='{x}':y='{y}':exact=1,scale={ow}:{oh}:flags=bicubic,setsar=1"


def _render_ffmpeg(
    tool: ffmpeg_tool.Ffmpeg,
    src: Path,
    dest: Path,
    start_s: float,
    frames: int,
    fps: float,
    timeout_s: float,
    crop: CropPath | None = None,
) -> Rendered:
    audio = ffmpeg_tool.has_audio(tool.path, src)
    video_filter = "scale=trunc(iw/2)*2:trunc(ih/2)*2" if crop is None else crop_filter(crop)
    tmp = dest.with_name(dest.name + ".part.mp4")
    cmd = [
        tool.path,
        "-nostdin",
        "-v",
        "error",
        "-y",
        "-ss",
        f"{start_s:.6f}",
        "-i",
        str(src),
        "-map",
        "0:v:0",
        "-frames:v",
        str(frames),
        "-vf",
        video_filter,
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-crf",
        "23",
        "-pix_fmt",
        "yuv420p",
        tool.fps_mode_flag,
        "passthrough",
    ]
    if audio:
        cmd += ["-map", "0:a:0", "-c:a", "aac", "-b:a", "128k", "-t", f"{frames / fps:.6f}"]
    cmd += ["-movflags", "+faststart", "-f", "mp4", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        tmp.unlink(missing_ok=True)
        raise ClipError(
            ErrorCode.RENDER_FAILED, f"ffmpeg did not finish within {timeout_s:.0f} s"
        ) from exc
    if proc.returncode != 0 or not tmp.exists() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        tail = proc.stderr.strip().splitlines()[-3:]
        raise ClipError(
            ErrorCode.RENDER_FAILED, "ffmpeg failed to render the clip: " + " | ".join(tail)
        )
    os.chmod(tmp, 0o600)
    tmp.replace(dest)
    size = crop.size if crop is not None else (None, None)
    return Rendered(dest, frames, fps, "h264", audio, *size)


def _render_opencv(
    src: Path, dest: Path, first: int, frames: int, fps: float, crop: CropPath | None = None
) -> Rendered:
    cap = open_capture(src)
    windows = crop.windows() if crop is not None else None
    tmp = dest.with_name(dest.name + ".part.mp4")
    writer: cv2.VideoWriter | None = None
    written = w = h = 0
    try:
        for _ in range(first):  # accurate: count decoded frames instead of seeking
            if not cap.grab():
                break
        while written < frames:
            ok, frame = cap.read()
            if not ok:
                break
            if crop is not None and windows is not None:
                x, y = (int(v) for v in windows[min(written, len(windows) - 1)])
                cw, ch = crop.crop
                frame = cv2.resize(
                    frame[y : y + ch, x : x + cw], crop.size, interpolation=cv2.INTER_AREA
                )
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter.fourcc(*"vp09"), fps, (w, h))
                if not writer.isOpened():
                    raise ClipError(ErrorCode.RENDER_FAILED, "OpenCV cannot write VP9 video here")
            writer.write(frame)
            written += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if written == 0:
        tmp.unlink(missing_ok=True)
        raise ClipError(ErrorCode.RENDER_FAILED, "no frame could be read for the clip")
    os.chmod(tmp, 0o600)
    tmp.replace(dest)
    return Rendered(dest, written, fps, "vp9", False, w, h)
