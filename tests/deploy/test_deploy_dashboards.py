"""Dashboards and alert rules generated from the metric-name constants.

Every PromQL expression is parsed by ``promtool`` (Debian's prometheus package) and every
alert has ``promtool test rules`` unit tests with series that fire it and series that
must not. The committed files under ``charts/clipline`` must equal what the generator
produces, so renaming a metric in ``clipline_core.constants`` breaks the build.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploylib import ROOT, promtool

from clipline import dashboards
from clipline_core.constants import Metric

METRIC_NAMES = {v for k, v in vars(Metric).items() if k.isupper()}
OTHER_SERIES = {"up", dashboards.KSM_DEPLOYMENT_REPLICAS, dashboards.KSM_DEPLOYMENT_LABELS}
PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "by", "on", "and", "or", "unless", "rate",
    "increase", "deriv", "histogram_quantile", "label_replace", "group_left",
    "max_over_time", "namespace", "node", "le", "priority", "stage", "status", "code",
    "model", "backend", "direction", "reason", "component", "deployment",
}  # fmt: skip


def _series_names(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers followed by ``{`` or ``[``/``)``)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{)", without_strings))


def _all_expressions() -> list[tuple[str, str]]:
    return [*dashboards.all_dashboard_expressions(), *dashboards.alert_expressions()]


def test_committed_files_are_generated() -> None:
    stale = dashboards.stale_files()
    assert stale == [], "run: python -m clipline.dashboards --write"


def test_renaming_a_metric_breaks_the_check() -> None:
    code = (
        "import sys; from clipline_core.constants import Metric;"
        "Metric.GPU_UTILIZATION_RATIO = 'clipline_gpu_util';"
        "from clipline import dashboards; sys.exit(dashboards.main(['--check']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stale: charts/clipline/dashboards/clipline-overview.json" in proc.stderr
    assert "clipline.rules.yaml" in proc.stderr


def test_expressions_only_use_known_series() -> None:
    used: set[str] = set()
    for name, expr in _all_expressions():
        for series in _series_names(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", series)
            assert series in METRIC_NAMES | OTHER_SERIES or base in METRIC_NAMES, (name, series)
            used.add(base if base in METRIC_NAMES else series)
    # Every exported metric has a panel or an alert.
    assert METRIC_NAMES - used == set()


def test_issue_panels_are_present() -> None:
    titles = {p.title for p in dashboards.main_panels()}
    assert titles >= {
        "GPU utilization per node",
        "Device busy ratio per node",
        "Jobs per minute",
        "Items processed per second",
        "Stage latency p50 / p95",
        "Queue depth per priority class",
        "Shared-memory slots in use",
        "Workers desired vs actual per node",
        "Batch size",
        "Failures by error code",
    }


def test_dashboard_json_is_well_formed() -> None:
    for dashboard in dashboards.DASHBOARDS:
        model = dashboards.dashboard_json(dashboard)
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for panel in model["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{panel['title']} overlaps"
                    cells.add((x, y))
            for target in panel.get("targets", []):
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert target["expr"] and target["refId"]
        variables = {v["name"] for v in model["templating"]["list"]}
        assert variables == {"datasource", "namespace", "node"}
    overview = dashboards.dashboard_json(dashboards.OVERVIEW)
    (decisions,) = [a for a in overview["annotations"]["list"] if "expr" in a]
    workers = [p["id"] for p in overview["panels"] if p["title"].startswith("Workers desired")]
    assert decisions["filter"]["ids"] == workers


def test_instantiate_replaces_every_variable() -> None:
    expr = dashboards.sel(Metric.DEVICE_BUSY_RATIO, node=True)
    assert dashboards.instantiate(expr) == (
        'clipline_device_busy_ratio{namespace=~".*",node=~".*"}'
    )
    with pytest.raises(ValueError, match=r"\$pod"):
        dashboards.instantiate('up{pod="$pod"}')


def test_gpu_alert_threshold_is_below_the_default_target() -> None:
    from clipline_operator import crd

    target = crd.with_defaults({})["autoscaling"]["targetGpuUtilization"]
    assert target > dashboards.GPU_TARGET_RATIO


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd, check=False)


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    exprs = [(n, dashboards.instantiate(e)) for n, e in _all_expressions()]
    rules = [{"record": f"clipline:check:{i}", "expr": e} for i, (_, e) in enumerate(exprs)]
    (tmp_path / "exprs.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "c", "rules": rules}]})
    )
    proc = _promtool("check", "rules", "exprs.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout
    # promtool really parses: a broken expression fails.
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump(
            {"groups": [{"name": "c", "rules": [{"record": "x:y", "expr": "sum by (("}]}]}
        )
    )
    assert _promtool("check", "rules", "bad.yaml", cwd=tmp_path).returncode != 0


def test_committed_rule_file_passes_promtool() -> None:
    proc = _promtool("check", "rules", str(dashboards.RULES_FILE), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# promtool unit tests of the alerts.
# ---------------------------------------------------------------------------
NS = {"namespace": "video"}


@dataclass
class AlertCase:
    """Input series, and the alerts (labels, $value renderings) expected at ``at``."""

    alert: str
    series: dict[str, str]
    at: str
    fires: list[tuple[dict[str, str], dict[str, str]]] = field(default_factory=list)
    quiet_at: str | None = None  # an earlier time at which nothing fires yet


def _s(metric: str, **labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in {**NS, **labels}.items())
    return f"{metric}{{{inner}}}"


def _calm(metric: str, **labels: str) -> str:
    return _s(metric, **labels).replace('namespace="video"', 'namespace="calm"')


CASES = [
    AlertCase(
        "ClipLineGpuUnderTargetWithBacklog",
        {
            _s(Metric.GPU_UTILIZATION_RATIO, node="gpu-1"): "0.3x40",
            _s(Metric.GPU_UTILIZATION_RATIO, node="gpu-2"): "0.97x40",
            _s(Metric.QUEUE_DEPTH, priority="normal"): "10+5x40",
            _calm(Metric.GPU_UTILIZATION_RATIO, node="gpu-9"): "0.3x40",
            _calm(Metric.QUEUE_DEPTH, priority="normal"): "300-5x40",
        },
        "25m",
        [({**NS, "node": "gpu-1", "severity": "warning"}, {"humanizePercentage": "30%"})],
        quiet_at="8m",
    ),
    AlertCase(
        "ClipLineQueueGrowing",
        {
            _s(Metric.QUEUE_DEPTH, priority="low"): "0+2x60",
            _s(Metric.QUEUE_DEPTH, priority="high"): "50x60",
        },
        "40m",
        [({**NS, "priority": "low", "severity": "warning"}, {"raw": "80"})],
        quiet_at="10m",
    ),
    AlertCase(
        "ClipLineJobFailureRateHigh",
        {
            _s(Metric.JOBS_TOTAL, status="succeeded", code=""): "0+10x60",
            _s(Metric.JOBS_TOTAL, status="failed", code="fetch_failed"): "0+2x60",
            _calm(Metric.JOBS_TOTAL, status="succeeded", code=""): "0+10x60",
            _calm(Metric.JOBS_TOTAL, status="failed", code="fetch_failed"): "0+0x60",
        },
        "30m",
        [({**NS, "severity": "critical"}, {"humanizePercentage": "16.67%"})],
        quiet_at="5m",
    ),
    AlertCase(
        "ClipLineGpuDaemonDown",
        {
            _s("up", component="gpu-daemon", pod="gpu-a", instance="10.0.0.1:9400"): "1x5 0x30",
            _s("up", component="gpu-daemon", pod="gpu-b", instance="10.0.0.2:9400"): "1x35",
            _s("up", component="workers", pod="w-a", instance="10.0.0.3:9401"): "0x35",
        },
        "20m",
        [
            (
                {
                    **NS,
                    "component": "gpu-daemon",
                    "pod": "gpu-a",
                    "instance": "10.0.0.1:9400",
                    "severity": "critical",
                },
                {},
            )
        ],
        quiet_at="8m",
    ),
    AlertCase(
        "ClipLineSharedMemoryExhausted",
        {
            _s(Metric.SHM_SLOTS_IN_USE, node="gpu-1", pod="daemon"): "31x30",
            _s(Metric.SHM_SLOTS_IN_USE, node="gpu-1", pod="worker"): "0x30",
            _s(Metric.SHM_SLOTS_TOTAL, node="gpu-1", pod="daemon"): "32x30",
            _s(Metric.SHM_SLOTS_TOTAL, node="gpu-1", pod="worker"): "0x30",
            _s(Metric.SHM_SLOTS_IN_USE, node="gpu-2", pod="daemon"): "8x30",
            _s(Metric.SHM_SLOTS_TOTAL, node="gpu-2", pod="daemon"): "32x30",
        },
        "10m",
        [({**NS, "node": "gpu-1", "severity": "warning"}, {"humanizePercentage": "96.88%"})],
        quiet_at="3m",
    ),
    AlertCase(
        "ClipLineSharedMemoryReserveStalls",
        {
            _s(f"{Metric.SHM_RESERVE_WAIT_SECONDS}_sum", node="gpu-1"): "0+120x30",
            _s(f"{Metric.SHM_RESERVE_WAIT_SECONDS}_count", node="gpu-1"): "0+60x30",
            _s(f"{Metric.SHM_RESERVE_WAIT_SECONDS}_sum", node="gpu-2"): "0+6x30",
            _s(f"{Metric.SHM_RESERVE_WAIT_SECONDS}_count", node="gpu-2"): "0+60x30",
        },
        "20m",
        [({**NS, "node": "gpu-1", "severity": "warning"}, {"humanizeDuration": "2s"})],
        quiet_at="8m",
    ),
    AlertCase(
        "ClipLineOperatorDown",
        {
            _s("up", component="operator", instance="10.0.1.1:9402"): "0x30",
            _s("up", component="api", instance="10.0.1.2:8080"): "0x30",
        },
        "15m",
        [
            (
                {
                    **NS,
                    "component": "operator",
                    "instance": "10.0.1.1:9402",
                    "severity": "critical",
                },
                {},
            )
        ],
        quiet_at="5m",
    ),
    AlertCase(
        "ClipLineOperatorNotReconciling",
        {
            _s("up", component="operator", instance="a:9402"): "1x45",
            _s(Metric.AUTOSCALER_DESIRED_WORKERS, node="gpu-1"): "2x45",
            _s(
                Metric.AUTOSCALER_DECISIONS_TOTAL, direction="hold", reason="AtTarget"
            ): "0+2x10 20x35",
            _calm("up", component="operator", instance="b:9402"): "1x45",
            _calm(Metric.AUTOSCALER_DESIRED_WORKERS, node="gpu-9"): "2x45",
            _calm(Metric.AUTOSCALER_DECISIONS_TOTAL, direction="hold", reason="AtTarget"): "0+2x45",
        },
        "35m",
        [({**NS, "severity": "critical"}, {})],
        quiet_at="20m",
    ),
]


def _render_annotation(text: str, labels: dict[str, str], values: dict[str, str]) -> str:
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)
    text = re.sub(r"\{\{ \$value \| (\w+) \}\}", lambda m: values[m.group(1)], text)
    return re.sub(r"\{\{ \$value \}\}", lambda m: values["raw"], text)


def test_every_alert_has_a_unit_test() -> None:
    assert sorted(c.alert for c in CASES) == sorted(a.name for a in dashboards.ALERTS)


@pytest.fixture(scope="module")
def unit_test_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    alerts = {a.name: a for a in dashboards.ALERTS}
    tests: list[dict[str, Any]] = []
    for case in CASES:
        alert = alerts[case.alert]
        checks: list[dict[str, Any]] = [
            {
                "eval_time": case.at,
                "alertname": case.alert,
                "exp_alerts": [
                    {
                        "exp_labels": labels,
                        "exp_annotations": {
                            k: _render_annotation(v, labels, values)
                            for k, v in alert.rule()["annotations"].items()
                        },
                    }
                    for labels, values in case.fires
                ],
            }
        ]
        if case.quiet_at:
            checks.append({"eval_time": case.quiet_at, "alertname": case.alert, "exp_alerts": []})
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
                "alert_rule_test": checks,
            }
        )
    path = tmp_path_factory.mktemp("promtool") / "alerts_test.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(dashboards.RULES_FILE)],
                "evaluation_interval": "1m",
                "tests": tests,
            },
            sort_keys=False,
        )
    )
    return path


def test_alert_rules_pass_promtool_unit_tests(unit_test_file: Path) -> None:
    proc = _promtool("test", "rules", unit_test_file.name, cwd=unit_test_file.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_unit_tests_can_fail(unit_test_file: Path) -> None:
    """A wrong expectation (another node) makes promtool fail: the tests have teeth."""
    doc = yaml.safe_load(unit_test_file.read_text())
    doc["tests"][0]["alert_rule_test"][0]["exp_alerts"][0]["exp_labels"]["node"] = "gpu-2"
    broken = unit_test_file.with_name("broken_test.yaml")
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = _promtool("test", "rules", broken.name, cwd=broken.parent)
    assert proc.returncode != 0


def test_generator_cli(capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "clipline.dashboards", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert dashboards.main(["--print-exprs"]) == 0
    listing = capsys.readouterr().out
    assert Metric.GPU_UTILIZATION_RATIO in listing
    assert listing.count("\n    ") == len(_all_expressions())
