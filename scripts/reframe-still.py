#!/usr/bin/env python3
"""Write the README's before/after still of a vertical clip: docs/reframe-still.png.

A 16:9 video is generated: the real sample footage (``Megamind.avi`` from the shared
media, else synthetic footage) with a product photo (``baboon.jpg``, else a generated
product shot) moving across it. Its crop path is planned from the product's known
boxes at the job's sampling rate (:func:`workers.reframe.plan`), the 9:16 clip is
rendered with ffmpeg as the workers render it (:func:`workers.render.render`), and one
frame of the clip is read back. The still shows that source frame with the crop window
drawn on it (the centre crop dashed), next to the clip's frame.

Usage: ``.venv/bin/python scripts/reframe-still.py [OUT.png]``
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipline import samples  # noqa: E402
from workers import reframe, render  # noqa: E402

W, H, FPS, SECONDS = 640, 360, 24.0, 6.0
PRODUCT_W = 110
START_S, FRAMES = 0.5, 120
SHOW = 96  # the clip frame shown: the product is far right of the centre by then


def product_x(i: int) -> float:
    """The product's left edge at frame ``i``: from the left third to the right edge."""
    return 120.0 + 380.0 * min(1.0, i / (FPS * 5.0))


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "docs" / "reframe-still.png"
    media = samples.real_media_dir()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if media is not None:
            photo = cv2.imread(str(media / "baboon.jpg"))
            frames = samples.video_frames(media / "Megamind.avi", (W, H))
        else:
            photo = cv2.imread(str(samples.make_product_image(d / "product.jpg")))
            frames = samples.footage_frames(10**6, (W, H), seed=4)
        if photo is None:
            raise SystemExit("cannot read the product photo")
        ph = round(photo.shape[0] * PRODUCT_W / photo.shape[1])
        product = cv2.resize(photo, (PRODUCT_W, ph), interpolation=cv2.INTER_AREA)
        py = (H - ph) // 2
        video = d / "source.avi"
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), FPS, (W, H))
        source_frames = []
        for i in range(round(SECONDS * FPS)):
            frame = next(frames).copy()
            x = round(product_x(i))
            frame[py : py + ph, x : x + PRODUCT_W] = product
            writer.write(frame)
            source_frames.append(frame)
        writer.release()
        times = np.arange(START_S, START_S + FRAMES / FPS - 1e-9, 0.25)
        boxes: list[reframe.Box | None] = [
            (product_x(round(t * FPS)) / W, py / H, PRODUCT_W / W, ph / H) for t in times
        ]
        frame_times = START_S + np.arange(FRAMES) / FPS
        path = reframe.plan(times, boxes, frame_times, (W, H), "9:16")
        clip = render.render(video, d / "clip.mp4", START_S, FRAMES, FPS, "auto", crop=path)
        cap = cv2.VideoCapture(str(clip.path))
        for _ in range(SHOW + 1):
            ok, shown = cap.read()
            assert ok, "the clip has fewer frames than expected"
        cap.release()
    source = source_frames[round(START_S * FPS) + SHOW].copy()
    cw, ch = path.crop
    wx, wy = (int(v) for v in path.windows()[SHOW])
    dim = (source * 0.45).astype(np.uint8)
    dim[wy : wy + ch, wx : wx + cw] = source[wy : wy + ch, wx : wx + cw]
    cv2.rectangle(dim, (wx, wy), (wx + cw - 1, wy + ch - 1), (60, 220, 255), 2)
    cx = (W - cw) // 2
    for y in range(0, H, 16):  # the centre crop, dashed
        for x in (cx, cx + cw - 1):
            cv2.line(dim, (x, y), (x, min(y + 8, H - 1)), (255, 255, 255), 1)
    cv2.putText(dim, "source 16:9", (10, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
    tall = cv2.resize(shown, (round(shown.shape[1] * H / shown.shape[0]), H))
    cv2.putText(tall, "9:16 clip", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
    gap = np.full((H, 12, 3), 255, np.uint8)
    still = np.concatenate([dim, gap, tall], axis=1)
    still = cv2.resize(still, (still.shape[1] * 3 // 4, H * 3 // 4), interpolation=cv2.INTER_AREA)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), still, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{out}: {still.shape[1]}x{still.shape[0]}, {out.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
