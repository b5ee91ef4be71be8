"""The localizer workload of ``clipline bench daemon`` and ``clipline bench models``.

``bench daemon`` feeds the real daemon (a subprocess, real shared memory, real Redis)
with jobs whose product images go first and whose frames show them; ``bench models``
times the fused localizer against its per-picture reference. These tests check that
the workloads are what they claim (the product is matched and verified in every frame;
the fused path gives the reference's outputs), not their speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipline_bench import gpu_summary
from clipline_bench import models as models_bench
from clipline_bench.daemon import product_scene
from gpu_service import inprocess
from gpu_service.models.localizer import LocalizerModel
from workers import localize

REPO = Path(__file__).resolve().parents[2]


def test_the_daemon_workload_shows_the_product_in_every_frame() -> None:
    refs, frames = product_scene(3, 8, 288)
    model = LocalizerModel(torch.device("cpu"), features="sift_cv2")
    results = inprocess.job_results([model], refs, frames, 8, torch.device("cpu"), job_id="w")
    assert localize.evidence(results).verified.all()
    # another job's products are not in these frames
    other, _ = product_scene(4, 1, 288)
    results = inprocess.job_results([model], other, frames, 8, torch.device("cpu"), job_id="o")
    assert not localize.evidence(results).verified.any()


def test_models_bench_times_the_fused_localizer_against_its_reference(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    models_bench.add_arguments(parser)
    args = parser.parse_args(
        ["--device", "cpu", "--models", "localizer", "--batch", "1", "--frames", "4",
         "--iters", "1", "--rounds", "1", "--warmup", "1", "--out", str(tmp_path / "m.json")]
    )  # fmt: skip
    assert models_bench.run(args) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "m.json").read_text())["results"]}
    assert set(rows) == {"reference:sift_cv2", "fused:sift_cv2"}
    for row in rows.values():
        assert row["status"] == "ok" and row["rel_err"] == 0.0, row
        assert {"colour", "features", "match"} <= set(row["stage_ms_per_frame"])
    assert rows["reference:sift_cv2"]["vs_eager"] == 1.0
    # the GPU check's summary reads the same file; the other steps' files are missing
    summary = gpu_summary.summarize(tmp_path / "m.json")  # a directory's name is needed
    assert all(r["figure"] == "-" for r in summary["rows"])
    (tmp_path / "models.json").write_text((tmp_path / "m.json").read_text())
    summary = gpu_summary.summarize(tmp_path)
    fused = next(r for r in summary["rows"] if r["what"].startswith("localizer fused"))
    assert fused["figure"] == f"{rows['fused:sift_cv2']['vs_eager']:.2f}x"
    assert "e2e" in gpu_summary.table(summary) and "missing" in gpu_summary.table(summary)


@pytest.mark.slow
def test_daemon_bench_quick_runs_the_localizer_workload(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "daemon.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "clipline.cli", "bench", "daemon", "--quick", "--json",
         "--batch", "2", "--frames", "8",
         "--redis-url", redis_url, "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["models"] == "localizer"
    eager = report["backends"]["eager"]
    assert eager["models"] == {"localizer": "sift_cv2"}
    # chunks the daemon ran in the measured seconds (results of those chunks may arrive
    # after it: the arena is full on purpose, so each waits seconds in line)
    assert eager["items"] > 0 and eager["batches"] > 0 and eager["result_errors"] == 0
    assert 0.0 < eager["device_busy_ratio"] <= 1.0
    assert np.isfinite(eager["items_per_s"]) and eager["items_per_s"] > 0
