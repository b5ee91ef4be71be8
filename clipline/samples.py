"""Sample media: find the real samples, or make test videos and product images.

Tests, benchmarks and the demo use real footage where it is available (a ``media``
folder of real videos and photographs, see :func:`real_media_dir`) and must also run
on media generated here, on any machine:

* :func:`make_footage` — moving, textured scenery (drifting gradients, moving shapes,
  sensor-like noise) at a given size, rate and length, optionally with an audio track;
* :func:`make_product_image` — a product shot: an object with a distinctive colour
  scheme on a plain backdrop;
* :func:`make_planted_video` — footage, then the product shown for a few seconds
  (with a slow zoom, like a real product shot), then more footage: the ground truth for
  "does the highlight find the product".
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_media_dir() -> Path | None:
    """The folder of real sample media (``CLIPLINE_MEDIA_DIR`` or ``../shared/media``)."""
    candidates = [
        os.environ.get("CLIPLINE_MEDIA_DIR", ""),
        str(REPO_ROOT.parent / "shared" / "media"),
    ]
    for c in candidates:
        if c and (Path(c) / "Megamind.avi").is_file():
            return Path(c)
    return None


def _writer(path: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    w, h = size
    fourcc = cv2.VideoWriter.fourcc(*"MJPG")
    writer = cv2.VideoWriter(str(path), fourcc, fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {path}")
    return writer


def footage_frames(
    n: int, size: tuple[int, int] = (320, 240), seed: int = 0
) -> Iterator[np.ndarray]:
    """``n`` BGR frames of synthetic moving scenery."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base_colors = rng.uniform(40, 200, size=(2, 3)).astype(np.float32)
    shapes = [
        (
            rng.uniform(0, w),
            rng.uniform(0, h),
            rng.uniform(-3, 3),
            rng.uniform(-3, 3),
            int(rng.uniform(10, 40)),
            tuple(int(c) for c in rng.uniform(30, 230, 3)),
        )
        for _ in range(6)
    ]
    for i in range(n):
        phase = i / 30.0
        t = (np.sin(xx / w * 3.0 + phase) + np.cos(yy / h * 2.0 - phase * 0.7)) * 0.25 + 0.5
        frame = (base_colors[0] * t[..., None] + base_colors[1] * (1 - t[..., None])).astype(
            np.uint8
        )
        for x0, y0, vx, vy, r, color in shapes:
            cx = int((x0 + vx * i) % w)
            cy = int((y0 + vy * i) % h)
            cv2.circle(frame, (cx, cy), r, color, -1)
        noise = rng.integers(-6, 7, size=frame.shape, dtype=np.int16)
        yield np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def make_footage(
    path: Path,
    seconds: float,
    fps: float = 24.0,
    size: tuple[int, int] = (320, 240),
    seed: int = 0,
    audio: bool = False,
) -> Path:
    """Write synthetic footage (MJPEG in AVI; with a sine-tone AAC track if ``audio``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = round(seconds * fps)
    target = path if not audio else path.with_name(path.stem + ".noaudio.avi")
    writer = _writer(target, fps, size)
    for frame in footage_frames(n, size, seed):
        writer.write(frame)
    writer.release()
    if audio:
        add_tone(target, path, seconds)
        target.unlink()
    return path


def add_tone(src: Path, dest: Path, seconds: float, freq: float = 440.0) -> Path:
    """Mux a sine tone under ``src`` into ``dest`` with ffmpeg (video copied).

    The ffmpeg is the one clips are rendered with (``auto``: the imageio-ffmpeg wheel's,
    else the system's).
    """
    from workers import ffmpeg as ffmpeg_tool

    tool = ffmpeg_tool.find(ffmpeg_tool.AUTO)
    if tool is None:
        raise RuntimeError("ffmpeg is needed to add an audio track (pip install imageio-ffmpeg)")
    ffmpeg = tool.path
    subprocess.run(
        [
            ffmpeg,
            "-nostdin",
            "-v",
            "error",
            "-y",
            "-i",
            str(src),
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency={freq}:duration={seconds:.3f}",
            "-map",
            "0:v:0",
            "-map",
            "1:a:0",
            "-c:v",
            "copy",
            "-c:a",
            "aac",
            "-shortest",
            str(dest),
        ],
        check=True,
    )
    return dest


def make_product_image(path: Path, size: tuple[int, int] = (480, 480), seed: int = 1) -> Path:
    """A synthetic product shot: a striped, capped bottle on a light backdrop."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.full((h, w, 3), 235, np.uint8)
    body = tuple(int(c) for c in rng.uniform(0, 255, 3))
    stripe = tuple(int(c) for c in rng.uniform(0, 255, 3))
    cap = tuple(int(c) for c in rng.uniform(0, 255, 3))
    x0, x1 = int(w * 0.3), int(w * 0.7)
    y0, y1 = int(h * 0.25), int(h * 0.92)
    cv2.rectangle(img, (x0, y0), (x1, y1), body, -1)
    for k in range(4):
        ys = y0 + (k + 1) * (y1 - y0) // 6
        cv2.rectangle(img, (x0, ys), (x1, ys + (y1 - y0) // 14), stripe, -1)
    cv2.rectangle(img, (int(w * 0.42), int(h * 0.08)), (int(w * 0.58), y0), cap, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path


def video_frames(path: Path, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Frames of a real video, resized to ``size``, looping forever."""
    while True:
        cap = cv2.VideoCapture(str(path))
        got = False
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            got = True
            yield cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        cap.release()
        if not got:
            raise RuntimeError(f"no frame decodes from {path}")


def make_planted_video(
    path: Path,
    product: Path,
    *,
    before_s: float,
    product_s: float = 5.0,
    after_s: float = 6.0,
    fps: float = 24.0,
    size: tuple[int, int] = (320, 240),
    footage: Sequence[Path] = (),
    seed: int = 0,
) -> tuple[float, float]:
    """Write footage, then ``product`` for ``product_s`` seconds, then footage again.

    Footage comes from the given real videos (looped) or, if none, is synthetic.
    Returns the product window ``(start_s, end_s)``.
    """
    _w, _h = size
    prod = cv2.imread(str(product), cv2.IMREAD_COLOR)
    if prod is None:
        raise RuntimeError(f"cannot read {product}")
    sources: Iterator[np.ndarray]
    if footage:
        iters = [video_frames(p, size) for p in footage]

        def alternate() -> Iterator[np.ndarray]:
            k = 0
            while True:
                for _ in range(int(fps * 2)):
                    yield next(iters[k % len(iters)])
                k += 1

        sources = alternate()
    else:
        sources = footage_frames(10**9, size, seed)
    writer = _writer(path, fps, size)
    n_before, n_prod, n_after = (round(s * fps) for s in (before_s, product_s, after_s))
    for _ in range(n_before):
        writer.write(next(sources))
    ph, pw = prod.shape[:2]
    for i in range(n_prod):
        zoom = 1.0 + 0.15 * i / max(1, n_prod - 1)  # slow push-in
        cw, ch = int(pw / zoom), int(ph / zoom)
        x0, y0 = (pw - cw) // 2, (ph - ch) // 2
        writer.write(
            cv2.resize(prod[y0 : y0 + ch, x0 : x0 + cw], size, interpolation=cv2.INTER_AREA)
        )
    for _ in range(n_after):
        writer.write(next(sources))
    writer.release()
    return n_before / fps, (n_before + n_prod) / fps


def truncate(src: Path, dest: Path, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes: a stream broken mid-file."""
    data = src.read_bytes()
    dest.write_bytes(data[: max(1, int(len(data) * fraction))])
    return dest
