"""Benchmark: does the highlight show the product? The localizer against today's scorer.

``clipline bench quality`` builds the hard case set of :mod:`clipline_bench.quality_cases`
(real photographs and footage: products small, moving, tilted, relit, occluded, cropped,
next to look-alikes, in grayscale, heavily compressed, vertical, a real cluttered photo,
never shown) and, for each case, chooses a window two ways on the same decoded frames:

* **localizer** (the default model set): the workers' real decoder and preprocessing
  (letterboxed ``frame_size`` frames, 4 per second), the daemon's ``localizer`` model run
  in this process as the engine runs it (:mod:`gpu_service.inprocess`), the workers'
  real selection (:mod:`workers.select` -> :mod:`workers.localize`);
* **whole-frame** (the scorer before the localizer): the ``features`` model (colour
  histogram, thumbnail, motion) on the same frames stretched to 128 x 128 as they were
  before, and the whole-frame score of :mod:`workers.select`.

A hit is a window overlapping a true window by at least 4 s (a shorter appearance: at
least min(2.5 s, 80 % of it)); for a product that never appears, a hit is
``found: false``. The table shows each case, its true and chosen windows, hits and
CPU seconds per job for both scorers (decode excluded: it is the same for both);
the JSON (``--out``, default ``bench/results/quality.json``) has every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from clipline_bench import quality_cases
from clipline_core.settings import Settings
from gpu_service import inprocess
from gpu_service.models import BuildContext, build
from gpu_service.models.base import Model
from workers import decode, preprocess, select

TARGET_HIT_RATE = 0.9
OLD_SIZE = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cases-dir",
        type=Path,
        default=Path(os.environ.get("CLIPLINE_QUALITY_CASES", ".cache/quality-cases")),
        help="where the generated cases are kept (built once, reused)",
    )
    parser.add_argument("--set", default="all", choices=["all", "dev", "heldout"])
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument(
        "--features", default="sift_cv2", help="localizer features (sift_cv2 | sift_kornia)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    parser.add_argument("--json", action="store_true", help="print the JSON report")


def _stretched(frames: np.ndarray, size: int = OLD_SIZE) -> np.ndarray:
    """Frames as the whole-frame scorer saw them: the picture stretched to a square."""
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, f in enumerate(frames):
        nz = np.nonzero(f.max(axis=2) > 0)
        y0, y1 = (nz[0].min(), nz[0].max() + 1) if len(nz[0]) else (0, f.shape[0])
        x0, x1 = (nz[1].min(), nz[1].max() + 1) if len(nz[1]) else (0, f.shape[1])
        out[i] = cv2.resize(f[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
    return out


def run_case(
    case: quality_cases.Case,
    settings: Settings,
    localizer: list[Model],
    features: list[Model],
    device: torch.device,
) -> dict[str, Any]:
    s = settings.frame_size
    sink = preprocess.MemorySink(settings.frames_per_chunk, s, s)
    info = decode.sample_video(case.video, settings, sink)
    frames = sink.frames_array()
    refs = np.zeros((len(case.images), s, s, 3), np.uint8)
    for i, img in enumerate(case.images):
        decode.load_image(img, (s, s), refs[i], f"product image {i + 1}")
    ts = info.kept_timestamps
    length = 5.0
    row: dict[str, Any] = {
        "case": case.name,
        "kind": case.kind,
        "heldout": case.heldout,
        "windows": [list(w) for w in case.windows],
        "duration_s": round(info.duration_s, 3),
        "frames": len(frames),
    }
    t0 = time.process_time()
    res = inprocess.job_results(localizer, refs, frames, settings.frames_per_chunk, device)
    new = select.select(res, ts, info.duration_s, length)
    new_cpu = time.process_time() - t0
    product = new.product or {}
    found = bool(product.get("found", False))
    row["localizer"] = {
        "start_s": round(new.start_s, 3),
        "end_s": round(new.end_s, 3),
        "score": round(new.score, 4),
        "found": found,
        "verified_frames": product.get("verified_frames", 0),
        "mean_inliers": product.get("mean_inliers", 0.0),
        "hit": quality_cases.hit(case.windows, new.start_s, new.end_s, found=found),
        "cpu_s": round(new_cpu, 3),
    }
    t0 = time.process_time()
    small = _stretched(frames)
    small_refs = _stretched(refs)
    old_res = inprocess.job_results(features, small_refs, small, settings.frames_per_chunk, device)
    old = select.select(old_res, ts, info.duration_s, length)
    old_cpu = time.process_time() - t0
    row["whole_frame"] = {
        "start_s": round(old.start_s, 3),
        "end_s": round(old.end_s, 3),
        "score": round(old.score, 4),
        # the whole-frame scorer always picks a window: it cannot say "not there"
        "hit": quality_cases.hit(case.windows, old.start_s, old.end_s, found=True),
        "cpu_s": round(old_cpu, 3),
    }
    return row


def _fmt_windows(ws: list[list[float]]) -> str:
    return ",".join(f"{a:g}-{b:g}" for a, b in ws) or "absent"


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"{'case':34s} {'true':>12s} | {'localizer':>11s} {'hit':>4s} {'cpu s':>6s} "
        f"| {'whole-frame':>11s} {'hit':>4s} {'cpu s':>6s}"
    ]
    for r in report["cases"]:
        n, o = r["localizer"], r["whole_frame"]
        new = f"{n['start_s']:.2f}-{n['end_s']:.2f}" if n["found"] else "not found"
        lines.append(
            f"{r['case'][:34]:34s} {_fmt_windows(r['windows']):>12s} | {new:>11s} "
            f"{'HIT' if n['hit'] else 'miss':>4s} {n['cpu_s']:6.2f} | "
            f"{o['start_s']:5.2f}-{o['end_s']:5.2f} {'HIT' if o['hit'] else 'miss':>4s} "
            f"{o['cpu_s']:6.2f}"
        )
    s = report["summary"]
    lines.append(
        f"hit rate: localizer {s['localizer_hit_rate']:.1%} ({s['localizer_hits']}/{s['cases']}), "
        f"whole-frame {s['whole_frame_hit_rate']:.1%} ({s['whole_frame_hits']}/{s['cases']}); "
        f"target >= {TARGET_HIT_RATE:.0%}: {'met' if s['target_met'] else 'NOT met'}"
    )
    lines.append(
        f"CPU s per job (models + selection, decode excluded): localizer "
        f"{s['localizer_cpu_s_per_job']:.2f}, whole-frame {s['whole_frame_cpu_s_per_job']:.2f} "
        f"({s['cpu_ratio']:.1f}x)"
    )
    for name, why in report["skipped"]:
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    cases, skipped = quality_cases.build_cases(args.cases_dir, which=args.set, only=only)
    if not cases:
        print("no cases to run" + "".join(f"\n  {n}: {w}" for n, w in skipped), file=sys.stderr)
        return 2
    settings = Settings.from_env().replace(
        device=args.device, localizer_features=args.features, decode_segments=1
    )
    device = torch.device(args.device)
    ctx = BuildContext(settings, device)
    localizer = [build("localizer", ctx)]
    features = [build("features", ctx)]
    rows = []
    for case in cases:
        row = run_case(case, settings, localizer, features, device)
        rows.append(row)
        print(
            f"  {case.name}: localizer {'HIT' if row['localizer']['hit'] else 'miss'}, "
            f"whole-frame {'HIT' if row['whole_frame']['hit'] else 'miss'}",
            file=sys.stderr,
        )
    n = len(rows)
    new_hits = sum(r["localizer"]["hit"] for r in rows)
    old_hits = sum(r["whole_frame"]["hit"] for r in rows)
    new_cpu = sum(r["localizer"]["cpu_s"] for r in rows) / n
    old_cpu = sum(r["whole_frame"]["cpu_s"] for r in rows) / n
    report: dict[str, Any] = {
        "benchmark": "quality",
        "params": {
            "set": args.set,
            "features": localizer[0].backend,
            "frame_size": settings.frame_size,
            "sample_fps": settings.sample_fps,
            "device": args.device,
        },
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "opencv": cv2.__version__,
        },
        "cases": rows,
        "skipped": skipped,
        "summary": {
            "cases": n,
            "localizer_hits": new_hits,
            "whole_frame_hits": old_hits,
            "localizer_hit_rate": round(new_hits / n, 4),
            "whole_frame_hit_rate": round(old_hits / n, 4),
            "target_hit_rate": TARGET_HIT_RATE,
            "target_met": new_hits / n >= TARGET_HIT_RATE,
            "localizer_cpu_s_per_job": round(new_cpu, 3),
            "whole_frame_cpu_s_per_job": round(old_cpu, 3),
            "cpu_ratio": round(new_cpu / max(old_cpu, 1e-9), 2),
        },
    }
    text = _table(report)
    print(text, file=sys.stderr if args.json else sys.stdout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
