"""Vertical and square clips: the crop path (pure) and clips rendered along it (real media).

The path tests drive :func:`workers.reframe.plan` with known boxes: bounded velocity and
acceleration, a still camera for a product that barely moves, the last position held
through gaps, a still centre crop when the product is never seen. The rendering tests
generate a 16:9 video (a textured product patch moving over synthetic footage, with an
audio track), plan the path from the patch's known boxes at the sampled timestamps,
render a 9:16 clip with the real ffmpeg and with the OpenCV fallback, read every frame
back and find the patch by template matching: it must be whole inside every frame. A
centre crop of the same video is the control (it loses the patch), so the check can
fail.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from clipline import samples
from workers import ffmpeg as ffmpeg_tool
from workers import reframe, render

W, H = 640, 360
FPS = 25.0
SAMPLE_S = 0.25  # the job's sampled frames: 4 per second


def frame_times(start_s: float, frames: int, fps: float = FPS) -> np.ndarray:
    return start_s + np.arange(frames) / fps


def sampled(start_s: float, end_s: float) -> np.ndarray:
    return np.arange(start_s, end_s - 1e-9, SAMPLE_S)


def speeds(path: reframe.CropPath) -> tuple[float, float]:
    """The path's largest speed and acceleration (px per frame, px per frame squared)."""
    both = np.stack([path.x, path.y])
    return float(np.abs(np.diff(both)).max()), float(np.abs(np.diff(both, 2)).max())


def inside(path: reframe.CropPath, boxes_px: np.ndarray) -> np.ndarray:
    """Per frame: the box (x0, y0, x1, y1 in source px) lies within that frame's window."""
    win = path.windows()
    cw, ch = path.crop
    return (
        (boxes_px[:, 0] >= win[:, 0])
        & (boxes_px[:, 1] >= win[:, 1])
        & (boxes_px[:, 2] <= win[:, 0] + cw)
        & (boxes_px[:, 3] <= win[:, 1] + ch)
    )


# ---------------------------------------------------------------------------
# The path.
# ---------------------------------------------------------------------------
def test_window_is_the_largest_of_the_aspect_and_never_upscaled() -> None:
    assert reframe.crop_size((640, 360), "9:16") == (202, 360)
    assert reframe.output_size((202, 360), "9:16") == (198, 352, False)
    assert reframe.crop_size((1920, 1080), "1:1") == (1080, 1080)
    assert reframe.output_size((1080, 1080), "1:1") == (1080, 1080, True)
    assert reframe.crop_size((3840, 2160), "9:16") == (1214, 2160)
    assert reframe.output_size((1214, 2160), "9:16") == (1080, 1920, True)
    assert reframe.crop_size((640, 360), "4:5") == (288, 360)
    assert reframe.crop_size((360, 640), "1:1") == (360, 360)  # a vertical source: y moves
    path = reframe.centre_path(frame_times(0, 10), (640, 360), "9:16")
    assert not path.standard and path.size == (198, 352)
    assert path.note == (
        "smaller than the standard 1080x1920: the source's 9:16 window is 202x360 px"
    )
    with pytest.raises(ValueError, match="aspect"):
        reframe.crop_size((640, 360), "16:9")


def test_config_is_frozen_and_validated() -> None:
    cfg = reframe.ReframeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_speed = 1.0  # type: ignore[misc]
    for bad in (
        {"max_speed": 0.0},
        {"max_accel": -1.0},
        {"max_speed": float("nan")},
        {"dead_zone": 0.5},
        {"margin": -0.1},
        {"hold_s": -1.0},
        {"tolerance_px": 0.0},
    ):
        with pytest.raises(ValueError):
            reframe.ReframeConfig(**bad)


def test_a_jumping_jittering_product_gets_bounded_speed_and_acceleration() -> None:
    rng = np.random.default_rng(3)
    ts = sampled(0.0, 6.0)
    # Left, a jump to the right edge at 2 s, back to the middle at 4 s, with jitter.
    cx = np.where(ts < 2, 0.15, np.where(ts < 4, 0.85, 0.5)) + rng.normal(0, 0.01, len(ts))
    boxes = [(float(c) - 0.05, 0.4, 0.1, 0.2) for c in cx]
    for cfg in (reframe.ReframeConfig(), reframe.ReframeConfig(max_speed=0.005, max_accel=2e-4)):
        path = reframe.plan(ts, boxes, frame_times(0, 150), (W, H), "9:16", cfg)
        v, a = speeds(path)
        assert path.max_speed_px == pytest.approx(cfg.max_speed * W)
        assert path.max_accel_px == pytest.approx(cfg.max_accel * W)
        assert v <= path.max_speed_px + 1e-9 and a <= path.max_accel_px + 1e-9, (v, a)
        assert np.all(path.y == 0) and path.follow == "product"
    # The fast camera does reach each position: the product is in frame most of the time.
    path = reframe.plan(ts, boxes, frame_times(0, 150), (W, H), "9:16")
    t = path.times
    box_cx = np.interp(t, ts, cx) * W
    boxes_px = np.stack([box_cx - 32, np.full_like(t, 144), box_cx + 32, np.full_like(t, 216)], 1)
    assert inside(path, boxes_px).mean() >= 0.75


def test_a_steadily_moving_product_stays_whole_in_the_window() -> None:
    ts = sampled(1.0, 6.0)
    x0 = 0.05 + 0.12 * ts  # 0.12 of the width per second, 60 px wide
    boxes = [(float(x), 0.3, 60 / W, 0.25) for x in x0]
    path = reframe.plan(ts, boxes, frame_times(1.0, 125), (W, H), "9:16")
    t = path.times
    left = (0.05 + 0.12 * t) * W
    boxes_px = np.stack([left, np.full_like(t, 108), left + 60, np.full_like(t, 198)], 1)
    assert inside(path, boxes_px).all()
    v, a = speeds(path)
    assert v <= path.max_speed_px + 1e-9 and a <= path.max_accel_px + 1e-9


def test_a_near_static_product_gets_a_still_camera() -> None:
    rng = np.random.default_rng(7)
    ts = sampled(0.0, 5.0)
    boxes = [(0.3 + float(rng.uniform(-0.004, 0.004)), 0.4, 0.1, 0.2) for _ in ts]
    path = reframe.plan(ts, boxes, frame_times(0, 125), (W, H), "9:16")
    assert np.ptp(path.x) == 0.0 and np.ptp(path.y) == 0.0
    # ... framed on the product (its centre is 0.35 * 640 = 224 px), not at the centre.
    assert abs(path.x[0] + path.crop[0] / 2 - 224) <= 0.08 * path.crop[0] + 3
    assert len(path.keyframes()) == 2


def test_a_short_gap_holds_the_last_position() -> None:
    ts = sampled(0.0, 5.0)
    at_left = (0.1, 0.4, 0.1, 0.2)
    # Seen on the left, lost for 0.75 s, seen on the left again: the camera never moves.
    gap = [None if 2.0 <= t < 2.75 else at_left for t in ts]
    path = reframe.plan(ts, gap, frame_times(0, 125), (W, H), "9:16")
    assert np.ptp(path.x) == 0.0
    assert path.x[0] < (W - path.crop[0]) / 2 - 50  # left of the centre: the product's place
    # Seen on the left until 3 s, then never again: it stays there (no drift to the centre).
    lost = [at_left if t < 3.0 else None for t in ts]
    tail = reframe.plan(ts, lost, frame_times(0, 125), (W, H), "9:16")
    assert np.ptp(tail.x) == 0.0 and tail.x[-1] == path.x[0]
    # Seen on the left (last at 1.75 s), lost for 0.75 s, then on the right from 2.75 s:
    # a gap with a sighting either side is bridged by moving between them, so the move
    # is half done in the middle of the gap (2.25 s); a gap longer than ``hold_s``
    # keeps the left position for ``hold_s``, so the move is half done after it.
    moved = [None if 2.0 <= t < 2.75 else at_left if t < 2 else (0.8, 0.4, 0.1, 0.2) for t in ts]
    mv = reframe.plan(ts, moved, frame_times(0, 125), (W, H), "9:16")
    held = reframe.plan(
        ts, moved, frame_times(0, 125), (W, H), "9:16", reframe.ReframeConfig(hold_s=0.5)
    )

    def half_way(p: reframe.CropPath) -> float:
        mid = (p.x[0] + p.x[-1]) / 2
        return float(p.times[int(np.argmax(p.x >= mid))])

    assert mv.x[-1] > path.x[0] + 200 and abs(mv.x[0] - path.x[0]) <= 0.08 * 202
    assert half_way(mv) == pytest.approx(2.25, abs=0.1)
    assert half_way(held) == pytest.approx(2.5, abs=0.1)
    for p in (mv, held):
        v, a = speeds(p)
        assert v <= p.max_speed_px + 1e-9 and a <= p.max_accel_px + 1e-9


def test_a_gap_between_sightings_follows_the_moving_product() -> None:
    """A product moving steadily, missed in every other sampled frame, stays whole."""
    ts = sampled(0.0, 5.0)
    ft = frame_times(0, 125)
    x = lambda t: 0.1 + 0.12 * t  # noqa: E731 - left edge, fraction of the width
    boxes = [None if k % 3 else (x(t), 0.3, 0.3, 0.4) for k, t in enumerate(ts)]
    path = reframe.plan(ts, boxes, ft, (W, H), "9:16")
    truth = np.array([[x(t) * W, 0.3 * H, (x(t) + 0.3) * W, 0.7 * H] for t in ft])
    seen = ft <= max(t for t, b in zip(ts, boxes, strict=True) if b is not None)
    assert inside(path, truth)[seen].all()
    # holding each sighting through the gaps instead lags behind the product
    lag = reframe.plan(ts, boxes, ft, (W, H), "9:16", reframe.ReframeConfig(hold_s=0.2))
    assert not inside(lag, truth)[seen].all()


def test_a_product_never_seen_is_a_still_centre_crop() -> None:
    ts = sampled(0.0, 5.0)
    path = reframe.plan(ts, [None] * len(ts), frame_times(0, 125), (W, H), "9:16")
    assert path.follow == "centre"
    assert np.all(path.x == (W - 202) / 2) and np.all(path.y == 0)
    square = reframe.plan(ts, [None] * len(ts), frame_times(0, 125), (360, 640), "1:1")
    assert np.all(square.y == (640 - 360) / 2) and np.all(square.x == 0)
    # With attention centres (a saliency map's peak), those are followed instead.
    looks = [(0.8, 0.5)] * len(ts)
    att = reframe.plan(ts, [None] * len(ts), frame_times(0, 125), (W, H), "9:16", attention=looks)
    assert att.follow == "attention"
    assert abs(att.x[-1] + 101 - 0.8 * W) <= 0.08 * 202 + 1


def test_a_product_larger_than_the_window_is_centred() -> None:
    ts = sampled(0.0, 2.0)
    boxes = [(0.2, 0.1, 0.5, 0.8)] * len(ts)  # 320 px wide, the window 202
    path = reframe.plan(ts, boxes, frame_times(0, 50), (W, H), "9:16")
    assert np.all(np.abs(path.x + 101 - 0.45 * W) < 1e-6)


def test_keyframes_and_the_result_document() -> None:
    ts = sampled(0.0, 5.0)
    boxes = [(0.05 + 0.15 * float(t), 0.4, 0.1, 0.2) for t in ts]
    path = reframe.plan(ts, boxes, frame_times(0, 125), (W, H), "9:16")
    keys = path.keyframes()
    assert keys[0] == 0 and keys[-1] == len(path) - 1 and len(keys) < len(path) / 3
    lerp = np.interp(np.arange(len(path)), keys, path.x[keys])
    assert np.abs(lerp - path.x).max() <= path.tolerance_px + 1e-9
    doc = path.to_dict()
    assert doc["crop"] == [202, 360] and doc["source"] == [W, H] and doc["follow"] == "product"
    assert [k["t"] for k in doc["path"]] == [round(float(path.times[k]), 3) for k in keys]
    assert all(k["w"] == 202 and k["h"] == 360 and k["y"] == 0 for k in doc["path"])
    assert all(0 <= k["x"] <= W - 202 for k in doc["path"])
    assert doc["standard"] is False and "198" not in (doc["note"] or "")


def test_sightings_read_the_localizer_summary() -> None:
    ts = [1.0, 1.25, 1.5, 1.75]
    product = {
        "found": True,
        "boxes": [{"t": 1.25, "box": [0.1, 0.2, 0.3, 0.4]}, {"t": 1.75, "box": [0.5, 0, 0.1, 0.1]}],
    }
    assert reframe.sightings(product, ts) == [
        None,
        (0.1, 0.2, 0.3, 0.4),
        None,
        (0.5, 0.0, 0.1, 0.1),
    ]
    assert reframe.sightings(None, ts) == [None] * 4


def test_colour_boxes_fill_frames_geometry_did_not_verify() -> None:
    ts = [1.0, 1.25, 1.5]
    product = {
        "boxes": [{"t": 1.25, "box": [0.1, 0.2, 0.3, 0.4]}],
        "colour_boxes": [{"t": 1.0, "box": [0.2, 0.2, 0.2, 0.3]}, {"t": 1.25, "box": [0, 0, 1, 1]}],
    }
    # the verified box wins where both exist
    assert reframe.sightings(product, ts) == [(0.2, 0.2, 0.2, 0.3), (0.1, 0.2, 0.3, 0.4), None]


def test_a_sighting_far_off_the_products_size_is_not_followed() -> None:
    """One wrong match (a box many times the product's size) must not swing the window."""
    ts = sampled(0.0, 5.0)
    boxes: list[reframe.Box | None] = [(0.7, 0.4, 0.08, 0.15) for _ in ts]
    clean = reframe.plan(ts, boxes, frame_times(0, 125), (W, H), "9:16")
    boxes[len(boxes) // 2] = (0.0, 0.0, 0.68, 0.71)  # a homography gone wrong
    noisy = reframe.plan(ts, boxes, frame_times(0, 125), (W, H), "9:16")
    assert np.array_equal(clean.x, noisy.x) and np.array_equal(clean.y, noisy.y)
    with pytest.raises(ValueError, match="outlier_area"):
        reframe.ReframeConfig(outlier_area=1.0)


# ---------------------------------------------------------------------------
# Rendering on generated media.
# ---------------------------------------------------------------------------
PATCH = 60
SECONDS = 6.0
START_S, FRAMES = 0.5, 125  # the clip: 0.5 s to 5.5 s


def patch_x(i: np.ndarray | int) -> np.ndarray:
    """The patch's left edge at frame ``i``: back and forth across the picture."""
    t = np.asarray(i, dtype=np.float64) / FPS
    return np.asarray(np.round(290 - PATCH / 2 + 200 * np.sin(2 * np.pi * t / 5.0)))


PATCH_Y = 150


@pytest.fixture(scope="module")
def moving(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 640x360 video with audio: a textured patch moving over footage; and the patch."""
    d = tmp_path_factory.mktemp("reframe")
    rng = np.random.default_rng(11)
    patch = cv2.resize(
        rng.integers(0, 256, (10, 10, 3), dtype=np.uint8),
        (PATCH, PATCH),
        interpolation=cv2.INTER_NEAREST,
    )
    silent = d / "moving.noaudio.avi"
    n = round(SECONDS * FPS)
    writer = cv2.VideoWriter(str(silent), cv2.VideoWriter.fourcc(*"MJPG"), FPS, (W, H))
    for i, frame in enumerate(samples.footage_frames(n, (W, H), seed=5)):
        x = int(patch_x(i))
        frame[PATCH_Y : PATCH_Y + PATCH, x : x + PATCH] = patch
        writer.write(frame)
    writer.release()
    video = samples.add_tone(silent, d / "moving.avi", SECONDS)
    return video, patch


def planned(aspect: str = "9:16", follow: bool = True) -> reframe.CropPath:
    ts = sampled(START_S, START_S + FRAMES / FPS)
    boxes: list[reframe.Box | None] = [
        (float(patch_x(round(t * FPS))) / W, PATCH_Y / H, PATCH / W, PATCH / H) if follow else None
        for t in ts
    ]
    return reframe.plan(ts, boxes, frame_times(START_S, FRAMES), (W, H), aspect)


def patch_found(clip: Path, path: reframe.CropPath, patch: np.ndarray) -> list[bool]:
    """Per clip frame: the patch is found whole, where the path says it must be."""
    cw, ch = path.crop
    ow, oh = path.size
    sx, sy = ow / cw, oh / ch
    templ = cv2.resize(patch, (round(PATCH * sx), round(PATCH * sy)), interpolation=cv2.INTER_AREA)
    win = path.windows()
    cap = cv2.VideoCapture(str(clip))
    found: list[bool] = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        k = len(found)
        assert frame.shape[:2] == (oh, ow)
        score = cv2.matchTemplate(frame, templ, cv2.TM_CCOEFF_NORMED)
        _, best, _, (bx, by) = cv2.minMaxLoc(score)
        ex = (float(patch_x(round(START_S * FPS) + k)) - win[k, 0]) * sx
        ey = (PATCH_Y - win[k, 1]) * sy
        found.append(best >= 0.8 and abs(bx - ex) <= 2.5 and abs(by - ey) <= 2.5)
    cap.release()
    return found


def audio_codecs(clip: Path) -> list[str]:
    tool = ffmpeg_tool.find("bundled")
    assert tool is not None
    return [s.codec for s in ffmpeg_tool.streams(tool.path, clip) if s.kind == "audio"]


def test_ffmpeg_vertical_clip_keeps_the_moving_product_whole(
    moving: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    video, patch = moving
    path = planned()
    boxes_px = np.stack(
        [
            patch_x(np.arange(FRAMES) + round(START_S * FPS)),
            np.full(FRAMES, PATCH_Y),
            patch_x(np.arange(FRAMES) + round(START_S * FPS)) + PATCH,
            np.full(FRAMES, PATCH_Y + PATCH),
        ],
        axis=1,
    )
    assert inside(path, boxes_px).all()  # the planned windows hold the patch
    clip = render.render(video, tmp_path / "v.mp4", START_S, FRAMES, FPS, "auto", crop=path)
    assert clip.codec == "h264" and clip.audio and (clip.width, clip.height) == (198, 352)
    assert audio_codecs(clip.path) == ["aac"]
    found = patch_found(clip.path, path, patch)
    assert len(found) == FRAMES and all(found), [i for i, f in enumerate(found) if not f]
    # The control: a centre crop of the same window loses the patch.
    centre = planned(follow=False)
    plain = render.render(video, tmp_path / "c.mp4", START_S, FRAMES, FPS, "auto", crop=centre)
    lost = patch_found(plain.path, centre, patch)
    assert len(lost) == FRAMES and sum(lost) < FRAMES / 2


def test_ffmpeg_square_and_4x5_clips_have_their_sizes(
    moving: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    video, patch = moving
    for aspect, size in (("1:1", (360, 360)), ("4:5", (288, 360))):
        path = planned(aspect)
        assert path.size == size
        clip = render.render(video, tmp_path / "s.mp4", START_S, FRAMES, FPS, "auto", crop=path)
        assert (clip.width, clip.height) == size and clip.audio
        assert all(patch_found(clip.path, path, patch))


def test_opencv_fallback_crops_every_frame(moving: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    video, patch = moving
    path = planned()
    first = round(START_S * FPS)
    clip = render.render(
        video, tmp_path / "o.mp4", START_S, FRAMES, FPS, "", first_frame=first, crop=path
    )
    assert clip.codec == "vp9" and not clip.audio and (clip.width, clip.height) == (198, 352)
    found = patch_found(clip.path, path, patch)
    assert len(found) == FRAMES and all(found), [i for i, f in enumerate(found) if not f]


def test_source_aspect_renders_as_before(moving: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    video, _ = moving
    clip = render.render(video, tmp_path / "src.mp4", START_S, 50, FPS, "auto")
    cap = cv2.VideoCapture(str(clip.path))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape[:2] == (H, W) and clip.width is None
