"""Inputs of the end-to-end benchmark: the job set and a loopback HTTP server for it.

The job set mixes the real sample videos (``../shared/media``, when present) with
videos generated here (:mod:`clipline.samples`: product shots planted into real or
synthetic footage), each with a product image; generated videos are transcoded to
H.264 MP4 (what shops upload) when ffmpeg is available. ``--quick`` uses three small
generated videos only. Both systems download every input from :class:`MediaServer`
over HTTP on 127.0.0.1, as they would from a CDN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import threading
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from clipline import samples


@dataclasses.dataclass(frozen=True)
class JobInput:
    """One kind of job: a video and its product images (paths under the media dir)."""

    name: str
    video: str
    images: tuple[str, ...]
    duration_s: float = 5.0


def _h264(src: Path, dest: Path) -> Path:
    """``src`` as H.264/yuv420p MP4 if ffmpeg is here, else ``src`` unchanged."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return src
    subprocess.run(
        [ffmpeg, "-nostdin", "-v", "error", "-y", "-i", str(src), "-c:v", "libx264",
         "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-an", str(dest)],
        check=True,
    )  # fmt: skip
    src.unlink()
    return dest


def build_jobset(directory: Path, quick: bool, real: bool = True) -> list[JobInput]:
    """Write (or reuse) the benchmark's media in ``directory``; return the job kinds."""
    directory.mkdir(parents=True, exist_ok=True)
    d = directory
    out: list[JobInput] = []
    if quick:
        for k in range(3):
            product = d / f"q-product-{k}.jpg"
            video = d / f"q-planted-{k}.avi"
            if not (video.exists() and product.exists()):
                samples.make_product_image(product, size=(240, 240), seed=40 + k)
                samples.make_planted_video(
                    video, product, before_s=2.0 + k, product_s=5.0, after_s=2.0,
                    fps=20.0, size=(240, 180), seed=50 + k,
                )  # fmt: skip
            out.append(JobInput(f"planted-{k}", video.name, (product.name,)))
        return out

    media = samples.real_media_dir() if real else None
    footage: list[Path] = []
    if media is not None:
        for name, image in (("Megamind.avi", "fruits.jpg"), ("tree.avi", "apple.jpg")):
            for f in (name, image):
                if not (d / f).exists():
                    shutil.copyfile(media / f, d / f)
            out.append(JobInput(Path(name).stem.lower(), name, (image,)))
        footage = [media / "tree.avi", media / "Megamind.avi"]
        for f in ("orange.jpg", "baboon.jpg"):
            if not (d / f).exists():
                shutil.copyfile(media / f, d / f)
        plants = [("orange.jpg", 6.0), ("baboon.jpg", 9.0)]
    else:
        plants = []
        for k in range(2):
            name = f"gen-product-{k}.jpg"
            if not (d / name).exists():
                samples.make_product_image(d / name, seed=60 + k)
            plants.append((name, 6.0 + 3 * k))
    for k, (image, before) in enumerate(plants):
        target = d / f"planted-real-{k}.mp4"
        if not target.exists():
            raw = d / f"planted-real-{k}.avi"
            samples.make_planted_video(
                raw, d / image, before_s=before, product_s=5.0, after_s=8.0,
                fps=24.0, size=(640, 360), footage=footage, seed=70 + k,
            )  # fmt: skip
            _h264(raw, target)
        video = target if target.exists() else d / f"planted-real-{k}.avi"
        out.append(JobInput(f"planted-{Path(image).stem}", video.name, (image,)))
    for k in range(2):
        product = d / f"gen-bottle-{k}.jpg"
        video = d / f"gen-planted-{k}.avi"
        if not (video.exists() and product.exists()):
            samples.make_product_image(product, seed=80 + k)
            samples.make_planted_video(
                video, product, before_s=4.0 + 4 * k, product_s=5.0, after_s=5.0,
                fps=25.0, size=(480, 360), seed=90 + k,
            )  # fmt: skip
        out.append(JobInput(f"synthetic-{k}", video.name, (product.name,)))
    return out


def warmup_input(directory: Path) -> JobInput:
    """A tiny job to warm every process up before measuring (model first calls, imports)."""
    directory.mkdir(parents=True, exist_ok=True)
    product = directory / "warm-product.jpg"
    video = directory / "warm.avi"
    if not (video.exists() and product.exists()):
        samples.make_product_image(product, size=(120, 120), seed=3)
        samples.make_footage(video, seconds=6.0, fps=12.0, size=(160, 120), seed=4)
    return JobInput("warmup", video.name, (product.name,))


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


class MediaServer:
    """Serves ``directory`` read-only over HTTP on 127.0.0.1 (an ephemeral port)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        handler = partial(_QuietHandler, directory=str(directory))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="media-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{urllib.parse.quote(name)}"

    def __enter__(self) -> MediaServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._server.shutdown()
        self._server.server_close()
