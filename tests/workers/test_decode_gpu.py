"""The nvdec decode backend on CUDA against the OpenCV reference.

Run by ``bench/gpu_check.sh`` on a GPU machine; every test skips, saying why, where CUDA,
PyNvVideoCodec or PyAV is missing (``pytest -rs`` prints the reasons). Self-contained
(``--noconftest``): the videos are encoded here with PyAV's libx264 (H.264 with
B-frames at 640x360, BT.709-tagged 720p, 1080p whose coded height, 1088, is cropped),
plus the real sample ``Megamind.avi`` (MPEG-4 Part 2) when the media folder is there.

For each, nvdec must keep exactly OpenCV's frames and give OpenCV's timestamps within
half a frame; its pixels must agree with OpenCV's to a mean of 1.5 grey levels (and a
99th percentile of 6): NVDEC's H.264 decoding is bit-exact, so what differs is the
NV12 -> RGB conversion and the resize rounding, the bound
``tests/workers/test_decoders.py`` holds the same torch code to on the CPU. A codec
NVDEC lacks (MJPEG, here) must come out as well: read by OpenCV, the reason recorded.
"""

from __future__ import annotations

import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from clipline import samples
from clipline_core.settings import Settings
from workers import decode, decoders, preprocess
from workers.preprocess import MemorySink

pytestmark = pytest.mark.gpu

SETTINGS = Settings(sample_fps=3.0)
SIZE = 288
MAD = 1.5
P99 = 6


@pytest.fixture(scope="module")
def nvdec() -> str:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")
    why = decoders.unavailable("nvdec")
    if why is not None:
        pytest.skip(f"nvdec cannot run here: {why}")
    return "nvdec"


def _encode(
    path: Path, seconds: float, fps: int, size: tuple[int, int], bt709: bool = False
) -> Path:
    """H.264 (libx264 through PyAV) with B-frames, yuv420p, from synthetic footage."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "bf": "2", "g": str(2 * fps)}
        if bt709:
            stream.options |= {"colorprim": "bt709", "transfer": "bt709", "colormatrix": "bt709"}
            stream.codec_context.colorspace = 1
        for bgr in samples.footage_frames(round(seconds * fps), size, seed=sum(size)):
            frame = av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def videos(nvdec: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("nvdec")
    out = {
        "h264-360p": _encode(d / "h264.mp4", 4.0, 24, (640, 360)),
        "bt709-720p": _encode(d / "bt709.mp4", 2.0, 30, (1280, 720), bt709=True),
        "h264-1080p": _encode(d / "h1080.mp4", 1.5, 24, (1920, 1080)),
        "mjpeg": samples.make_footage(d / "footage.avi", seconds=3.0, fps=24.0, seed=2),
    }
    media = samples.real_media_dir()
    if media is not None and (media / "Megamind.avi").is_file():
        out["Megamind.avi"] = media / "Megamind.avi"
    return out


def _read(path: Path, backend: str) -> tuple[decode.VideoInfo, np.ndarray]:
    sink = MemorySink(8, SIZE, SIZE)
    info = decoders.sample_video(path, SETTINGS, sink, backend=backend)
    return info, sink.frames_array()


def _check_close(path: Path, must_use_nvdec: bool) -> None:
    ref, ref_frames = _read(path, "opencv")
    info, frames = _read(path, "nvdec")
    assert info.kept_indices == ref.kept_indices and len(ref.kept_indices) >= 3
    assert info.decoded_frames == ref.decoded_frames
    np.testing.assert_allclose(info.kept_timestamps, ref.kept_timestamps, atol=0.5 / ref.fps)
    assert frames.shape == ref_frames.shape
    if info.decoder == "opencv":  # a codec NVDEC lacks: OpenCV read it, the reason kept
        assert not must_use_nvdec, info.fallback
        assert info.fallback and info.fallback.startswith("nvdec could not read")
        assert np.array_equal(frames, ref_frames)
        return
    assert info.decoder == "nvdec" and info.fallback is None
    diff = np.abs(frames.astype(np.int16) - ref_frames.astype(np.int16))
    assert float(diff.mean()) <= MAD, float(diff.mean())
    assert float(np.percentile(diff, 99)) <= P99
    assert np.array_equal(frames == 0, ref_frames == 0)  # the same letterbox bars


@pytest.mark.parametrize("name", ["h264-360p", "bt709-720p", "h264-1080p"])
def test_nvdec_keeps_the_opencv_frames(name: str, videos: dict[str, Path]) -> None:
    _check_close(videos[name], must_use_nvdec=True)


@pytest.mark.parametrize("name", ["mjpeg", "Megamind.avi"])
def test_nvdec_reads_other_codecs_or_falls_back(name: str, videos: dict[str, Path]) -> None:
    if name not in videos:
        pytest.skip(f"real sample media {name} not found (set CLIPLINE_MEDIA_DIR)")
    _check_close(videos[name], must_use_nvdec=False)


def test_nvdec_frames_go_straight_into_shared_memory_slots(
    videos: dict[str, Path], tmp_path: Path
) -> None:
    """The real arena: one device-to-host copy per kept frame, into the slot."""
    from gpu_service.shm import ArenaLayout, ChunkKind, Consumer, Producer

    path = videos["h264-360p"]
    layout = ArenaLayout(
        n_slots=8, slot_bytes=4 << 20, frames_per_chunk=8, frame_height=SIZE, frame_width=SIZE
    )
    arena, sock = tmp_path / "n.arena", tmp_path / "n.sock"
    consumer = Consumer(arena, sock, layout, "t-nvdec")
    producer = Producer(arena, sock, 5.0)
    try:
        sink = preprocess.SlotSink(producer, "job-nvdec", preprocess.generation(1), 1, 1.0)
        sink.publish_refs(lambda arr: 0)
        info = decoders.sample_video(path, SETTINGS, sink, backend="nvdec")
        assert info.decoder == "nvdec"
        got: dict[int, np.ndarray] = {}
        for d in consumer.take_next(64):
            if d.kind == ChunkKind.FRAMES:
                got[d.chunk] = consumer.array(d).copy()
            consumer.release(d)
        assert sorted(got) == list(range(math.ceil(len(info.kept_indices) / 8)))
        frames = np.concatenate([got[c] for c in sorted(got)])
        _, ref_frames = _read(path, "opencv")
        diff = np.abs(frames.astype(np.int16) - ref_frames.astype(np.int16))
        assert float(diff.mean()) <= MAD
    finally:
        producer.close()
        consumer.close()
