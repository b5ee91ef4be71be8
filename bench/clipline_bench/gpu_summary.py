"""The GPU check's summary: one table of ratios from the JSON files its steps wrote.

``python -m clipline_bench.gpu_summary DIR`` reads, from ``DIR`` (``bench/gpu_check.sh``'s
``$OUT``), whichever of these exist: ``models.json`` (``bench models``), ``daemon.json``
(``bench daemon``), ``e2e.json`` and ``e2e-nvdec.json`` (``bench e2e`` with the CPU
decoder and with NVDEC), ``gpu_check_rc.json`` (each step's exit status). It prints the
ratios an operator asks for first and writes them, with their sources, to
``DIR/gpu_check.json``:

* the localizer's fused path against its per-picture reference, kornia's SIFT on the
  device against OpenCV's on the host, and time per stage;
* the best backend of each neural model against eager;
* the daemon's busy ratio under full load (target 0.95);
* clipline against the before-design end to end (target 2x on a GPU), the busy ratio,
  and jobs/min per GPU with and without GPU decode.

A missing file is a row saying so, never an error. Reads JSON only: imports nothing of
clipline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _models(doc: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if doc is None:
        return [("models", "-", "models.json missing (step failed or timed out)")]
    rows: list[tuple[str, str, str]] = []
    by = {(r["model"], r["variant"]): r for r in doc.get("results", []) if "chunks_per_s" in r}
    for features in ("sift_cv2", "sift_kornia"):
        fused = by.get(("localizer", f"fused:{features}"))
        if fused:
            stages = ", ".join(
                f"{k} {v:.2f}" for k, v in (fused.get("stage_ms_per_frame") or {}).items()
            )
            rows.append(
                (
                    f"localizer fused vs reference ({features})",
                    f"{fused.get('vs_eager', float('nan')):.2f}x",
                    f"{fused['frames_per_s']:.0f} frames/s; ms/frame: {stages}",
                )
            )
    cv2_row, kornia_row = (
        by.get(("localizer", "fused:sift_cv2")),
        by.get(("localizer", "fused:sift_kornia")),
    )
    if cv2_row and kornia_row:
        rows.append(
            (
                "localizer kornia (device) vs OpenCV (host)",
                f"{kornia_row['chunks_per_s'] / cv2_row['chunks_per_s']:.2f}x",
                "fused path, same batch",
            )
        )
    for model in ("saliency", "embed"):
        cands = [r for (m, _), r in by.items() if m == model and r["variant"] != "eager"]
        if cands:
            best = max(cands, key=lambda r: r.get("vs_eager", 0.0))
            rows.append(
                (
                    f"{model} best backend vs eager",
                    f"{best.get('vs_eager', float('nan')):.2f}x",
                    f"{best['variant']}, rel err {best.get('rel_err', 0.0):.1e}",
                )
            )
    return rows


def _daemon(doc: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if doc is None:
        return [("daemon", "-", "daemon.json missing (step failed or timed out)")]
    rows = []
    for backend, r in doc.get("backends", {}).items():
        if "error" in r:
            rows.append((f"daemon busy ({backend})", "-", str(r["error"])[:80]))
            continue
        rows.append(
            (
                f"daemon busy ({backend}, {doc.get('config', {}).get('models', '')})",
                f"{r['device_busy_ratio']:.3f}",
                f"target 0.95; {r['items_per_s']:.1f} chunks/s, batch {r['mean_batch']:.1f}",
            )
        )
    return rows


def _e2e(doc: dict[str, Any] | None, label: str) -> list[tuple[str, str, str]]:
    if doc is None:
        return [(f"e2e {label}", "-", "missing (step failed, skipped or timed out)")]
    c, b, ratio = doc["clipline"], doc["baseline"], doc["ratio"]
    same = doc.get("windows", {}).get("same")
    return [
        (
            f"e2e {label}: clipline vs before-design",
            f"{ratio['throughput']:.2f}x",
            f"target 2x; {c['jobs_per_min']:.1f} vs {b['jobs_per_min']:.1f} jobs/min; "
            f"same windows: {same}",
        ),
        (f"e2e {label}: device busy", f"{c['device_busy_ratio']:.3f}", "target 0.95"),
        (
            f"e2e {label}: jobs/min per GPU",
            f"{c['jobs_per_min']:.1f}",
            f"W = {c['workers']}, {c['jobs']} jobs",
        ),
    ]


def summarize(directory: Path) -> dict[str, Any]:
    rows = (
        _models(_load(directory / "models.json"))
        + _daemon(_load(directory / "daemon.json"))
        + _e2e(_load(directory / "e2e.json"), "CPU decode")
        + _e2e(_load(directory / "e2e-nvdec.json"), "NVDEC decode")
    )
    return {
        "rows": [{"what": w, "figure": f, "detail": d} for w, f, d in rows],
        "steps": _load(directory / "gpu_check_rc.json"),
    }


def table(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    width = max((len(r["what"]) for r in rows), default=10)
    lines = [f"{'what':<{width}}  {'figure':>8}  detail"]
    lines += [f"{r['what']:<{width}}  {r['figure']:>8}  {r['detail']}" for r in rows]
    if summary.get("steps"):
        lines.append("steps (exit status): " + json.dumps(summary["steps"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0] if args else "bench/results")
    summary = summarize(directory)
    print(table(summary))
    (directory / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
