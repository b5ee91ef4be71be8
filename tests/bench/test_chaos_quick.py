"""``clipline bench chaos --short``: the CI subset of the chaos benchmark, run for real.

The command runs as a subprocess against the real parts: its own Redis server (append
only), a local stack per row (the GPU daemon on the CPU here, Celery prefork workers,
the shared-memory arena), HTTP sources and callback receivers on 127.0.0.1, and real
signals (a pool child and the GPU daemon are SIGKILLed mid-job). The test asserts the
invariants that must hold under every fault: no job lost, none ends twice, no
shared-memory file and no process outlives its stack, and every affected job makes
progress again within the documented recovery bound (``job_lease_s + 10`` s).
Throughput is reported by the benchmark, not judged here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SHORT_FAULTS = ["none", "child-kill", "daemon-kill", "hang-source", "callback-slow"]


def test_short_mode_keeps_the_invariants_under_faults(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    env.pop("REDIS_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "clipline.cli", "bench", "chaos", "--short", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert out.exists(), proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {r["fault"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(SHORT_FAULTS)
    assert result["rows"][0]["fault"] == "none"
    target = result["config"]["job_lease_s"] + 10.0
    for name, r in rows.items():
        where = f"{name}: {r['failures']} {r['notes']}\n{proc.stderr[-3000:]}"
        assert r["jobs_in"] >= result["config"]["jobs"], where
        assert r["lost"] == 0, where
        assert r["duplicated"] == 0, where
        assert r["terminal_once"] == r["jobs_in"], where
        assert r["leaked_shm"] == 0, where
        assert r["orphans"] == 0, where
        if r["recovery_kind"] is not None:
            assert r["affected"] >= 1, where  # the fault was really injected
            assert r["unrecovered"] == 0, where
            assert r["recovery_s"] is not None and r["recovery_s"] <= target, where
    # The fault-free row and the callback row finish every job; a hanging source fails
    # only its own job.
    assert rows["none"]["succeeded"] == rows["none"]["jobs_in"]
    assert rows["callback-slow"]["succeeded"] == rows["callback-slow"]["jobs_in"]
    assert rows["hang-source"]["failed"] == 1
    assert rows["none"]["throughput_ratio"] == 1.0
    assert proc.returncode == (0 if result["ok"] else 1), proc.stderr[-2000:]
    assert "terminal once" in proc.stdout
