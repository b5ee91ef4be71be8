"""Fixtures of the worker tests (helpers in ``wlib``)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from wlib import Clips, FfClips, Origin, _ffmpeg, ffmpeg_exe, worker_settings

from clipline import samples
from clipline_core.settings import Settings


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


@pytest.fixture(scope="module")
def module_origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


@pytest.fixture
def wsettings(settings: Settings) -> Settings:
    return worker_settings(settings)


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    d = tmp_path_factory.mktemp("clips")
    mjpeg = samples.make_footage(d / "footage.avi", seconds=10.0, fps=24.0, seed=21)
    tiny = samples.make_footage(d / "tiny.avi", seconds=2.0, fps=12.0, size=(160, 120), seed=4)
    product = samples.make_product_image(d / "product.jpg", seed=3)
    return Clips(mjpeg, tiny, product)


@pytest.fixture(scope="session")
def ffclips(tmp_path_factory: pytest.TempPathFactory, clips: Clips) -> FfClips:
    if ffmpeg_exe() is None:
        return FfClips(None, None, None, None)
    d = tmp_path_factory.mktemp("ffclips")
    h264 = d / "footage.mp4"
    _ffmpeg("-i", str(clips.mjpeg), "-c:v", "libx264", "-preset", "ultrafast", "-g", "48",
            "-bf", "2", str(h264))  # fmt: skip
    vfr = d / "vfr.mp4"
    _ffmpeg(
        "-i", str(clips.mjpeg), "-vf", r"select=not(eq(mod(n\,7)\,3))",
        "-fps_mode", "vfr", "-c:v", "libx264", "-preset", "ultrafast", str(vfr),
    )  # fmt: skip
    plain = d / "plain.mp4"
    _ffmpeg("-i", str(clips.tiny), "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0",
            str(plain))  # fmt: skip
    rotated = d / "rotated.mp4"
    try:  # ffmpeg 6 and newer write a display matrix; older ones the rotate tag
        _ffmpeg("-display_rotation", "270", "-i", str(plain), "-c", "copy", str(rotated))
    except subprocess.CalledProcessError:
        _ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(rotated))
    return FfClips(h264, vfr, rotated, plain)
