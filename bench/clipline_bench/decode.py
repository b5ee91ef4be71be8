"""Benchmark: decoding and sampling a video, five ways and per decode backend, side by side.

``clipline bench decode`` reads each video with the same sampling (every ``--every``-th
frame kept, resized to the daemon's input as RGB uint8) in these ways and reports
decoded frames per second (frames in the video / wall time):

``read_all``
    the naive loop: ``read()`` (grab + retrieve) every frame, keep every N-th.
``sparse``
    :func:`workers.decode.sample_video` with one reader: ``grab()`` every frame,
    ``retrieve()`` only the kept ones.
``segments``
    ``--segments`` threads, each with its own ``VideoCapture`` seeking to its part of
    the video, each reading every frame with ``read()`` (parallelism alone).
``sparse_segments``
    :func:`workers.decode.sample_video` with ``--segments`` readers: what a worker runs
    (falls back to one reader when the container cannot seek accurately; the ``mode``
    column says which happened).
``seek_per_kept``
    seek (``CAP_PROP_POS_FRAMES``) to every kept frame and read it.
``pyav``, ``nvdec``
    :func:`workers.decoders.sample_video` with that decode backend (PyAV on the CPU;
    NVDEC on the GPU, run when CUDA and PyNvVideoCodec are available, after one
    untimed warm-up read that creates the CUDA context): what a worker with
    ``decode_backend`` set to it runs. The ``mode`` column says which backend decoded
    (and why it fell back to OpenCV, if it did).

Every variant's kept frames are compared byte for byte with ``sparse``'s (column
``same``; the backends' also by mean absolute difference, ``mad``), and every variant's
speed is given as a ratio against ``sparse`` (OpenCV, one reader) of the same run
(``vs_sparse``). Variants run round-robin, ``--repeats`` times; the table shows the median
(and the best) wall time of each. Videos: the real samples (``Megamind.avi``,
``tree.avi`` from ``--media``, default ``../shared/media``) and videos generated here
(H.264 MP4 with ffmpeg when it is installed, MJPEG AVI with OpenCV).

Output: a table (stdout, or stderr with ``--json``) and JSON (``--json`` prints it on
stdout; it is always written to ``--out``)::

    {"params": {...}, "machine": {...}, "videos": [{"name", "frames", "results":
     {variant: {"fps", "median_s", "best_s", "speedup", "vs_sparse", "same", "mad",
     "mode"}}}], "target": {...}}

``--quick`` (CI) uses short generated videos and two repeats; its figures are not
meaningful.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from clipline import samples
from clipline_core.settings import Settings
from workers import decode, decoders
from workers.preprocess import MemorySink, into

DEFAULT_OUT = Path("bench") / "results" / "decode.json"
VARIANTS = ("read_all", "sparse", "segments", "sparse_segments", "seek_per_kept")
#: Decode backends measured besides OpenCV (``sparse`` is OpenCV's sequential reader).
BACKEND_VARIANTS = tuple(b for b in decoders.BACKENDS if b != decoders.OPENCV)
TARGET_SPEEDUP = 3.0  # sparse + parallel vs read-all at 1-in-8 (2 cores)
FRAMES_PER_CHUNK = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="short videos, 2 repeats (CI)")
    parser.add_argument("--json", action="store_true", help="print the JSON on stdout")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument("--every", type=int, default=8, help="keep one frame in N (default 8)")
    parser.add_argument("--segments", type=int, default=2, help="parallel readers (default 2)")
    parser.add_argument("--repeats", type=int, default=0, help="runs per variant (default 5)")
    parser.add_argument("--size", type=int, default=128, help="output frame side (default 128)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="FFmpeg decoding threads per reader (0: OpenCV's default)",
    )
    parser.add_argument("--media", type=Path, default=None, help="folder of real sample videos")
    parser.add_argument("--video", type=Path, action="append", default=[], help="extra video")
    parser.add_argument(
        "--no-generated", action="store_true", help="only real (and --video) videos"
    )
    parser.add_argument(
        "--variants",
        default=",".join(default_variants()),
        help="comma-separated variants to run (default: all that can run here)",
    )


def default_variants() -> list[str]:
    """The OpenCV variants, and every other decode backend that can run here."""
    return [*VARIANTS, *(b for b in BACKEND_VARIANTS if decoders.unavailable(b) is None)]


@dataclasses.dataclass
class Video:
    name: str
    path: Path
    source: str  # real | generated | given
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0


@dataclasses.dataclass
class Outcome:
    seconds: float
    digests: list[bytes]
    mode: str = ""
    frames: np.ndarray | None = None  # kept frames (sparse and the backends: for ``mad``)


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).data, digest_size=16).digest()


def _open(path: Path, threads: int | None) -> cv2.VideoCapture:
    return decode.open_capture(path, threads)


def _keep(index: int, step: float) -> bool:
    j = int(index // step)
    return index in (decode.keep_index(j, step), decode.keep_index(j + 1, step))


def _read_range(
    path: Path, start: int, end: int | None, step: float, size: int, threads: int | None
) -> list[tuple[int, bytes]]:
    cap = _open(path, threads)
    out: list[tuple[int, bytes]] = []
    dst = np.empty((size, size, 3), dtype=np.uint8)
    try:
        if start:
            cap.set(cv2.CAP_PROP_POS_FRAMES, start)
        index = start
        while end is None or index < end:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            if _keep(index, step):
                into(frame, dst)
                out.append((index, _digest(dst)))
            index += 1
    finally:
        cap.release()
    return out


def v_read_all(path: Path, step: float, size: int, k: int, threads: int | None) -> Outcome:
    t = time.perf_counter()
    kept = _read_range(path, 0, None, step, size, threads)
    return Outcome(time.perf_counter() - t, [d for _, d in kept])


def v_segments(path: Path, step: float, size: int, k: int, threads: int | None) -> Outcome:
    t = time.perf_counter()
    cap = _open(path, threads)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    bounds: list[int | None] = [total * i // k for i in range(k)]
    bounds.append(None)
    parts: list[list[tuple[int, bytes]]] = [[] for _ in range(k)]

    def work(i: int) -> None:
        start = bounds[i]
        assert start is not None
        parts[i] = _read_range(path, start, bounds[i + 1], step, size, threads)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(k)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return Outcome(time.perf_counter() - t, [d for part in parts for _, d in part])


def _sampled(segments: int) -> Callable[[Path, float, int, int, int | None], Outcome]:
    def variant(path: Path, step: float, size: int, k: int, threads: int | None) -> Outcome:
        cap = _open(path, threads)
        fps = float(cap.get(cv2.CAP_PROP_FPS)) or decode.FALLBACK_FPS
        cap.release()
        settings = Settings(sample_fps=fps / step)
        sink = MemorySink(FRAMES_PER_CHUNK, size, size)
        t = time.perf_counter()
        info = decode.sample_video(
            path, settings, sink, segments=segments if segments else k, threads=threads
        )
        elapsed = time.perf_counter() - t
        frames = sink.frames_array()
        mode = info.mode if info.fallback is None else f"{info.mode} ({info.fallback[:40]})"
        return Outcome(elapsed, [_digest(f) for f in frames], mode, frames if segments else None)

    return variant


def _backend(name: str) -> Callable[[Path, float, int, int, int | None], Outcome]:
    def variant(path: Path, step: float, size: int, k: int, threads: int | None) -> Outcome:
        cap = _open(path, threads)
        fps = float(cap.get(cv2.CAP_PROP_FPS)) or decode.FALLBACK_FPS
        cap.release()
        settings = Settings(sample_fps=fps / step, decode_threads=threads or 0)
        sink = MemorySink(FRAMES_PER_CHUNK, size, size)
        t = time.perf_counter()
        info = decoders.sample_video(path, settings, sink, backend=name)
        elapsed = time.perf_counter() - t
        frames = sink.frames_array()
        mode = info.decoder if info.fallback is None else f"{info.decoder} ({info.fallback[:40]})"
        return Outcome(elapsed, [_digest(f) for f in frames], mode, frames)

    return variant


def v_seek_per_kept(path: Path, step: float, size: int, k: int, threads: int | None) -> Outcome:
    t = time.perf_counter()
    cap = _open(path, threads)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    dst = np.empty((size, size, 3), dtype=np.uint8)
    out: list[bytes] = []
    try:
        for j in range(decode.kept_count(total, step)):
            cap.set(cv2.CAP_PROP_POS_FRAMES, decode.keep_index(j, step))
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            into(frame, dst)
            out.append(_digest(dst))
    finally:
        cap.release()
    return Outcome(time.perf_counter() - t, out)


RUNNERS: dict[str, Callable[[Path, float, int, int, int | None], Outcome]] = {
    "read_all": v_read_all,
    "sparse": _sampled(1),
    "segments": v_segments,
    "sparse_segments": _sampled(0),
    "seek_per_kept": v_seek_per_kept,
    **{name: _backend(name) for name in BACKEND_VARIANTS},
}


def _generate(folder: Path, quick: bool) -> list[Video]:
    """MJPEG footage made with OpenCV, and H.264 test-pattern video made with ffmpeg."""
    out: list[Video] = []
    seconds = 2.0 if quick else 20.0
    size = (320, 240) if quick else (640, 360)
    mjpeg = folder / "generated-mjpeg.avi"
    samples.make_footage(mjpeg, seconds=seconds, fps=24.0, size=size, seed=11)
    out.append(Video(f"generated MJPEG {size[0]}x{size[1]}", mjpeg, "generated"))
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is not None:
        w, h = (320, 240) if quick else (1280, 720)
        h264 = folder / "generated-h264.mp4"
        subprocess.run(
            [ffmpeg, "-nostdin", "-v", "error", "-y", "-f", "lavfi",
             "-i", f"testsrc2=size={w}x{h}:rate=30:duration={seconds}",
             "-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-bf", "2",
             "-pix_fmt", "yuv420p", str(h264)],
            check=True,
        )  # fmt: skip
        out.append(Video(f"generated H.264 {w}x{h}", h264, "generated"))
    return out


def _describe(v: Video) -> Video:
    cap = cv2.VideoCapture(str(v.path), cv2.CAP_FFMPEG)
    try:
        v.fps = float(cap.get(cv2.CAP_PROP_FPS)) or decode.FALLBACK_FPS
        v.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        v.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        n = 0
        while cap.grab():
            n += 1
        v.frames = n
    finally:
        cap.release()
    return v


def bench_video(
    v: Video, variants: list[str], args: argparse.Namespace, repeats: int
) -> dict[str, Any]:
    step = float(args.every)
    threads = args.threads or None
    times: dict[str, list[float]] = {name: [] for name in variants}
    last: dict[str, Outcome] = {}
    if "nvdec" in variants:  # the first read creates the CUDA context: not timed
        RUNNERS["nvdec"](v.path, step, args.size, args.segments, threads)
    for _ in range(repeats):
        for name in variants:
            o = RUNNERS[name](v.path, step, args.size, args.segments, threads)
            times[name].append(o.seconds)
            last[name] = o
    ref = last["sparse"].digests if "sparse" in last else None
    base = statistics.median(times["read_all"]) if "read_all" in times else None
    base_best = min(times["read_all"]) if "read_all" in times else None
    sparse = statistics.median(times["sparse"]) if "sparse" in times else None
    ref_frames = last["sparse"].frames if "sparse" in last else None
    results: dict[str, Any] = {}
    for name in variants:
        med = statistics.median(times[name])
        best = min(times[name])
        frames = last[name].frames
        mad = None
        if (
            name in BACKEND_VARIANTS
            and frames is not None
            and ref_frames is not None
            and frames.shape == ref_frames.shape
        ):
            diff = np.abs(frames.astype(np.int16) - ref_frames.astype(np.int16))
            mad = round(float(diff.mean()), 4)
        results[name] = {
            "fps": round(v.frames / med, 1) if med > 0 else None,
            "best_fps": round(v.frames / best, 1) if best > 0 else None,
            "median_s": round(med, 5),
            "best_s": round(best, 5),
            "speedup": round(base / med, 2) if base and med > 0 else None,
            "speedup_best": round(base_best / best, 2) if base_best and best > 0 else None,
            "vs_sparse": round(sparse / med, 2) if sparse and med > 0 else None,
            "same": None if ref is None else last[name].digests == ref,
            "mad": mad,
            "kept": len(last[name].digests),
            "mode": last[name].mode or None,
        }
    return {
        "name": v.name,
        "file": v.path.name,
        "source": v.source,
        "frames": v.frames,
        "fps": round(v.fps, 3),
        "width": v.width,
        "height": v.height,
        "results": results,
    }


def _table(report: dict[str, Any]) -> str:
    lines = []
    p = report["params"]
    lines.append(
        f"decode benchmark: keep 1 in {p['every']}, {p['segments']} segments, "
        f"{p['repeats']} repeats (median), {report['machine']['cpus']} CPUs, "
        f"OpenCV {report['machine']['opencv']}"
    )
    head = f"{'video':28s} {'frames':>6s} " + " ".join(f"{n:>17s}" for n in p["variants"])
    lines.append(head)
    lines.append("-" * len(head))
    for v in report["videos"]:
        cells = []
        for n in p["variants"]:
            r = v["results"][n]
            same = "" if r["same"] in (None, True) else "!"
            cells.append(f"{r['fps']:>8.0f} fps {r['speedup']:>4.1f}x{same:1s}")
        lines.append(f"{v['name'][:28]:28s} {v['frames']:>6d} " + " ".join(cells))
    lines.append("(N.Nx: speed-up over read_all; '!': kept frames differ from sparse)")
    for v in report["videos"]:
        mode = v["results"].get("sparse_segments", {}).get("mode")
        if mode:
            lines.append(f"  {v['name']}: sparse_segments read {mode}")
    backends = [n for n in p["variants"] if n in BACKEND_VARIANTS]
    if backends:
        lines.append("decode backends against OpenCV sparse (one reader), same run:")
        for v in report["videos"]:
            cells = []
            for n in backends:
                r = v["results"][n]
                mad = "" if r["mad"] is None else f", mad {r['mad']:.2f}"
                cells.append(f"{n} {r['vs_sparse']:.2f}x ({r['fps']:.0f} fps{mad}; {r['mode']})")
            lines.append(f"  {v['name']}: " + "; ".join(cells))
    t = report.get("target")
    if t:
        lines.append(
            f"target: sparse_segments >= {t['speedup']}x read_all with identical frames: "
            + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in t["met"].items())
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in RUNNERS]
    if unknown:
        print(f"unknown variants: {', '.join(unknown)}", file=sys.stderr)
        return 2
    for needed in ("read_all", "sparse"):
        if needed not in variants:
            variants.insert(0, needed)
    repeats = args.repeats or (2 if args.quick else 5)
    videos: list[Video] = []
    media = args.media or samples.real_media_dir()
    if media is not None and not args.quick:
        for name in ("Megamind.avi", "tree.avi"):
            if (media / name).is_file():
                videos.append(Video(f"real {name}", media / name, "real"))
    for path in args.video:
        videos.append(Video(path.name, path, "given"))
    with tempfile.TemporaryDirectory(prefix="clipline-bench-decode-") as tmp:
        if not args.no_generated:
            videos += _generate(Path(tmp), args.quick)
        if not videos:
            print("no videos to measure", file=sys.stderr)
            return 2
        report: dict[str, Any] = {
            "benchmark": "decode",
            "params": {
                "every": args.every,
                "segments": args.segments,
                "repeats": repeats,
                "size": args.size,
                "threads": args.threads or None,
                "variants": variants,
                "quick": bool(args.quick),
            },
            "machine": {
                "cpus": len(os.sched_getaffinity(0)),
                "opencv": cv2.__version__,
                "python": platform.python_version(),
                "load_avg": [round(x, 2) for x in os.getloadavg()],
            },
            "videos": [],
        }
        for v in videos:
            _describe(v)
            report["videos"].append(bench_video(v, variants, args, repeats))
        report["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    if "sparse_segments" in variants:
        met = {
            v["name"]: bool(
                v["results"]["sparse_segments"]["speedup"] is not None
                and v["results"]["sparse_segments"]["speedup"] >= TARGET_SPEEDUP
                and v["results"]["sparse_segments"]["same"]
            )
            for v in report["videos"]
        }
        report["target"] = {"speedup": TARGET_SPEEDUP, "every": 8, "met": met}
    text = _table(report)
    print(text, file=sys.stderr if args.json else sys.stdout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
