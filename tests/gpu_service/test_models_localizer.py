"""The product localizer: the daemon's model and the worker's verification, on real photos.

A real photograph (the shared sample media's baboon, a richly textured "product") is
warped by a known homography into frames of real footage; the model (OpenCV SIFT on the
CPU, run as the engine runs it) and the worker's verification must recover the box.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipline_core.settings import Settings
from gpu_service import inprocess, protocol
from gpu_service.models import BuildContext, build
from gpu_service.models import localizer as loc
from gpu_service.shm import ChunkKind
from workers import localize, preprocess

CPU = torch.device("cpu")
S = 288


@pytest.fixture(scope="module")
def media() -> Path:
    """The real sample media (defined here so the GPU check can run without conftest)."""
    from clipline import samples

    d = samples.real_media_dir()
    if d is None:
        pytest.skip("real sample media not found (CLIPLINE_MEDIA_DIR or ../shared/media)")
    return d


@pytest.fixture(scope="module")
def model() -> loc.LocalizerModel:
    m = build("localizer", BuildContext(Settings(localizer_features="sift_cv2"), CPU))
    assert isinstance(m, loc.LocalizerModel)
    return m


def _background(media: Path, n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(media / "tree.avi"))
    frames = []
    while len(frames) < n:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.resize(f, (640, 360)))
    cap.release()
    assert len(frames) == n
    return frames


def _plant(frame: np.ndarray, product: np.ndarray, quad: np.ndarray) -> np.ndarray:
    h, w = product.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    hm = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
    warped = cv2.warpPerspective(product, hm, (frame.shape[1], frame.shape[0]))
    mask = cv2.warpPerspective(np.full((h, w), 255, np.uint8), hm, (frame.shape[1], frame.shape[0]))
    out = frame.copy()
    out[mask > 0] = warped[mask > 0]
    return out


def _buffers(images: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(images), S, S, 3), np.uint8)
    for i, img in enumerate(images):
        preprocess.into(img, out[i])
    return out


def _job(
    model: loc.LocalizerModel, refs: np.ndarray, frames: np.ndarray, job: str = "j"
) -> protocol.JobResults:
    return inprocess.job_results([model], refs, frames, len(frames), CPU, job_id=job)


def test_letterbox_keeps_the_aspect_and_marks_the_bars() -> None:
    frame = np.full((360, 640, 3), 0, np.uint8)  # a black picture must not look like bars
    frame[:, :, 2] = 200
    dst = np.full((S, S, 3), 77, np.uint8)
    preprocess.into(frame, dst)
    x, y, w, h = preprocess.content_rect(640, 360, S, S)
    assert (x, w) == (0, S) and h == round(360 * S / 640) and y == (S - h) // 2
    assert not dst[:y].any() and not dst[y + h :].any()
    assert dst[y : y + h].min() >= 1  # the picture's own pixels are never exact zeros
    rect = loc.content_rects(torch.from_numpy(dst[None]))[0].tolist()
    assert rect == [x, y, w, h]


def test_finds_a_tilted_product_and_its_box_and_nothing_without_it(
    model: loc.LocalizerModel, media: Path
) -> None:
    product = cv2.imread(str(media / "baboon.jpg"))
    bg = _background(media, 6)
    quads = [
        np.array([[80 + 20 * i, 90], [260 + 20 * i, 110], [250 + 20 * i, 280], [90 + 20 * i, 260]])
        for i in range(3)
    ]
    shown = [_plant(bg[i], product, quads[i]) for i in range(3)]
    frames = _buffers([*shown, *bg[3:]])
    res = _job(model, _buffers([product]), frames)
    ev = localize.evidence(res)
    assert ev.verified.tolist() == [True, True, True, False, False, False]
    assert (ev.inliers[:3, 0] >= 20).all() and (ev.inliers[3:, 0] < 20).all()
    # the recovered outline matches where the product was planted (in buffer pixels)
    x, y, w, _ = preprocess.content_rect(640, 360, S, S)
    for i in range(3):
        quad = ev.boxes[i]
        assert quad is not None
        want = quads[i] * (w / 640) + [x, y]
        assert np.abs(quad - want).max() < 6.0, (quad, want)


def test_a_product_never_shown_is_not_found(model: loc.LocalizerModel, media: Path) -> None:
    product = cv2.imread(str(media / "baboon.jpg"))
    frames = _buffers(_background(media, 8))
    res = _job(model, _buffers([product]), frames)
    ev = localize.evidence(res)
    win = localize.choose_window(np.arange(8) * 0.25, ev.evidence, 2.0, 5.0)
    assert not ev.verified.any()
    summary = localize.summary(ev, np.arange(8) * 0.25, win)
    assert summary["found"] is False and summary["verified_frames"] == 0
    assert summary["box"] is None


def test_frames_without_their_product_images_ask_for_a_retry(
    model: loc.LocalizerModel, media: Path
) -> None:
    """A restarted daemon has not seen the job's refs chunk: the worker must not guess."""
    frames = _buffers(_background(media, 2))
    (out,) = inprocess.run(
        [model], torch.from_numpy(frames[None]), kind=ChunkKind.FRAMES, job_id="never-seen"
    )
    assert (out[protocol.LOCALIZER["status"]] == loc.STATUS_NO_REFS).all()
    refs = np.zeros((1, S, S, 3), np.uint8)
    refs[0, 10:20, 10:20] = 9
    (r,) = inprocess.run([model], torch.from_numpy(refs[None]), kind=ChunkKind.REFS, job_id="x")
    msgs = [
        protocol.result_message(
            job_id="never-seen",
            generation=0,
            chunk=c,
            kind=k,
            frames=len(o[protocol.LOCALIZER["status"]]),
            outputs=o,
            trusted={"localizer": True},
            backends={},
            device="cpu",
            queue_wait_s=0,
            inference_s=0,
            latency_s=0,
            batch=1,
            batch_seq=0,
        )
        for c, k, o in ((-1, "refs", r), (0, "frames", out))
    ]
    with pytest.raises(localize.ProductImagesLost):
        localize.evidence(protocol.JobResults.from_messages(msgs))


def test_the_studio_backdrop_is_not_product() -> None:
    img = np.full((300, 300, 3), 250, np.uint8)  # white studio backdrop
    cv2.circle(img, (150, 150), 60, (20, 40, 200), -1)  # a red product (BGR)
    buf = _buffers([img])
    t = torch.from_numpy(buf).permute(0, 3, 1, 2).float() / 255.0
    back = loc.backdrop(t)[0].numpy()
    centre = back[S // 2 - 20 : S // 2 + 20, S // 2 - 20 : S // 2 + 20]
    assert not centre.any() and back[:20, :20].all()
    assert 0.6 < back.mean() < 0.95  # the backdrop, not the product, is masked


def test_the_cache_of_product_features_is_bounded(model: loc.LocalizerModel) -> None:
    refs = np.zeros((1, 1, S, S, 3), np.uint8)
    refs[0, 0, 100:180, 100:180] = 120
    for i in range(loc.CACHE_JOBS + 5):
        model._remember((f"job-{i}", 0), [])
    assert len(model._cache) == loc.CACHE_JOBS and ("job-0", 0) not in model._cache
    inprocess.run([model], torch.from_numpy(refs), kind=ChunkKind.REFS, job_id="late")
    assert ("late", 0) in model._cache


def test_kornia_features_reach_the_same_decisions(media: Path) -> None:
    """The CUDA path's detector (kornia's SIFT) run on the CPU: same verified frames."""
    pytest.importorskip("kornia", reason="kornia is the CUDA path's detector ([gpu] extra)")
    product = cv2.imread(str(media / "baboon.jpg"))
    bg = _background(media, 4)
    quad = np.array([[120, 80], [330, 100], [320, 300], [130, 280]])
    frames = _buffers([_plant(bg[0], product, quad), _plant(bg[1], product, quad), bg[2], bg[3]])
    decisions = {}
    for kind in ("sift_cv2", "sift_kornia"):
        m = build("localizer", BuildContext(Settings(localizer_features=kind), CPU))
        ev = localize.evidence(_job(m, _buffers([product]), frames, job=kind))
        decisions[kind] = ev.verified.tolist()
    assert decisions["sift_cv2"] == decisions["sift_kornia"] == [True, True, False, False]


def test_the_colour_table_gives_the_computed_bins(media: Path) -> None:
    """The fused path's colour lookup equals :func:`colour_bins` on real frames and greys."""
    frames = torch.from_numpy(_buffers(_background(media, 3)))
    extra = torch.zeros(1, S, S, 3, dtype=torch.uint8)
    extra[0, :, :, 0] = torch.arange(S)[:, None] % 256  # red ramp
    extra[0, :, :, 1] = torch.arange(S)[None, :] % 256  # green ramp
    extra[0, ::2, :, 2] = 255  # and stripes of blue
    grey = torch.arange(256, dtype=torch.uint8)[:, None, None, None].expand(256, 1, 1, 3)
    grey = F.pad(grey.permute(0, 3, 1, 2), (0, S - 1, 0, S - 1)).permute(0, 2, 3, 1)
    for batch in (frames, extra, grey.contiguous()):
        computed = loc.colour_bins(batch.permute(0, 3, 1, 2).float() / 255.0)
        assert torch.equal(loc.colour_lut(CPU)(batch), computed)
    assert len(torch.unique(loc.colour_lut(CPU).table)) == loc.BINS  # every bin is reachable


def test_batched_matching_packs_the_same_pairs_as_picture_by_picture(media: Path) -> None:
    """pack_pairs == one match per picture and view, also with empty and sparse pictures.

    Two product images (so rows of two products are packed one after the other), frames
    with the product planted, frames without it, a black frame (no keypoints) and one
    with a single bright dot (fewer than two keypoints), so every padding case runs.
    """
    product = cv2.imread(str(media / "baboon.jpg"))
    other = cv2.imread(str(media / "fruits.jpg"))
    bg = _background(media, 5)
    quad = np.array([[120, 80], [330, 100], [320, 300], [130, 280]])
    dot = np.zeros((360, 640, 3), np.uint8)
    cv2.circle(dot, (320, 180), 4, (255, 255, 255), -1)
    pictures = [_plant(bg[0], product, quad), _plant(bg[1], other, quad), bg[2], bg[3], bg[4]]
    frames = _buffers([*pictures, np.zeros_like(dot) + 1, dot])
    refs = _buffers([product, other])
    outs = {}
    for fused in (True, False):
        m = loc.LocalizerModel(CPU, features="sift_cv2", fused=fused)
        results = _job(m, refs, frames, job=f"fused-{fused}")
        outs[fused] = results
        assert set(m.stage_s) >= {"colour", "features", "match", "refs"}
    for name in ("pairs", "colour", "content", "status"):
        key = protocol.LOCALIZER[name]
        a, b = outs[True].concat(key), outs[False].concat(key)
        assert a is not None and b is not None and np.array_equal(a, b), name
    pairs = outs[True].concat(protocol.LOCALIZER["pairs"])
    assert pairs is not None
    assert (pairs[0, :, 4] == 0).sum() > 20  # the planted baboon is matched
    assert (pairs[1, :, 4] == 1).sum() > 20  # the planted fruits too, packed as product 1
    assert (pairs[5, :, 0] == -1).all()  # a frame with no keypoints has no pairs


def test_the_eager_backend_builds_the_reference_path_and_the_others_the_fused_one() -> None:
    for backend, fused in (("eager", False), ("channels_last", True), ("auto", True)):
        m = build("localizer", BuildContext(Settings(backend=backend), CPU))
        assert isinstance(m, loc.LocalizerModel) and m.fused is fused, backend


def test_motion_centres_follow_a_moving_patch_and_not_a_still_or_busy_picture(
    model: loc.LocalizerModel,
) -> None:
    """Reframing's fallback where the product is not seen: the centre of the motion."""
    rng = np.random.default_rng(3)
    still = np.full((360, 640, 3), 90, np.uint8)
    still[:, :, 1] = np.linspace(40, 200, 640, dtype=np.uint8)[None, :]  # a gradient wall
    patch = rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)
    moving = []
    for i in range(8):
        f = still.copy()
        x = 80 + 50 * i
        f[150:210, x : x + 60] = patch
        moving.append(f)
    refs = _buffers([patch])
    centres = localize.motion_centres(_job(model, refs, _buffers(moving), job="moving"))
    assert len(centres) == 8
    for i, c in enumerate(centres):
        assert c is not None, i
        assert abs(c[0] - (110 + 50 * i) / 640) < 0.1 and abs(c[1] - 0.5) < 0.1, (i, c)
    still_c = localize.motion_centres(_job(model, refs, _buffers([still] * 4), job="still"))
    assert still_c == [None] * 4
    busy = [rng.integers(0, 256, (360, 640, 3), dtype=np.uint8) for _ in range(4)]
    assert localize.motion_centres(_job(model, refs, _buffers(busy), job="busy")) == [None] * 4
