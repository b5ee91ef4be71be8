"""``clipline bench e2e --quick``: the CI mode of the headline benchmark, run for real.

The command runs as a subprocess against the real parts: the baseline service
processes, and the clipline stack (Redis, the GPU daemon on the CPU here, Celery
prefork workers, the shared-memory arena, ffmpeg). The test checks the JSON's shape and
that both systems chose the same window for every job; speed is the benchmark's
business, not the test's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_quick_mode_runs_both_systems_and_they_agree(tmp_path: Path, redis_url: str) -> None:
    out, plot = tmp_path / "e2e.json", tmp_path / "busy.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    env["CLIPLINE_STATE_DIR"] = str(tmp_path / "state")
    proc = subprocess.run(
        [sys.executable, "-m", "clipline.cli", "bench", "e2e", "--quick", "--json",
         "--redis-url", redis_url, "--out", str(out), "--plot", str(plot)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result

    assert isinstance(result["device"], str) and result["device"]
    for system in ("baseline", "clipline"):
        r = result[system]
        assert r["jobs"] == 3 and r["succeeded"] == 3 and r["failed"] == 0
        assert r["jobs_per_min"] > 0 and r["items_per_s"] > 0
        assert 0.0 < r["device_busy_ratio"] <= 1.0
        assert 0.0 < r["p50_s"] <= r["p95_s"]
        assert 0.0 < r["cpu_util"] <= 1.0
        assert r["peak_rss_mb"] > 50
    assert math.isfinite(result["ratio"]["throughput"]) and result["ratio"]["throughput"] > 0
    assert result["ratio"]["throughput"] == pytest.approx(
        result["clipline"]["jobs_per_min"] / result["baseline"]["jobs_per_min"], rel=1e-2
    )

    windows = result["windows"]
    assert windows["compared"] == 3
    assert windows["same"], windows["mismatches"]
    for job in result["jobs"]:
        assert job["baseline"]["start_s"] == pytest.approx(job["clipline"]["start_s"], abs=1e-3)

    assert {"baseline", "clipline"} <= set(result["series"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
