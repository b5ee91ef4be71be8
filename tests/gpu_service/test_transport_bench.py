"""The hand-off benchmark cannot rot (its quick mode runs here and its JSON has the
documented shape), and the chaos run — producers SIGKILLed at random while a consumer
verifies every message — leaks no slot. Speed is the benchmark's business, not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from clipline_bench import handoff

VARIANT_KEYS = {"p50_us", "p99_us", "msgs_per_s"}


def test_bench_handoff_quick_json_has_the_documented_shape(tmp_path: Path) -> None:
    out = tmp_path / "handoff.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipline.cli",
            "bench",
            "handoff",
            "--quick",
            "--json",
            "--chaos-seconds",
            "0.5",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    assert report["size_mb"] == 12
    assert set(report["variants"]) == set(handoff.VARIANTS)
    for name, v in report["variants"].items():
        assert set(v) >= VARIANT_KEYS, name
        assert v["p50_us"] > 0 and v["p99_us"] >= v["p50_us"] and v["msgs_per_s"] > 0
        assert set(v["by_dtype"]) == {"uint8", "float32"}
        assert v["bad_messages"] == 0, name
    clip = report["variants"]["clipline"]
    assert clip["zero_copy"] is True
    assert clip["leaked_slots"] == 0 and clip["files_left"] == []
    assert report["memcpy_us"] > 0
    assert report["chaos"]["leaked_slots"] == 0
    assert set(report["ratios"]) >= {
        "torch_mp_queue_p50_over_clipline",
        "torch_mp_queue_preshared_p50_over_clipline",
    }
    assert report["machine"]["cpus"] >= 1
    assert "clipline" in done.stderr and "memcpy" in done.stderr  # the table


def test_producers_killed_at_random_leak_no_slot() -> None:
    result = handoff.run_chaos(1.5, producers=3, slots=4, nbytes=256 * 1024, seed=11)
    assert result["kills"] >= 5
    assert result["consumed"] > 0
    assert result["corrupt"] == 0 and result["duplicates"] == 0
    assert result["leaked_slots"] == 0
    assert result["states"] == {"free": 4, "writing": 0, "ready": 0, "consuming": 0}
    assert result["files_left"] == []
