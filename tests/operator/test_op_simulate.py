"""The closed-loop simulation driven by the real decision function (issue 7's proof).

Stated bound: from one worker, every node holds its GPU at >= 0.95 utilization within
10 periods, makes at most one change in the 20 periods after settling, and returns to
the minimum once the load stops; the node whose GPU is twice as fast settles with more
workers. The same holds per GPU on a node with four GPUs, one of them half as fast: that
one settles with fewer workers, and the node's GPUs never take more CPU than it has."""

from __future__ import annotations

import dataclasses
import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from clipline_operator import cli, simulate

SETTLE_WITHIN_PERIODS = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Any]:
    png = tmp_path_factory.mktemp("sim") / "autoscaler.png"
    summary, records = simulate.run_default(png=png)
    return summary, png, records


def test_summary_shape(run: tuple[dict[str, Any], Path, Any]) -> None:
    summary, _, _ = run
    assert set(summary["nodes"]) == {"gpu-a", "gpu-fast"}
    keys = {
        "settled_period",
        "utilization_after_settle",
        "changes_after_settle",
        "workers_after_idle",
        "min_workers",
    }
    for node in summary["nodes"].values():
        assert keys <= set(node)


def test_reaches_target_and_stays(run: tuple[dict[str, Any], Path, Any]) -> None:
    summary, _, _ = run
    for name, node in summary["nodes"].items():
        assert node["settled_period"] is not None, name
        assert node["settled_period"] <= SETTLE_WITHIN_PERIODS, name
        assert node["periods_after_settle"] == simulate.SETTLE_WINDOW
        assert node["utilization_after_settle"] >= 0.95, name
        assert node["changes_after_settle"] <= 1, name


def test_scales_down_when_load_stops(run: tuple[dict[str, Any], Path, Any]) -> None:
    summary, _, records = run
    for name, node in summary["nodes"].items():
        assert node["workers_after_idle"] == node["min_workers"] == 1, name
        assert node["max_workers"] > 4, name
        idle = [r for r in records[name] if not r.load]
        assert any(r.reason == "NoBacklog" for r in idle)


def test_faster_gpu_gets_more_feeders(run: tuple[dict[str, Any], Path, Any]) -> None:
    summary, _, _ = run
    nodes = summary["nodes"]
    assert nodes["gpu-fast"]["workers_at_settle"] > nodes["gpu-a"]["workers_at_settle"] * 1.3


def test_too_many_feeders_are_shed() -> None:
    sc = dataclasses.replace(
        simulate.default_scenario(),
        initial_workers=16,
        load_periods=30,
        idle_periods=1,
    )
    _, records = simulate.run_default(scenario=sc)
    gpu_a = records["gpu-a"]
    assert any(r.reason == "FeedersWaiting" for r in gpu_a)
    assert gpu_a[-1].workers < 16
    late = [r.utilization for r in gpu_a[-10:]]
    assert min(late) >= 0.95


def test_png_is_written(run: tuple[dict[str, Any], Path, Any]) -> None:
    _, png, _ = run
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_prints_json(run: tuple[dict[str, Any], Path, Any]) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["simulate", "--json", "--no-png"]) == 0
    summary = json.loads(out.getvalue())
    assert summary["png"] is None
    # deterministic (seeded): the CLI reports what the library run found
    assert summary["nodes"] == run[0]["nodes"]


@pytest.fixture(scope="module")
def multi() -> tuple[dict[str, Any], Any]:
    return simulate.run_default(scenario=simulate.multi_gpu_scenario())


def test_four_gpu_node_settles_each_gpu_near_target(multi: tuple[dict[str, Any], Any]) -> None:
    summary, records = multi
    quad = {n: s for n, s in summary["nodes"].items() if n.startswith("gpu-x4/")}
    assert sorted(quad) == [f"gpu-x4/gpu{i}" for i in range(4)]
    assert simulate.SLOW_GPU in quad and "gpu-a" in summary["nodes"]
    for name, node in summary["nodes"].items():
        assert node["settled_period"] is not None, name
        assert node["settled_period"] <= SETTLE_WITHIN_PERIODS, name
        assert node["utilization_after_settle"] >= 0.95, name
        assert node["changes_after_settle"] <= 1, name
        assert node["workers_after_idle"] == node["min_workers"] == 1, name
        assert any(r.reason == "NoBacklog" for r in records[name] if not r.load), name


def test_slow_gpu_gets_fewer_workers_and_the_node_cpu_is_shared(
    multi: tuple[dict[str, Any], Any],
) -> None:
    summary, records = multi
    slow = summary["nodes"][simulate.SLOW_GPU]["workers_at_settle"]
    fast = [
        s["workers_at_settle"]
        for n, s in summary["nodes"].items()
        if n.startswith("gpu-x4/") and n != simulate.SLOW_GPU
    ]
    # Half as fast: about half the feeders of each other GPU of its node.
    assert slow < min(fast) * 0.7
    (quad,) = [m for m in simulate.multi_gpu_scenario().nodes if m.name == "gpu-x4"]
    cap = quad.allocatable_cpu_workers
    assert cap is not None
    names = quad.daemon_names()
    for k in range(len(records[names[0]])):
        assert sum(records[n][k].desired for n in names) <= cap
    # The slow GPU's spare CPU went to the fast ones: more than an equal split.
    assert sum(fast) > 3 * (cap // 4)


def test_cli_runs_the_multi_gpu_scenario(multi: tuple[dict[str, Any], Any]) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["simulate", "--scenario", "multi-gpu", "--json", "--no-png"]) == 0
    assert json.loads(out.getvalue())["nodes"] == multi[0]["nodes"]
