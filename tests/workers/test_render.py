"""Render stage: the clip keeps the source frame rate, its frames and (with ffmpeg) audio.

Real ffmpeg/ffprobe when installed (H.264 + AAC); the OpenCV VP9 fallback always.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from wlib import Clips

from clipline import samples
from clipline_core.errors import ClipError, ErrorCode
from workers import render


def probe(path: Path) -> tuple[str, int, float, bool]:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode(errors="replace")
    n = 0
    while cap.grab():
        n += 1
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    cap.release()
    audio = False
    ffprobe = shutil.which("ffprobe")
    if ffprobe:
        out = subprocess.run(
            [ffprobe, "-v", "error", "-select_streams", "a", "-show_entries", "stream=codec_name",
             "-of", "csv=p=0", str(path)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        audio = out == "aac"
    return fourcc, n, fps, audio


def test_opencv_fallback_is_vp9_from_the_given_frame(clips: Clips, tmp_path: Path) -> None:
    out = render.render(clips.mjpeg, tmp_path / "a.mp4", 2.0, 36, 24.0, "", first_frame=48)
    assert out.codec == "vp9" and out.frames == 36 and not out.audio
    fourcc, n, fps, _ = probe(out.path)
    assert fourcc.lower() in ("vp09", "vp90") and n == 36 and fps == pytest.approx(24.0)
    # the first frame of the clip is source frame 48
    cap = cv2.VideoCapture(str(clips.mjpeg))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 48)
    _, src = cap.read()
    cap.release()
    cap = cv2.VideoCapture(str(out.path))
    _, got = cap.read()
    cap.release()
    assert float(np.abs(src.astype(int) - got.astype(int)).mean()) < 12


def test_ffmpeg_keeps_rate_and_audio(tmp_path: Path) -> None:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.skip("ffmpeg is not installed")
    src = samples.make_footage(tmp_path / "s.avi", seconds=4.0, fps=25.0, seed=2, audio=True)
    out = render.render(src, tmp_path / "b.mp4", 1.0, 50, 25.0, "ffmpeg")
    assert out.codec == "h264" and out.audio
    fourcc, n, fps, audio = probe(out.path)
    assert fourcc in ("avc1", "h264") and n == 50 and fps == pytest.approx(25.0) and audio


def test_nothing_to_render(clips: Clips, tmp_path: Path) -> None:
    with pytest.raises(ClipError) as e:
        render.render(clips.tiny, tmp_path / "c.mp4", 0.0, 0, 12.0, "")
    assert e.value.code == ErrorCode.RENDER_FAILED
