"""Render stage: the clip keeps the source frame rate, its frames and (with ffmpeg) audio.

The ffmpeg is real: the static one from the ``imageio-ffmpeg`` wheel (a base
dependency), and the system's when one is installed; streams are read with
:func:`workers.ffmpeg.streams`, so no ffprobe is needed. The OpenCV VP9 fallback always.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from wlib import Clips

from clipline import samples
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings
from workers import ffmpeg as ffmpeg_tool
from workers import render

ROOT = Path(__file__).resolve().parents[2]


def probe(path: Path) -> tuple[str, int, float, list[str]]:
    """(fourcc, decoded frames, fps, audio codecs) of a clip."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode(errors="replace")
    n = 0
    while cap.grab():
        n += 1
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    cap.release()
    tool = ffmpeg_tool.find("bundled")
    assert tool is not None
    audio = [s.codec for s in ffmpeg_tool.streams(tool.path, path) if s.kind == "audio"]
    return fourcc, n, fps, audio


@pytest.fixture(scope="module")
def with_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("render")
    return samples.make_footage(d / "s.avi", seconds=4.0, fps=25.0, seed=2, audio=True)


def test_default_setting_is_auto_and_bundled_ffmpeg_has_h264_and_aac() -> None:
    assert Settings().ffmpeg == "auto"
    tool = ffmpeg_tool.find("bundled")
    assert tool is not None, "imageio-ffmpeg (a base dependency) ships no usable ffmpeg here"
    assert tool.origin == "bundled" and Path(tool.path).is_absolute()
    assert ffmpeg_tool.find("auto") == tool  # bundled first
    assert ffmpeg_tool.find("") is None
    assert ffmpeg_tool.find(str(Path(tool.path).parent / "no-such-ffmpeg")) is None


def test_opencv_fallback_is_vp9_from_the_given_frame(clips: Clips, tmp_path: Path) -> None:
    out = render.render(clips.mjpeg, tmp_path / "a.mp4", 2.0, 36, 24.0, "", first_frame=48)
    assert out.codec == "vp9" and out.frames == 36 and not out.audio
    fourcc, n, fps, audio = probe(out.path)
    assert fourcc.lower() in ("vp09", "vp90") and n == 36 and fps == pytest.approx(24.0)
    assert audio == []
    # the first frame of the clip is source frame 48
    cap = cv2.VideoCapture(str(clips.mjpeg))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 48)
    _, src = cap.read()
    cap.release()
    cap = cv2.VideoCapture(str(out.path))
    _, got = cap.read()
    cap.release()
    assert float(np.abs(src.astype(int) - got.astype(int)).mean()) < 12


@pytest.mark.parametrize("choice", ["auto", "bundled", "system"])
def test_ffmpeg_keeps_rate_and_audio(choice: str, with_audio: Path, tmp_path: Path) -> None:
    if choice == "system" and ffmpeg_tool.find("system") is None:
        pytest.skip("no system ffmpeg with libx264 and aac on PATH")
    out = render.render(with_audio, tmp_path / "b.mp4", 1.0, 50, 25.0, choice)
    assert out.codec == "h264" and out.audio
    assert os.stat(out.path).st_mode & 0o777 == 0o600
    fourcc, n, fps, audio = probe(out.path)
    assert fourcc in ("avc1", "h264") and n == 50 and fps == pytest.approx(25.0)
    assert audio == ["aac"]


def test_source_without_audio_gives_a_clip_without_audio(clips: Clips, tmp_path: Path) -> None:
    out = render.render(clips.mjpeg, tmp_path / "d.mp4", 2.0, 24, 24.0, "bundled")
    assert out.codec == "h264" and not out.audio
    fourcc, n, _, audio = probe(out.path)
    assert fourcc in ("avc1", "h264") and n == 24 and audio == []


def test_streams_are_read_without_ffprobe(with_audio: Path, clips: Clips, tmp_path: Path) -> None:
    tool = ffmpeg_tool.find("bundled")
    assert tool is not None
    kinds = [(s.kind, s.codec) for s in ffmpeg_tool.streams(tool.path, with_audio)]
    assert kinds == [("video", "mjpeg"), ("audio", "aac")]
    assert ffmpeg_tool.has_audio(tool.path, with_audio)
    assert not ffmpeg_tool.has_audio(tool.path, clips.mjpeg)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    assert ffmpeg_tool.streams(tool.path, junk) == []


def test_ffmpeg_without_libx264_is_not_used(clips: Clips, tmp_path: Path) -> None:
    """An ffmpeg build lacking libx264 (some distributions ship one) falls back to VP9."""
    real = ffmpeg_tool.find("bundled")
    assert real is not None
    fake = tmp_path / "ffmpeg"
    # A real ffmpeg whose encoder list lacks libx264: the bundled one, filtered.
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$2" = "-encoders" ]; then "{real.path}" "$@" | grep -v libx264; exit 0; fi\n'
        f'exec "{real.path}" "$@"\n'
    )
    fake.chmod(0o755)
    assert ffmpeg_tool.examine(str(fake)) is None
    out = render.render(clips.tiny, tmp_path / "e.mp4", 0.0, 12, 12.0, str(fake))
    assert out.codec == "vp9" and not out.audio


def test_render_needs_no_system_ffmpeg_or_ffprobe(with_audio: Path, tmp_path: Path) -> None:
    """With nothing on PATH, the default setting still gives H.264 + AAC."""
    dest = tmp_path / "f.mp4"
    code = textwrap.dedent(
        f"""
        import shutil
        from pathlib import Path
        from workers import render
        assert shutil.which("ffmpeg") is None and shutil.which("ffprobe") is None
        out = render.render(Path({str(with_audio)!r}), Path({str(dest)!r}), 1.0, 25, 25.0, "auto")
        print(out.codec, out.audio, out.frames)
        """
    )
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["h264", "True", "25"]
    _, n, _, audio = probe(dest)
    assert n == 25 and audio == ["aac"]


def test_nothing_to_render(clips: Clips, tmp_path: Path) -> None:
    with pytest.raises(ClipError) as e:
        render.render(clips.tiny, tmp_path / "c.mp4", 0.0, 0, 12.0, "")
    assert e.value.code == ErrorCode.RENDER_FAILED
