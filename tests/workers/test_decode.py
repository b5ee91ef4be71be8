"""Decode and sample: sparse sampling, parallel segments, fallbacks, limits, rotation.

Everything decodes real files with OpenCV: videos generated here (MJPEG by OpenCV;
H.264, variable frame rate and rotated MP4 by ffmpeg when it is installed) and the real
sample videos when ``../shared/media`` is present. The sink is the in-memory one,
except in the shared-memory test, which writes into a real arena read back by the
daemon's consumer class.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from wlib import Clips, FfClips, _ffmpeg, corrupt_avi_frame, need

from clipline import samples
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings
from gpu_service.shm import ArenaLayout, ChunkKind, Consumer, Producer
from workers import decode, preprocess
from workers.preprocess import MemorySink

SIZE = 32


def read(
    path: Path, settings: Settings, segments: int, frames: int = 8
) -> tuple[decode.VideoInfo, MemorySink]:
    sink = MemorySink(frames, SIZE, SIZE)
    info = decode.sample_video(path, settings, sink, segments=segments)
    return info, sink


def assert_same(a: tuple[decode.VideoInfo, MemorySink], b: tuple[decode.VideoInfo, MemorySink]):
    (ia, sa), (ib, sb) = a, b
    assert ia.kept_indices == ib.kept_indices
    assert ia.decoded_frames == ib.decoded_frames
    np.testing.assert_allclose(ia.kept_timestamps, ib.kept_timestamps, atol=1e-6)
    fa, fb = sa.frames_array(), sb.frames_array()
    assert fa.shape == fb.shape and fa.shape[0] == len(ia.kept_indices)
    assert np.array_equal(fa, fb)
    assert sorted(sa.chunks) == sorted(sb.chunks)


def test_keep_index_matches_a_running_sampler() -> None:
    for fps, rate in [(24.0, 4.0), (23.976, 4.0), (30.0, 7.0), (25.0, 25.0), (59.94, 3.0)]:
        step = decode.sample_step(fps, rate)
        kept, nxt = [], 0.0
        for i in range(1000):
            if i >= nxt - 1e-6:
                kept.append(i)
                nxt += step
        assert [decode.keep_index(j, step) for j in range(len(kept))] == kept
        assert decode.kept_count(1000, step) == len(kept)
        assert decode.kept_count(0, step) == 0


@pytest.mark.parametrize("segments", [2, 3])
def test_parallel_segments_keep_exactly_the_sequential_frames(clips: Clips, segments: int) -> None:
    settings = Settings(sample_fps=3.0)
    seq = read(clips.mjpeg, settings, 1)
    par = read(clips.mjpeg, settings, segments)
    assert seq[0].mode == "sequential"
    assert par[0].mode == "parallel" and par[0].segments == segments, par[0].fallback
    assert_same(seq, par)
    assert seq[0].decoded_frames == 240
    assert seq[0].kept_indices[:4] == [0, 8, 16, 24]


def test_decoding_threads_per_reader_follow_the_policy_and_never_change_frames(
    ffclips: FfClips,
) -> None:
    """One FFmpeg thread per parallel reader by default; any thread count, same frames."""
    auto, pinned = Settings(sample_fps=3.0), Settings(sample_fps=3.0, decode_threads=3)
    assert decode._threads(auto, None, parallel=True) == 1
    assert decode._threads(auto, None, parallel=False) is None  # OpenCV's default
    assert decode._threads(pinned, None, parallel=True) == 3
    assert decode._threads(pinned, 2, parallel=False) == 2
    assert decode._threads(pinned, 0, parallel=True) is None
    path = need(ffclips.h264)  # frame-threaded H.264 with B-frames reorders output
    base = read(path, auto, 1)
    for threads in (1, 2):
        for segments in (1, 2):
            sink = MemorySink(8, SIZE, SIZE)
            info = decode.sample_video(path, auto, sink, segments=segments, threads=threads)
            assert_same(base, (info, sink))
    assert read(path, pinned, 2)[0].mode == "parallel"


def test_parallel_on_h264_with_b_frames(ffclips: FfClips) -> None:
    path = need(ffclips.h264)
    settings = Settings(sample_fps=3.0)
    seq = read(path, settings, 1)
    par = read(path, settings, 2)
    assert par[0].mode == "parallel", par[0].fallback
    assert_same(seq, par)


def test_real_videos_parallel_and_fallback(real_media: Path) -> None:
    settings = Settings(sample_fps=3.0)
    seq = read(real_media / "Megamind.avi", settings, 1)
    par = read(real_media / "Megamind.avi", settings, 2)
    assert par[0].mode == "parallel", par[0].fallback
    assert_same(seq, par)
    # tree.avi: 444 frames announced, 68 real ones with gaps in their timestamps.
    seq = read(real_media / "tree.avi", settings, 1)
    par = read(real_media / "tree.avi", settings, 2)
    assert par[0].mode == "sequential"
    assert par[0].fallback is not None and "timestamp" in par[0].fallback
    assert_same(seq, par)
    assert seq[0].decoded_frames == 68
    assert seq[0].duration_s == pytest.approx(29.6, abs=0.2)  # real time, not 68 / 15 fps


def test_variable_frame_rate_falls_back_to_sequential(ffclips: FfClips) -> None:
    path = need(ffclips.vfr)
    settings = Settings(sample_fps=3.0)
    seq = read(path, settings, 1)
    par = read(path, settings, 2)
    assert par[0].mode == "sequential" and par[0].fallback
    assert_same(seq, par)
    times = seq[0].times
    assert np.all(np.diff(times) > 0)
    assert times[-1] == pytest.approx(10.0, abs=0.1)  # presentation times, gaps included


def test_break_found_late_restarts_the_sink_and_matches_sequential(
    clips: Clips, tmp_path: Path
) -> None:
    """A frame that fails late in the first segment, after the second one published."""
    broken = corrupt_avi_frame(clips.mjpeg, tmp_path / "broken.avi", 90)
    settings = Settings(sample_fps=3.0)
    seq = read(broken, settings, 1, frames=2)
    sink = MemorySink(2, SIZE, SIZE)
    info = decode.sample_video(broken, settings, sink, segments=2)
    assert seq[0].decoded_frames == 90  # the sequential read stops at the break
    assert info.mode == "sequential"
    assert info.fallback is not None
    assert sink.restarts == 1  # chunks of the second segment had been published
    assert_same(seq, (info, sink))


def test_break_found_at_a_seek_falls_back_without_restarting(clips: Clips, tmp_path: Path) -> None:
    """The second reader's seek runs into the broken frame: the first reader carries on."""
    broken = corrupt_avi_frame(clips.mjpeg, tmp_path / "broken.avi", 110)
    settings = Settings(sample_fps=3.0)
    seq = read(broken, settings, 1, frames=2)
    sink = MemorySink(2, SIZE, SIZE)
    info = decode.sample_video(broken, settings, sink, segments=2)
    assert seq[0].decoded_frames == 110
    assert info.mode == "sequential" and info.fallback is not None
    assert sink.restarts == 0
    assert_same(seq, (info, sink))


def test_truncated_video_degrades_or_fails(clips: Clips, tmp_path: Path) -> None:
    settings = Settings(sample_fps=3.0)
    half = samples.truncate(clips.mjpeg, tmp_path / "half.avi", 0.5)
    info, sink = read(half, settings, 2)
    assert 100 <= info.decoded_frames < 240  # the frames before the cut
    assert sink.frames_array().shape[0] == len(info.kept_indices) > 0
    assert_same((info, sink), read(half, settings, 1))
    stub = samples.truncate(clips.mjpeg, tmp_path / "stub.avi", 0.004)
    with pytest.raises(ClipError) as e:
        read(stub, settings, 2)
    assert e.value.code == ErrorCode.UNDECODABLE_VIDEO
    text = tmp_path / "text.avi"
    text.write_bytes(b"not a video at all\n" * 100)
    with pytest.raises(ClipError) as e:
        read(text, settings, 1)
    assert e.value.code == ErrorCode.UNDECODABLE_VIDEO


def test_limits_on_duration_frames_and_resolution(clips: Clips) -> None:
    with pytest.raises(ClipError) as e:
        read(clips.mjpeg, Settings(max_duration_s=5.0), 2)
    assert e.value.code == ErrorCode.TOO_LONG and "5 s" in e.value.message
    with pytest.raises(ClipError) as e:
        read(clips.mjpeg, Settings(max_frames=100), 1)
    assert e.value.code == ErrorCode.TOO_LONG and "100 frames" in e.value.message
    with pytest.raises(ClipError) as e:
        read(clips.mjpeg, Settings(max_resolution=200), 1)
    assert e.value.code == ErrorCode.RESOLUTION_TOO_HIGH and "320x240" in e.value.message


def test_duration_limit_holds_when_the_header_lies(ffclips: FfClips, tmp_path: Path) -> None:
    """A stream without a usable frame count is stopped while decoding."""
    path = need(ffclips.h264)
    raw = tmp_path / "raw.h264"
    _ffmpeg("-i", str(path), "-c", "copy", "-f", "h264", str(raw))
    cap = cv2.VideoCapture(str(raw), cv2.CAP_FFMPEG)
    declared = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    cap.release()
    with pytest.raises(ClipError) as e:
        read(raw, Settings(max_frames=max(50, int(declared) // 2 if declared > 0 else 50)), 1)
    assert e.value.code == ErrorCode.TOO_LONG


def test_rotation_metadata_is_applied(ffclips: FfClips) -> None:
    rotated, plain = need(ffclips.rotated), need(ffclips.plain)
    settings = Settings(sample_fps=3.0)
    sink_r = MemorySink(8, 48, 64)
    info = decode.sample_video(rotated, settings, sink_r, segments=1)
    assert info.rotation in (90, 270)
    assert (info.width, info.height) == (120, 160)  # portrait once rotated
    # The same frames, unrotated then turned by hand, match the decoder's output.
    cap = cv2.VideoCapture(str(plain), cv2.CAP_FFMPEG)
    ok, frame = cap.read()
    cap.release()
    assert ok
    best = min(
        float(np.abs(np.rot90(frame, k).astype(int) - _first_bgr(rotated)).mean()) for k in (1, 3)
    )
    assert best < 1.0
    assert sink_r.frames_array().shape[0] == len(info.kept_indices)


def _first_bgr(path: Path) -> np.ndarray:
    cap = decode.open_capture(path)
    ok, frame = cap.read()
    cap.release()
    assert ok
    return frame.astype(int)


def test_timestamps_are_presentation_times(clips: Clips) -> None:
    info, _ = read(clips.mjpeg, Settings(sample_fps=4.0), 2)
    assert info.kept_timestamps[:3] == pytest.approx([0.0, 0.25, 0.5])
    assert info.duration_s == pytest.approx(10.0)
    first, n = info.frames_between(2.0, 7.0)
    assert (first, n) == (48, 120)


def test_frames_go_straight_into_shared_memory_slots(clips: Clips, tmp_path: Path) -> None:
    """The real arena: slots filled by parallel readers, read by the daemon's consumer."""
    layout = ArenaLayout(
        n_slots=16, slot_bytes=1 << 16, frames_per_chunk=4, frame_height=SIZE, frame_width=SIZE
    )
    arena, sock = tmp_path / "a.arena", tmp_path / "a.sock"
    consumer = Consumer(arena, sock, layout, "t-decode")
    producer = Producer(arena, sock, 5.0)
    try:
        settings = Settings(sample_fps=3.0)
        sink = preprocess.SlotSink(producer, "job-1", preprocess.generation(1), 1, 123.0)
        sink.publish_refs(lambda arr: _fill_refs(arr))
        info = decode.sample_video(clips.mjpeg, settings, sink, segments=2)
        assert info.mode == "parallel"
        expected = read(clips.mjpeg, settings, 1, frames=4)[1].frames_array()
        got: dict[int, np.ndarray] = {}
        refs = 0
        for d in consumer.take_next(64):
            assert d.job_id == "job-1" and d.generation == preprocess.generation(1)
            if d.kind == ChunkKind.REFS:
                refs += 1
                assert d.shape[0] == 2
            else:
                got[d.chunk] = consumer.array(d).copy()
            consumer.release(d)
        assert refs == 1 and sink.published == len(got) + 1
        assert sorted(got) == list(range(math.ceil(len(info.kept_indices) / 4)))
        assert np.array_equal(np.concatenate([got[c] for c in sorted(got)]), expected)
    finally:
        producer.close()
        consumer.close()


def _fill_refs(arr: np.ndarray) -> int:
    arr[:2] = 7
    return 2


def test_restart_moves_to_a_new_generation(tmp_path: Path) -> None:
    layout = ArenaLayout(
        n_slots=8, slot_bytes=1 << 14, frames_per_chunk=2, frame_height=8, frame_width=8
    )
    arena, sock = tmp_path / "b.arena", tmp_path / "b.sock"
    consumer = Consumer(arena, sock, layout, "t-gen")
    producer = Producer(arena, sock, 5.0)
    try:
        sink = preprocess.SlotSink(producer, "job-2", preprocess.generation(3), 0, 1.0)
        sink.publish_refs(_fill_refs)
        for j in range(3):
            sink.buffer(j)[...] = j
            sink.commit(j)
        assert sink.published == 2  # refs + chunk 0
        sink.restart()  # takes back the unconsumed items, republishes the refs
        assert sink.generation == preprocess.generation(3) + 1 and sink.published == 1
        sink.buffer(0)[...] = 9
        sink.commit(0)
        sink.finish(1)
        ready = consumer.take_next(16)
        assert {(d.kind, d.chunk, d.generation) for d in ready} == {
            (ChunkKind.REFS, -1, sink.generation),
            (ChunkKind.FRAMES, 0, sink.generation),
        }
        for d in ready:
            consumer.release(d)
        assert producer.arena.slots_in_use() == 0  # nothing leaked from the first pass
    finally:
        producer.close()
        consumer.close()


def test_load_image_and_bad_image(clips: Clips, tmp_path: Path) -> None:
    dst = np.zeros((SIZE, SIZE, 3), np.uint8)
    decode.load_image(clips.product, (SIZE, SIZE), dst, "product image 1")
    assert dst.std() > 10
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    with pytest.raises(ClipError) as e:
        decode.load_image(bad, (SIZE, SIZE), dst, "product image 2")
    assert e.value.code == ErrorCode.NOT_AN_IMAGE and "product image 2" in e.value.message
