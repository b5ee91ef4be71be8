"""The quality benchmark's case set: real builds of a few cases, the cache, the hit rule.

Three cases are built from real media: ``c15`` (apple cut out over real footage) and
``c06`` (a full-frame look-alike, then the orange) need only the shared media
(``../shared/media``); ``c08`` (a 3-second appearance) also needs the OpenCV sample data
of Debian's ``opencv-doc`` package and is skipped, with the reason, where that is absent.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from clipline import samples
from clipline_bench import quality_cases as qc

BUILT = ("c06_lookalike_fullframe", "c08_three_seconds", "c15_apple_lowtex")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, qc.Case], dict]:
    if samples.real_media_dir() is None:
        pytest.skip("no shared sample media (CLIPLINE_MEDIA_DIR or ../shared/media)")
    out = tmp_path_factory.mktemp("quality_cases")
    cases, skipped = qc.build_cases(out, only=BUILT)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    return out, {c.name: c for c in cases}, dict(skipped)


def _case(built: tuple[Path, dict[str, qc.Case], dict], name: str) -> qc.Case:
    _, cases, skipped = built
    if name in skipped:
        pytest.skip(f"{name}: {skipped[name]}")
    return cases[name]


def _frames(video: Path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(video))
    assert cap.isOpened(), video
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames, fps


def _warm_fraction(frame: np.ndarray) -> float:
    hsv = cv2.cvtColor(frame, cv2.COLOR_BGR2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    return float((((hue < 25) | (hue > 165)) & (sat > 90) & (val > 50)).mean())


def test_the_set_has_all_27_cases() -> None:
    assert len(qc.case_names("dev")) == 19
    assert len(qc.case_names("heldout")) == 8
    names = qc.case_names("all")
    assert len(set(names)) == 27
    with pytest.raises(ValueError, match="c99"):
        qc.build_cases(Path("/nonexistent"), only=["c99"])
    with pytest.raises(ValueError):
        qc.build_cases(Path("/nonexistent"), which="test")


def test_shared_media_cases_are_never_skipped(built) -> None:
    _, cases, skipped = built
    assert "c06_lookalike_fullframe" in cases, skipped
    assert "c15_apple_lowtex" in cases, skipped
    assert set(cases) | set(skipped) == set(BUILT)


@pytest.mark.parametrize("name", BUILT)
def test_case_decodes_with_its_size_duration_images_and_windows(built, name: str) -> None:
    case = _case(built, name)
    frames, fps = _frames(case.video)
    assert fps == pytest.approx(qc.FPS)
    assert len(frames) == round(case.duration_s * qc.FPS)
    assert 14.9 <= case.duration_s <= 16.1
    assert all(f.shape == (360, 640, 3) for f in frames)
    assert case.images
    for p in case.images:
        assert p.is_file() and p.parent.parent == case.video.parent
        assert cv2.imread(str(p)) is not None, p
    assert case.windows
    for a, b in case.windows:
        assert 0 <= a < b <= case.duration_s
    assert not case.heldout


def test_three_second_case_has_one_three_second_window(built) -> None:
    case = _case(built, "c08_three_seconds")
    assert case.windows == ((8, 11),)


def test_cut_out_product_is_on_screen_exactly_in_its_window(built) -> None:
    """The apple (warm, saturated) covers >5% of the frame inside 6-11.5 s, ~none outside."""
    case = _case(built, "c15_apple_lowtex")
    frames, _ = _frames(case.video)
    ((a, b),) = case.windows
    inside = [_warm_fraction(f) for i, f in enumerate(frames) if a + 0.1 <= i / qc.FPS < b - 0.1]
    outside = [
        _warm_fraction(f) for i, f in enumerate(frames) if not a - 0.1 <= i / qc.FPS < b + 0.1
    ]
    assert inside and outside
    assert min(inside) > 0.05
    assert max(outside) < 0.03


def test_true_boxes_hold_the_product_in_its_window_only(built) -> None:
    """Case.boxes (from the recipe) cover the frames of the window, and the apple's warm
    pixels lie inside the box of each frame (the box is tight: the apple fills it)."""
    case = _case(built, "c15_apple_lowtex")
    frames, _ = _frames(case.video)
    ((a, b),) = case.windows
    by_frame = {round(t * qc.FPS): box for t, *box in case.boxes}
    assert set(by_frame) == {i for i in range(len(frames)) if a <= i / qc.FPS < b}
    h, w = frames[0].shape[:2]
    for i, (x, y, bw, bh) in by_frame.items():
        hsv = cv2.cvtColor(frames[i], cv2.COLOR_BGR2HSV)
        hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
        warm = ((hue < 25) | (hue > 165)) & (sat > 90) & (val > 50)
        x0, y0 = round(x * w), round(y * h)
        x1, y1 = round((x + bw) * w), round((y + bh) * h)
        inside = warm[y0:y1, x0:x1]
        assert inside.sum() >= 0.97 * warm.sum(), i
        assert inside.mean() > 0.4, i


def test_lookalike_is_a_full_frame_still_outside_the_true_window(built) -> None:
    case = _case(built, "c06_lookalike_fullframe")
    frames, _ = _frames(case.video)
    ((a, _b),) = case.windows
    still = [f for i, f in enumerate(frames) if 2.1 <= i / qc.FPS < 6.4]
    moving = [f for i, f in enumerate(frames) if 0.1 <= i / qc.FPS < 1.9]
    assert a > 6.5  # the distractor is not part of the answer

    def step(fs: list[np.ndarray]) -> float:
        return max(
            float(np.abs(x.astype(np.int16) - y.astype(np.int16)).mean())
            for x, y in itertools.pairwise(fs)
        )

    assert step(still) < 1.5 < step(moving)
    assert np.mean([_warm_fraction(f) for f in still]) > 0.2  # fruits: a similar palette


def test_unchanged_case_is_not_rebuilt(built) -> None:
    out, cases, _ = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again, _ = qc.build_cases(out, only=BUILT)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert {c.name: c for c in again} == cases


def test_changed_recipe_is_rebuilt(tmp_path: Path) -> None:
    if samples.real_media_dir() is None:
        pytest.skip("no shared sample media (CLIPLINE_MEDIA_DIR or ../shared/media)")
    (case,), skipped = qc.build_cases(tmp_path, only=["c15"])
    assert not skipped
    record = tmp_path / f"{case.name}.json"
    meta = json.loads(record.read_text())
    meta["recipe"] = "0" * 64  # as if written by another recipe
    record.write_text(json.dumps(meta))
    case.video.write_bytes(b"stale")
    qc.build_cases(tmp_path, only=["c15"])
    assert json.loads(record.read_text())["recipe"] != "0" * 64
    frames, _ = _frames(case.video)
    assert len(frames) == 360


def test_missing_opencv_data_skips_with_a_reason(tmp_path: Path) -> None:
    cases, skipped = qc.build_cases(
        tmp_path / "out", only=["c03"], opencv_data=tmp_path / "no-such-dir"
    )
    assert cases == []
    ((name, reason),) = skipped
    assert name == "c03_occluded_30pct"
    assert "vtest.avi" in reason and "no-such-dir" in reason
    assert not (tmp_path / "out" / "c03_occluded_30pct.mp4").exists()


# ---------------------------------------------------------------------------
# The hit rule.
# ---------------------------------------------------------------------------
def test_hit_needs_four_seconds_of_a_long_window() -> None:
    w = ((7.0, 12.0),)
    assert qc.hit(w, 7.0, 12.0, found=True)
    assert qc.hit(w, 8.0, 13.0, found=True)  # 4 s inside
    assert qc.hit(w, 6.0, 11.0, found=True)
    assert not qc.hit(w, 8.5, 13.5, found=True)  # 3.5 s
    assert not qc.hit(w, 2.5, 7.5, found=True)
    assert not qc.hit(w, 7.0, 12.0, found=False)  # right place, but "not found"
    assert qc.hit(((9.0, 14.5),), 9.5, 14.5, found=True)
    assert not qc.hit(((9.0, 14.5),), 10.6, 15.6, found=True)  # 3.9 s


def test_hit_on_a_short_appearance_needs_most_of_it() -> None:
    three = ((8.0, 11.0),)  # needs min(2.5, 2.4) = 2.4 s
    assert qc.hit(three, 6.0, 11.0, found=True)
    assert qc.hit(three, 8.6, 13.6, found=True)
    assert not qc.hit(three, 8.7, 13.7, found=True)
    assert not qc.hit(three, 4.0, 9.0, found=True)  # 1 s
    short = ((1.0, 3.5),)  # needs 2.0 s
    assert qc.hit(short, 0.0, 5.0, found=True)
    assert not qc.hit(short, 2.0, 7.0, found=True)
    four_and_a_half = ((2.0, 6.5),)  # shorter than 5 s: needs 2.5 s
    assert qc.hit(four_and_a_half, 4.0, 9.0, found=True)
    assert not qc.hit(four_and_a_half, 4.1, 9.1, found=True)


def test_hit_with_two_appearances_counts_either() -> None:
    w = ((1.0, 3.5), (9.0, 15.0))
    assert qc.hit(w, 10.0, 15.0, found=True)
    assert qc.hit(w, 0.5, 5.5, found=True)
    assert not qc.hit(w, 4.0, 9.0, found=True)


def test_never_shown_is_a_hit_only_when_not_found() -> None:
    assert qc.hit((), 3.0, 8.0, found=False)
    assert not qc.hit((), 3.0, 8.0, found=True)
    with pytest.raises(ValueError):
        qc.hit(((1.0, 6.0),), 5.0, 4.0, found=True)


@pytest.mark.parametrize("name", sorted(qc._HUE_MASKED))
def test_fruit_cut_outs_are_the_fruit_alone(name: str) -> None:
    """A cut-out keeps no thin part beside the fruit (a twig, a stalk): the true box is
    the product's, so a crop holding the fruit but not a twig is not counted a miss.
    Checked independently of how the mask is made: removing everything thinner than a
    twentieth of the picture (an opening) leaves the mask's bounding box unchanged."""
    media = samples.real_media_dir()
    if media is None or not (media / name).is_file():
        pytest.skip(f"no {name} in the shared sample media")
    im = cv2.imread(str(media / name))
    mask = qc._object_mask(name, im)
    r = min(im.shape[:2]) // 40
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    solid = cv2.morphologyEx(mask, cv2.MORPH_OPEN, disk)
    x, y, w, h = cv2.boundingRect(mask)
    sx, sy, sw, sh = cv2.boundingRect(solid)
    tol = 2
    assert abs(x - sx) <= tol and abs(y - sy) <= tol, (x, y, sx, sy)
    assert abs(x + w - sx - sw) <= tol and abs(y + h - sy - sh) <= tol, (x, y, w, h, sx, sy, sw, sh)
    assert mask.mean() > 0.2  # and the fruit itself is there
