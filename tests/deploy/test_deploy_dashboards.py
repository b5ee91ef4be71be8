"""Dashboards, recording and alert rules generated from the metric-name constants.

Every PromQL expression is parsed by ``promtool`` (Debian's prometheus package); the rule
file's unit tests ship with the chart (``charts/clipline/rules/tests/*.yaml``) and run
here with ``promtool test rules``; every alert links to its section of
``docs/runbook.md``. The committed files under ``charts/clipline`` must equal what the
generator produces, so renaming a metric in ``clipline_core.constants`` breaks the build.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploylib import ROOT

from clipline import dashboards
from clipline_core.constants import Metric

METRIC_NAMES = {v for k, v in vars(Metric).items() if k.isupper()}
RECORDED = {r.record for r in dashboards.RECORDINGS}
OTHER_SERIES = {
    "up",
    dashboards.KSM_DEPLOYMENT_REPLICAS,
    dashboards.KSM_DEPLOYMENT_LABELS,
    *dashboards.DCGM_SERIES,
}
RUNBOOK = ROOT / "docs" / "runbook.md"


def _series_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers followed by ``{``, and the
    recorded series (selected bare)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{)", without_strings))
    return names | {r for r in RECORDED if re.search(rf"(?<![\w:]){re.escape(r)}\b", expr)}


def _all_expressions() -> list[tuple[str, str]]:
    return [
        *dashboards.all_dashboard_expressions(),
        *dashboards.recording_expressions(),
        *dashboards.alert_expressions(),
    ]


def _promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        reason = "promtool is not installed (Debian package prometheus): rule checks skipped"
        print(reason)
        pytest.skip(reason)
    return path


def _run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_committed_files_are_generated() -> None:
    stale = dashboards.stale_files()
    assert stale == [], "run: python -m clipline.dashboards --write"


def test_renaming_a_metric_breaks_the_check() -> None:
    code = (
        "import sys; from clipline_core.constants import Metric;"
        "Metric.DEVICE_BUSY_RATIO = 'clipline_device_busy';"
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
            known = METRIC_NAMES | OTHER_SERIES | RECORDED
            assert series in known or base in METRIC_NAMES, (name, series)
            used.add(base if base in METRIC_NAMES else series)
    # Every exported metric has a panel or an alert, every recorded SLI is used by an
    # alert, and every DCGM series the issue asks for has a panel.
    assert METRIC_NAMES - used == set()
    alert_series = {s for _, e in dashboards.alert_expressions() for s in _series_names(e)}
    assert RECORDED - {dashboards.REC_GPU_UTILIZATION} <= alert_series
    assert set(dashboards.DCGM_SERIES) <= used


def test_the_operator_sees_the_overview_row_first() -> None:
    overview = dashboards.OVERVIEW.rows[0]
    assert [p.title for p in overview.panels] == [
        "GPU busy",
        "Jobs / min",
        "p95 job latency",
        "Error rate",
        "Backlog",
        "Targets down",
    ]
    assert all(p.kind == "stat" and p.thresholds and p.main for p in overview.panels)
    assert sum(p.width for p in overview.panels) == 24
    busy = overview.panels[0]
    # The target line: green from the autoscaling target, red below the alert threshold.
    assert busy.thresholds == (
        (None, "red"),
        (dashboards.GPU_ALERT_RATIO, "orange"),
        (dashboards.GPU_TARGET_RATIO, "green"),
    )
    titles = {p.title for p in dashboards.main_panels()}
    assert titles >= {
        "Device busy per GPU",
        "Jobs per minute",
        "Job latency",
        "Inference time per batch",
        "Items processed per second",
        "Stage latency p50 / p95",
        "Backlog per priority class",
        "Shared-memory slots in use",
        "Workers desired vs actual per node",
        "Batch size",
        "Failures by error code",
    }
    heatmaps = [p for d in dashboards.DASHBOARDS for p in d.panels() if p.kind == "heatmap"]
    assert {p.title for p in heatmaps} == {"Job latency", "Inference time per batch"}
    assert all(q.format == "heatmap" and "_bucket" in q.expr for p in heatmaps for q in p.queries)


def test_gpu_panels_cover_nvml_and_dcgm() -> None:
    exprs = {p.title: " ".join(q.expr for q in p.queries) for p in dashboards.OVERVIEW.panels()}
    for series in dashboards.DCGM_SERIES:
        (title,) = [t for t, e in exprs.items() if series in e]
        assert "(DCGM)" in title
        # DCGM's Hostname becomes `node`, filtered by $node.
        assert f'{dashboards.DCGM_HOSTNAME}=~"$node"' in exprs[title]
    assert Metric.GPU_UTILIZATION_RATIO in exprs["GPU utilization per GPU (NVML)"]
    assert "by (node, gpu)" in exprs["Device busy per GPU"]


def test_dashboard_json_is_well_formed() -> None:
    for dashboard in dashboards.DASHBOARDS:
        model = dashboards.dashboard_json(dashboard)
        assert model["schemaVersion"] >= 39
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
            refs = [t["refId"] for t in panel.get("targets", [])]
            assert len(refs) == len(set(refs)) and all(refs)
            for target in panel.get("targets", []):
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert target["expr"]
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert set(variables) == {"datasource", "namespace", "node", "gpu"}
        # $node and $gpu come from the daemon and worker targets, which every node has
        # (NVML's series are absent on CPU nodes and MIG slices).
        for name in ("node", "gpu"):
            query = variables[name]["query"]["query"]
            assert query.startswith("label_values(up{") and query.endswith(f", {name})")
            assert Metric.GPU_UTILIZATION_RATIO not in query
            assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        # Links: every clipline dashboard (by tag, keeping time and variables), the runbook.
        (tagged,) = [link for link in model["links"] if link["type"] == "dashboards"]
        assert tagged["tags"] == ["clipline"] and tagged["keepTime"] and tagged["includeVars"]
        assert dashboard.uid != "" and "clipline" in model["tags"]
        assert any(link.get("url") == dashboards.RUNBOOK_URL for link in model["links"])
    overview = dashboards.dashboard_json(dashboards.OVERVIEW)
    (decisions,) = [a for a in overview["annotations"]["list"] if "expr" in a]
    annotated = [
        p["id"]
        for p in overview["panels"]
        if p["title"]
        in (
            "Workers desired vs actual per node",
            "Device busy per GPU",
            "Backlog per priority class",
        )
    ]
    assert sorted(decisions["filter"]["ids"]) == sorted(annotated)
    assert 'direction=~"up|down"' in decisions["expr"]  # holds are not annotations
    stats = [p for p in overview["panels"] if p["type"] == "stat"]
    assert len(stats) == 6
    for stat in stats:
        steps = stat["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[0]["value"] is None and all(s["color"] for s in steps)
    (busy,) = [p for p in overview["panels"] if p["title"] == "Device busy per GPU"]
    assert busy["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "dashed"
    (heat,) = [p for p in overview["panels"] if p["title"] == "Job latency"]
    assert heat["type"] == "heatmap" and heat["options"]["calculate"] is False
    assert heat["targets"][0]["format"] == "heatmap"


def test_shipped_dashboard_files_round_trip_through_the_sdk() -> None:
    """The committed JSON is a dashboard grafana-foundation-sdk's model reads back."""
    from grafana_foundation_sdk.models.dashboard import Dashboard

    for path in sorted(dashboards.DASHBOARD_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        model = Dashboard.from_json(data)
        assert model.uid == path.stem and model.schema_version == data["schemaVersion"]


def test_instantiate_replaces_every_variable() -> None:
    expr = dashboards.sel(Metric.DEVICE_BUSY_RATIO, node=True, gpu=True)
    assert dashboards.instantiate(expr) == (
        'clipline_device_busy_ratio{namespace=~".*",node=~".*",gpu=~".*"}'
    )
    with pytest.raises(ValueError, match=r"\$pod"):
        dashboards.instantiate('up{pod="$pod"}')


def test_gpu_thresholds_match_the_default_target() -> None:
    from clipline_operator import crd

    target = crd.with_defaults({})["autoscaling"]["targetGpuUtilization"]
    assert target == dashboards.GPU_TARGET_RATIO
    assert target > dashboards.GPU_ALERT_RATIO


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    exprs = [(n, dashboards.instantiate(e)) for n, e in _all_expressions()]
    rules = [{"record": f"clipline:check:{i}", "expr": e} for i, (_, e) in enumerate(exprs)]
    (tmp_path / "exprs.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "c", "rules": rules}]})
    )
    proc = _run_promtool("check", "rules", "exprs.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout
    # promtool really parses: a broken expression fails.
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump(
            {"groups": [{"name": "c", "rules": [{"record": "x:y", "expr": "sum by (("}]}]}
        )
    )
    assert _run_promtool("check", "rules", "bad.yaml", cwd=tmp_path).returncode != 0


def test_committed_rule_file_passes_promtool() -> None:
    proc = _run_promtool("check", "rules", str(dashboards.RULES_FILE), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    total = len(dashboards.RECORDINGS) + len(dashboards.ALERTS)
    assert f"SUCCESS: {total} rules found" in proc.stdout


# ---------------------------------------------------------------------------
# Runbook.
# ---------------------------------------------------------------------------
def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_to_its_runbook_section() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    anchors = {_github_anchor(h) for h in re.findall(r"^#{2,3} (.+)$", text, re.M)}
    for alert in dashboards.ALERTS:
        url = alert.rule()["annotations"]["runbook_url"]
        base, anchor = url.split("#")
        assert base == dashboards.RUNBOOK_URL and base.endswith("docs/runbook.md")
        assert anchor in anchors, f"docs/runbook.md has no section for {alert.name}"
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    for section in sections:
        name = section.split("\n", 1)[0]
        for part in ("**Meaning.**", "**Check.**", "**Act.**"):
            assert part in section, f"{name}: no {part}"
    # Links between sections resolve.
    for target in re.findall(r"\]\(#([\w-]+)\)", text):
        assert target in anchors, target
    # No stale section: every one is an alert.
    assert {s.split("\n", 1)[0] for s in sections} == {a.name for a in dashboards.ALERTS}


# ---------------------------------------------------------------------------
# promtool unit tests shipped with the chart.
# ---------------------------------------------------------------------------
def _rule_test_files() -> list[Path]:
    files = sorted(dashboards.RULE_TESTS_DIR.glob("*.yaml"))
    assert files, f"no rule tests under {dashboards.RULE_TESTS_DIR}"
    return files


def _rule_tests() -> list[dict[str, Any]]:
    out = []
    for path in _rule_test_files():
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../clipline.rules.yaml"], path
        # promtool evaluates groups in random order unless told: recording rules first.
        groups = [g["name"] for g in yaml.safe_load(dashboards.RULES_FILE.read_text())["groups"]]
        assert doc.get("group_eval_order") == groups, path
        out.extend(doc["tests"])
    return out


def test_shipped_rule_tests_pass_promtool() -> None:
    files = [str(p.relative_to(ROOT)) for p in _rule_test_files()]
    proc = _run_promtool("test", "rules", *files, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(files), proc.stdout


def test_every_rule_has_shipped_tests() -> None:
    """Each alert has a case where it fires and one where it stays quiet; each recording
    rule has an expression test."""
    fires: set[str] = set()
    quiet: set[str] = set()
    recorded: set[str] = set()
    for test in _rule_tests():
        for check in test.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
            for alert in check["exp_alerts"]:
                name = check["alertname"]
                (rule,) = [a for a in dashboards.ALERTS if a.name == name]
                assert alert["exp_annotations"]["runbook_url"] == rule.runbook_url
        for check in test.get("promql_expr_test", []):
            recorded.add(check["expr"])
    names = {a.name for a in dashboards.ALERTS}
    assert fires == names, names ^ fires
    assert quiet == names, names ^ quiet
    assert recorded == RECORDED


def test_shipped_rule_tests_can_fail(tmp_path: Path) -> None:
    """A wrong expectation (another node) or a rule that no longer fires fails promtool:
    the shipped tests have teeth."""
    rules = tmp_path / "rules"
    shutil.copytree(dashboards.RULES_FILE.parent, rules)
    jobs = rules / "tests" / "jobs_test.yaml"
    doc = yaml.safe_load(jobs.read_text())
    doc["tests"][0]["alert_rule_test"][0]["exp_alerts"][0]["exp_labels"]["node"] = "gpu-2"
    jobs.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = _run_promtool("test", "rules", "tests/jobs_test.yaml", cwd=rules)
    assert proc.returncode != 0 and "gpu-2" in proc.stdout + proc.stderr
    # The rule file itself with a threshold no test series reaches.
    shutil.copytree(dashboards.RULES_FILE.parent, tmp_path / "again")
    rule_file = tmp_path / "again" / dashboards.RULES_FILE.name
    text = rule_file.read_text()
    assert f"> {dashboards.FAILURE_RATIO}" in text
    rule_file.write_text(text.replace(f"> {dashboards.FAILURE_RATIO}", "> 0.5"))
    proc = _run_promtool("test", "rules", "tests/jobs_test.yaml", cwd=tmp_path / "again")
    assert proc.returncode != 0 and "ClipLineJobFailureRateHigh" in proc.stdout + proc.stderr


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
    assert Metric.DEVICE_BUSY_RATIO in listing
    assert listing.count("\n    ") == len(_all_expressions())
