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

**Vertical clips** (``9:16``): for the localizer's chosen window, the crop path the
workers would render (:func:`workers.pipeline.crop_path`: the window's product boxes, else
the motion in the picture, else the centre) and a plain centre crop, both checked
frame by frame against the case's true product box (:attr:`Case.boxes
<clipline_bench.quality_cases.Case.boxes>`, from the recipe): the share of the clip's
frames showing the product in which it is whole inside the window, counted over the
frames where its box fits in a 9:16 window at all (``fit``; a product wider than the
window cannot be whole in it). Computed from the paths; nothing is rendered.
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
from gpu_service import inprocess, protocol
from gpu_service.models import BuildContext, build
from gpu_service.models.base import Model
from workers import decode, pipeline, preprocess, reframe, select

TARGET_HIT_RATE = 0.9
#: the share of frames, where it fits, in which a 9:16 clip holds the whole product
TARGET_INSIDE_SHARE = 0.95
VERTICAL = "9:16"
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
    row["vertical"] = vertical(case, info, new, res)
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


def vertical(
    case: quality_cases.Case,
    info: decode.VideoInfo,
    chosen: select.Selection,
    results: protocol.JobResults | None = None,
) -> dict[str, Any]:
    """How often a 9:16 clip of the chosen window holds the whole product: the
    reframer's crop path (planned as the workers plan it) against a centre crop."""
    first, n = info.frames_between(chosen.start_s, chosen.end_s)
    times = info.times[first : first + n]
    source = (info.width, info.height)
    planned = pipeline.crop_path(VERTICAL, info, chosen, first, n, results)
    assert planned is not None
    paths = {"reframe": planned, "centre": reframe.centre_path(times, source, VERTICAL)}
    truth = {round(t * quality_cases.FPS): b for t, *b in case.boxes}
    cw, ch = paths["centre"].crop
    w, h = source
    frames = fit = 0
    inside = dict.fromkeys(paths, 0)
    windows = {name: p.windows() for name, p in paths.items()}
    for k, t in enumerate(times):
        box = truth.get(round(float(t) * quality_cases.FPS))
        if box is None:
            continue
        frames += 1
        x0, y0 = box[0] * w, box[1] * h
        x1, y1 = x0 + box[2] * w, y0 + box[3] * h
        if x1 - x0 > cw or y1 - y0 > ch:
            continue
        fit += 1
        for name, win in windows.items():
            wx, wy = (float(v) for v in win[k])
            if x0 >= wx and y0 >= wy and x1 <= wx + cw and y1 <= wy + ch:
                inside[name] += 1
    return {
        "crop": [cw, ch],
        "size": list(paths["reframe"].size),
        "follow": paths["reframe"].follow,
        "frames": frames,
        "fit": fit,
        "reframe_inside": inside["reframe"],
        "centre_inside": inside["centre"],
        "reframe_share": round(inside["reframe"] / fit, 4) if fit else None,
        "centre_share": round(inside["centre"] / fit, 4) if fit else None,
    }


def _fmt_windows(ws: list[list[float]]) -> str:
    return ",".join(f"{a:g}-{b:g}" for a, b in ws) or "absent"


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"{'case':34s} {'true':>12s} | {'localizer':>11s} {'hit':>4s} {'cpu s':>6s} "
        f"| {'whole-frame':>11s} {'hit':>4s} {'cpu s':>6s} "
        f"| {'9:16 fit':>8s} {'reframe':>7s} {'centre':>6s}"
    ]
    for r in report["cases"]:
        n, o = r["localizer"], r["whole_frame"]
        new = f"{n['start_s']:.2f}-{n['end_s']:.2f}" if n["found"] else "not found"
        lines.append(
            f"{r['case'][:34]:34s} {_fmt_windows(r['windows']):>12s} | {new:>11s} "
            f"{'HIT' if n['hit'] else 'miss':>4s} {n['cpu_s']:6.2f} | "
            f"{o['start_s']:5.2f}-{o['end_s']:5.2f} {'HIT' if o['hit'] else 'miss':>4s} "
            f"{o['cpu_s']:6.2f} | {_fmt_vertical(r['vertical'])}"
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
    v = s["vertical"]
    if v["fit"]:
        lines.append(
            f"9:16 clips, product whole in the window (of {v['fit']} frames where it fits, "
            f"{v['frames']} showing it): reframer {v['reframe_share']:.1%}, centre crop "
            f"{v['centre_share']:.1%}; target >= {TARGET_INSIDE_SHARE:.0%}: "
            f"{'met' if v['target_met'] else 'NOT met'}"
        )
        for follow, f in sorted(v["by_follow"].items()):
            if f["fit"]:
                lines.append(
                    f"  following {follow} ({f['cases']} cases): reframer "
                    f"{f['reframe_inside'] / f['fit']:.1%} of {f['fit']} frames"
                )
    for name, why in report["skipped"]:
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def _fmt_vertical(v: dict[str, Any]) -> str:
    if not v["frames"]:
        return f"{'-':>8s} {'-':>7s} {'-':>6s}"
    fit = f"{v['fit']}/{v['frames']}"
    if not v["fit"]:
        return f"{fit:>8s} {'-':>7s} {'-':>6s}"
    return f"{fit:>8s} {v['reframe_share']:7.1%} {v['centre_share']:6.1%}"


def _vertical_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    frames = sum(r["vertical"]["frames"] for r in rows)
    fit = sum(r["vertical"]["fit"] for r in rows)
    new = sum(r["vertical"]["reframe_inside"] for r in rows)
    old = sum(r["vertical"]["centre_inside"] for r in rows)
    share = round(new / fit, 4) if fit else None
    by_follow: dict[str, dict[str, int]] = {}
    for r in rows:
        v = r["vertical"]
        f = by_follow.setdefault(v["follow"], {"cases": 0, "fit": 0, "reframe_inside": 0})
        f["cases"] += 1
        f["fit"] += v["fit"]
        f["reframe_inside"] += v["reframe_inside"]
    return {
        "aspect": VERTICAL,
        "frames": frames,
        "fit": fit,
        "reframe_inside": new,
        "centre_inside": old,
        "reframe_share": share,
        "centre_share": round(old / fit, 4) if fit else None,
        "target_share": TARGET_INSIDE_SHARE,
        "target_met": share is not None and share >= TARGET_INSIDE_SHARE,
        # what the reframer's path followed: the product's verified boxes, or nothing
        # (never verified in the window: a centre crop)
        "by_follow": by_follow,
    }


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
            "vertical": _vertical_summary(rows),
        },
    }
    text = _table(report)
    print(text, file=sys.stderr if args.json else sys.stdout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
