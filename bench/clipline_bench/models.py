"""Benchmark: the daemon's neural models under each inference backend, side by side.

``clipline bench models`` builds the ``saliency`` (TASED-Net) and ``embed`` (ViT)
models once, then one runner per *variant* (``backend[:precision]``, e.g. ``eager``,
``channels_last:fp32``, ``compile:bf16``) on the same weights, and times the whole
model call the daemon makes (on-device preprocessing + network + per-frame outputs) on
one batch of uint8 chunks already on the device. Variants run round-robin for
``--rounds`` rounds of ``--iters`` calls; the table shows the median round.

Columns: ``chunks/s`` (batches of ``--batch`` chunks), ``frames/s`` (chunks x
``--frames``), ``ms/batch``, ``vs eager`` (throughput ratio against the ``eager``
variant measured in the same run) and ``rel err`` (the network output's relative error
against eager on the benchmark batch, as the backend checks measure it). A variant
that cannot run here (no CUDA for CUDA graphs, TensorRT not installed, ...) is listed
with the reason. ``eager`` is fp32 with contiguous tensors; ``auto`` precision is bf16
on CUDA and fp32 on the CPU.

Defaults on CUDA: 8 chunks of 16 frames at 128x128, saliency at 224x384 with 4 anchor
clips per chunk (32 clips of 32 frames per batch), embed ViT-B/16 at 224. On the CPU
(or with ``--quick``) everything is small (2 chunks of 8 frames, saliency 64x64 with one
anchor, ViT-Ti/16 at 112) so the run takes a minute; those figures only compare
variants with each other.

Output: a table (stdout, or stderr with ``--json``) and JSON written to ``--out``::

    {"benchmark": "models", "params": {...}, "machine": {...},
     "results": [{"model", "variant", "backend", "precision", "status", "ms_per_batch",
                  "chunks_per_s", "frames_per_s", "vs_eager", "rel_err", "build_s"}]}
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path("bench") / "results" / "models.json"
DEFAULT_VARIANTS = "eager,channels_last,compile,cudagraphs"
MODELS = ("localizer", "saliency", "embed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes, few iterations")
    parser.add_argument("--json", action="store_true", help="print the JSON on stdout")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="comma-separated backend[:precision] (precision: auto, fp32, bf16, fp16); "
        f"default {DEFAULT_VARIANTS}",
    )
    parser.add_argument("--batch", type=int, default=0, help="chunks per batch (8 CUDA, 2 CPU)")
    parser.add_argument("--frames", type=int, default=0, help="frames per chunk (16 CUDA, 8 CPU)")
    parser.add_argument("--frame-size", type=int, default=0, help="frame side (128 CUDA, 64 CPU)")
    parser.add_argument("--saliency-size", default="", help="HxW (224x384 CUDA, 64x64 CPU)")
    parser.add_argument("--anchors", type=int, default=0, help="saliency clips per chunk")
    parser.add_argument("--embed-arch", default="", help="vit_b16, vit_s16 or vit_ti16")
    parser.add_argument("--embed-size", type=int, default=0, help="ViT input side")
    parser.add_argument("--iters", type=int, default=0, help="calls per round")
    parser.add_argument("--rounds", type=int, default=0, help="round-robin rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


@dataclasses.dataclass
class Params:
    device: torch.device
    models: list[str]
    variants: list[tuple[str, str]]
    batch: int
    frames: int
    frame_size: int
    saliency_size: str
    anchors: int
    embed_arch: str
    embed_size: int
    iters: int
    rounds: int
    warmup: int


def _params(args: argparse.Namespace) -> Params:
    from gpu_service.backends import BACKENDS, PRECISIONS

    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    small = device.type != "cuda" or args.quick
    variants: list[tuple[str, str]] = []
    for item in (v.strip() for v in args.variants.split(",")):
        if not item:
            continue
        backend, _, precision = item.partition(":")
        precision = precision or "auto"
        if backend not in BACKENDS or precision not in ("auto", *PRECISIONS):
            raise ValueError(f"invalid variant {item!r}: use backend[:precision]")
        variants.append((backend, precision))
    if ("eager", "auto") not in variants:
        variants.insert(0, ("eager", "auto"))  # the baseline every ratio refers to
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; use {', '.join(MODELS)}")
    return Params(
        device=device,
        models=models,
        variants=variants,
        batch=args.batch or (2 if small else 8),
        frames=args.frames or (8 if small else 16),
        frame_size=args.frame_size or (64 if small else 128),
        saliency_size=args.saliency_size or ("64x64" if small else "224x384"),
        anchors=args.anchors or (1 if small else 4),
        embed_arch=args.embed_arch or ("vit_ti16" if small else "vit_b16"),
        embed_size=args.embed_size or (112 if small else 224),
        iters=args.iters or (2 if small else 10),
        rounds=args.rounds or (2 if small else 3),
        warmup=args.warmup,
    )


def _build_model(name: str, p: Params) -> Any:
    from gpu_service.models.common import parse_size, seeded

    if name == "saliency":
        from gpu_service.models.saliency import SaliencyConfig, SaliencyModel

        h, w = parse_size(p.saliency_size)
        cfg = SaliencyConfig(height=h, width=w, anchors=p.anchors)
        return SaliencyModel(p.device, cfg, backend="eager", buckets=(p.batch,), verify=False)
    from gpu_service.models.embed import ARCHS, EmbedModel, ViT

    with seeded():
        net = ViT(dataclasses.replace(ARCHS[p.embed_arch], image=p.embed_size))
    return EmbedModel(
        p.device, net=net, frames_per_chunk=p.frames, buckets=(p.batch,), verify=False
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(model: Any, frames: torch.Tensor, iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        model(frames)
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_model(name: str, p: Params) -> list[dict[str, Any]]:
    from gpu_service.backends import build_backend, resolve_precision

    model = _build_model(name, p)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(
        0, 256, (p.batch, p.frames, p.frame_size, p.frame_size, 3), generator=gen
    ).to(torch.uint8)
    frames = frames.to(p.device)
    with torch.inference_mode():
        net_input = model.preprocess(frames)
    eager_runner = model.runner
    reference = eager_runner(net_input)
    rows: list[dict[str, Any]] = []
    runners: dict[int, Any] = {}
    for i, (backend, precision) in enumerate(p.variants):
        label = backend if precision == "auto" else f"{backend}:{precision}"
        prec = resolve_precision(precision, p.device, backend)
        row: dict[str, Any] = {
            "model": name,
            "variant": label,
            "backend": backend,
            "precision": prec,
            "status": "ok",
        }
        rows.append(row)
        start = time.perf_counter()
        try:
            if backend == "eager":
                runner = eager_runner
            else:
                runner = build_backend(backend, model.net, model.core_spec, p.device, prec)
            model.runner = runner
            for _ in range(p.warmup):  # compiles, autotunes, captures
                model(frames)
            _sync(p.device)
            row["rel_err"] = model.core_spec.error(runner(net_input), reference)
        except Exception as exc:
            row["status"] = f"unavailable: {type(exc).__name__}: {str(exc)[:160]}"
            continue
        finally:
            row["build_s"] = round(time.perf_counter() - start, 2)
        runners[i] = runner
    timings: dict[int, list[float]] = {i: [] for i in runners}
    for _ in range(p.rounds):
        for i, runner in runners.items():
            model.runner = runner
            timings[i].append(_time(model, frames, p.iters, p.device))
    for i, row in enumerate(rows):
        if i not in timings:
            continue
        sec = statistics.median(timings[i])
        row["ms_per_batch"] = round(sec * 1000, 3)
        row["best_ms_per_batch"] = round(min(timings[i]) * 1000, 3)
        row["chunks_per_s"] = round(p.batch / sec, 3)
        row["frames_per_s"] = round(p.batch * p.frames / sec, 2)
    base = next((r for r in rows if r["variant"] == "eager" and "chunks_per_s" in r), None)
    for row in rows:
        if base is not None and "chunks_per_s" in row:
            row["vs_eager"] = round(row["chunks_per_s"] / base["chunks_per_s"], 3)
    del runners, model, eager_runner
    gc.collect()
    if p.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _localizer_inputs(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Real frames (a sample video, a product planted in half of them) and product images.

    Letterboxed at the daemon's ``frame_size`` as the workers send them; generated
    pictures when the real sample media is not here.
    """
    import cv2
    import numpy as np

    from clipline import samples
    from clipline_core.settings import Settings
    from workers.preprocess import into

    size = Settings().frame_size
    n = p.batch * p.frames
    media = samples.real_media_dir()
    rng = np.random.default_rng(0)
    pictures: list[np.ndarray] = []
    products: list[np.ndarray] = []
    if media is not None:
        cap = cv2.VideoCapture(str(media / "tree.avi"))
        while len(pictures) < n:
            ok, f = cap.read()
            if not ok:
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                continue
            pictures.append(cv2.resize(f, (640, 360)))
        cap.release()
        for name in ("baboon.jpg", "fruits.jpg"):
            img = cv2.imread(str(media / name))
            if img is None:
                raise FileNotFoundError(media / name)
            products.append(img)
    else:
        pictures = [rng.integers(0, 256, (360, 640, 3), dtype=np.uint8) for _ in range(n)]
        products = [rng.integers(0, 256, (200, 200, 3), dtype=np.uint8) for _ in range(2)]
    for i in range(0, n, 2):  # the product, smaller than in its photo, in every other frame
        small = cv2.resize(products[i // 2 % 2], (180, 180))
        x, y = 60 + (i * 13) % 380, 40 + (i * 7) % 140
        pictures[i][y : y + 180, x : x + 180] = small
    frames = np.zeros((n, size, size, 3), np.uint8)
    for i, pic in enumerate(pictures):
        into(pic, frames[i])
    refs = np.zeros((len(products), size, size, 3), np.uint8)
    for i, img in enumerate(products):
        into(img, refs[i])
    shape = (p.batch, p.frames, size, size, 3)
    return torch.from_numpy(frames).reshape(shape), torch.from_numpy(refs)[None]


def bench_localizer(p: Params) -> list[dict[str, Any]]:
    """The product localizer: the fused, batched path against the per-picture reference.

    One batch of ``batch`` jobs' chunks (real frames, two product images per job), timed
    as the daemon calls the model. Rows: ``reference`` (float colour bins, one match per
    picture and view) and ``fused`` with OpenCV's SIFT, plus kornia's SIFT on CUDA; each
    with its time per stage in ms per frame (``profile``: the device is waited for at
    each stage's end). ``rel err`` is the largest difference of any output against the
    reference (0: the same pairs, colours and boxes).
    """
    from gpu_service import inprocess
    from gpu_service.models.localizer import LocalizerModel
    from gpu_service.shm import ChunkKind

    frames, refs = _localizer_inputs(p)
    frames, refs = frames.to(p.device), refs.to(p.device)
    jobs = [f"bench-{i}" for i in range(p.batch)]

    variants = [("reference", "sift_cv2", False), ("fused", "sift_cv2", True)]
    if p.device.type == "cuda":
        variants += [("reference", "sift_kornia", False), ("fused", "sift_kornia", True)]
    rows: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for label, features, fused in variants:
        variant = f"{label}:{features}"
        row: dict[str, Any] = {
            "model": "localizer",
            "variant": variant,
            "backend": label,
            "precision": "fp32",
            "status": "ok",
        }
        rows.append(row)
        start = time.perf_counter()
        try:
            model = LocalizerModel(p.device, features=features, fused=fused)
            for job in jobs:
                model.bind(ChunkKind.REFS, inprocess.items_for(ChunkKind.REFS, job, 0, -1, refs))
                model(refs)
            rows_of = [  # one job per row of the batch
                inprocess.items_for(ChunkKind.FRAMES, job, 0, 0, frames[i : i + 1])[0]
                for i, job in enumerate(jobs)
            ]
            model.bind(ChunkKind.FRAMES, rows_of)
            for _ in range(p.warmup):
                out = model(frames)
        except Exception as exc:
            row["status"] = f"unavailable: {type(exc).__name__}: {str(exc)[:160]}"
            continue
        finally:
            row["build_s"] = round(time.perf_counter() - start, 2)
        outputs[variant] = out
        model.stage_s.clear()
        model.profile = True
        times = []
        for _ in range(p.rounds):
            times.append(_time(model, frames, p.iters, p.device))
        sec = statistics.median(times)
        calls = p.rounds * p.iters
        per_frame = 1000.0 / (calls * p.batch * p.frames)
        row["ms_per_batch"] = round(sec * 1000, 3)
        row["best_ms_per_batch"] = round(min(times) * 1000, 3)
        row["chunks_per_s"] = round(p.batch / sec, 3)
        row["frames_per_s"] = round(p.batch * p.frames / sec, 2)
        row["stage_ms_per_frame"] = {k: round(v * per_frame, 3) for k, v in model.stage_s.items()}
        ref = outputs.get(f"reference:{features}")
        if ref is not None:
            row["rel_err"] = max(float((out[k] - ref[k]).abs().max()) for k in out)
        del model
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["variant"] == "reference:" + row["variant"].split(":")[1]
                and "chunks_per_s" in r
            ),
            None,
        )
        if base is not None and "chunks_per_s" in row:
            row["vs_eager"] = round(row["chunks_per_s"] / base["chunks_per_s"], 3)
    return rows


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = None
    return info


def _table(report: dict[str, Any]) -> str:
    p = report["params"]
    lines = [
        f"models on {report['machine']['device']} ({report['machine'].get('gpu', 'CPU')}), "
        f"batch {p['batch']} chunks x {p['frames']} frames at {p['frame_size']}px; "
        f"saliency {p['saliency_size']} x{p['anchors']} anchors, embed {p['embed_arch']}"
        f"@{p['embed_size']}; median of {p['rounds']} rounds x {p['iters']} calls",
        f"{'model':<9} {'variant':<20} {'prec':<5} {'ms/batch':>10} {'chunks/s':>9} "
        f"{'frames/s':>9} {'vs eager':>8} {'rel err':>9}  status",
    ]
    for r in report["results"]:
        if "chunks_per_s" in r:
            lines.append(
                f"{r['model']:<9} {r['variant']:<20} {r['precision']:<5} "
                f"{r['ms_per_batch']:>10.2f} {r['chunks_per_s']:>9.2f} {r['frames_per_s']:>9.1f} "
                f"{r.get('vs_eager', float('nan')):>7.2f}x {r.get('rel_err', 0.0):>9.2e}  ok"
            )
            if r.get("stage_ms_per_frame"):
                stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stage_ms_per_frame"].items())
                lines.append(f"{'':<9} {'':<20} ms/frame by stage: {stages}")
        else:
            lines.append(
                f"{r['model']:<9} {r['variant']:<20} {r['precision']:<5} {'-':>10} {'-':>9} "
                f"{'-':>9} {'-':>8} {'-':>9}  {r['status']}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        p = _params(args)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if p.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the daemon does (few bucketed shapes)
    report: dict[str, Any] = {
        "benchmark": "models",
        "params": {
            "batch": p.batch,
            "frames": p.frames,
            "frame_size": p.frame_size,
            "saliency_size": p.saliency_size,
            "anchors": p.anchors,
            "embed_arch": p.embed_arch,
            "embed_size": p.embed_size,
            "iters": p.iters,
            "rounds": p.rounds,
            "warmup": p.warmup,
            "variants": [f"{b}:{q}" for b, q in p.variants],
            "quick": bool(args.quick),
        },
        "machine": _machine(p.device),
        "results": [],
    }
    for name in p.models:
        rows = bench_localizer(p) if name == "localizer" else bench_model(name, p)
        report["results"].extend(rows)
    report["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    text = _table(report)
    print(text, file=sys.stderr if args.json else sys.stdout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m clipline_bench.models``: the same benchmark without the CLI's imports."""
    parser = argparse.ArgumentParser(prog="clipline bench models", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
