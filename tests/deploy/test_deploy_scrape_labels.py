"""The chart's PodMonitor/ServiceMonitors give series the labels the operator's queries
and the per-node panels group by, checked with a real Prometheus.

The rendered monitors are translated into a Prometheus scrape configuration the way the
Prometheus Operator does (its standard ``namespace``/``pod``/``container``/``job``/
``endpoint`` relabelings, then the monitor's own ``relabelings``, its ``honorLabels``).
No Kubernetes API server runs here, so Kubernetes service discovery is replaced by
static targets carrying the ``__meta_kubernetes_*`` labels it would attach: the pod
labels come from the chart's Deployments and from the operator's real builders, the node
names are made up (GPU daemon and workers on ``gpu-node-a``, API and operator on
``cpu-node-b``). Each target is a small process exposing that clipline process's real
metric objects (``scrape_exporter.py``). Debian's ``prometheus`` binary scrapes them; the
operator's own query code (:mod:`clipline_operator.prom`) then reads it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploylib import NAMESPACE, by_kind, labels_match, objects, render

from clipline import dashboards
from clipline_core import constants
from clipline_core.constants import Metric

pytestmark = pytest.mark.slow

GPU_NODE = "gpu-node-a"
CPU_NODE = "cpu-node-b"
NODE = constants.LABEL_NODE_METRIC
EXPORTER = Path(__file__).with_name("scrape_exporter.py")
VALUES = {"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}}
#: monitor relabeling keys (Prometheus Operator API) -> Prometheus relabel_config keys
RELABEL_KEYS = {
    "sourceLabels": "source_labels",
    "targetLabel": "target_label",
    "regex": "regex",
    "replacement": "replacement",
    "action": "action",
    "separator": "separator",
    "modulus": "modulus",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _meta_label(label: str) -> str:
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^A-Za-z0-9_]", "_", label)


def _relabelings(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for rule in raw:
        unknown = set(rule) - set(RELABEL_KEYS)
        assert not unknown, f"relabeling keys this test does not translate: {unknown}"
        converted = {RELABEL_KEYS[k]: v for k, v in rule.items()}
        if "action" in converted:
            converted["action"] = str(converted["action"]).lower()
        out.append(converted)
    return out


def _standard(job: str, port: str, *, service: bool) -> list[dict[str, Any]]:
    """The relabelings the Prometheus Operator puts before a monitor's own."""
    rules: list[dict[str, Any]] = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "endpoint", "replacement": port},
    ]
    if service:
        rules.append(
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"}
        )
        rules.append({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"})
    else:
        rules.append({"target_label": "job", "replacement": job})
    return rules


def _target(
    port: int, pod: str, container: str, node: str, labels: dict[str, str], service: str = ""
) -> dict[str, Any]:
    meta = {
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_container_name": container,
        "__meta_kubernetes_pod_node_name": node,
        **{_meta_label(k): v for k, v in labels.items()},
    }
    if service:
        meta["__meta_kubernetes_service_name"] = service
    return {"targets": [f"127.0.0.1:{port}"], "labels": meta}


def _operator_pods(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GPU daemon and worker Deployments the real operator builds for a node's GPU 0."""
    from clipline_operator import builders

    (pipeline,) = [copy.deepcopy(o) for o in objs if o["kind"] == constants.CRD_KIND]
    pipeline["metadata"]["uid"] = "uid-1"
    model = builders.Pipeline.from_body(pipeline)
    return [
        builders.build_daemon_deployment(model, GPU_NODE, 0),
        builders.build_worker_deployment(model, GPU_NODE, 0, 1),
    ]


def scrape_config(objs: list[dict[str, Any]], ports: dict[str, int]) -> dict[str, Any]:
    """A Prometheus configuration equivalent to the rendered monitors, static targets."""
    jobs: list[dict[str, Any]] = []
    (pod_monitor,) = by_kind(objs, "PodMonitor")
    for index, endpoint in enumerate(pod_monitor["spec"]["podMetricsEndpoints"]):
        targets = []
        for obj in _operator_pods(objs):
            template = obj["spec"]["template"]
            labels = template["metadata"]["labels"]
            if not labels_match(pod_monitor["spec"]["selector"], labels):
                continue
            component = labels[constants.LABEL_COMPONENT]
            container = template["spec"]["containers"][0]["name"]
            name = f"{obj['metadata']['name']}-0"
            targets.append(_target(ports[component], name, container, GPU_NODE, labels))
        assert len(targets) == 2
        name = pod_monitor["metadata"]["name"]
        jobs.append(
            {
                "job_name": f"podMonitor/{NAMESPACE}/{name}/{index}",
                "honor_labels": bool(endpoint.get("honorLabels", False)),
                "metrics_path": endpoint.get("path", "/metrics"),
                "static_configs": targets,
                "relabel_configs": _standard(f"{NAMESPACE}/{name}", endpoint["port"], service=False)
                + _relabelings(endpoint.get("relabelings", [])),
            }
        )
    templates = [(d, d["spec"]["template"]) for d in by_kind(objs, "Deployment")]
    for monitor in by_kind(objs, "ServiceMonitor"):
        (svc,) = [
            s
            for s in by_kind(objs, "Service")
            if labels_match(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        selector = {"matchLabels": svc["spec"]["selector"]}
        (owner,) = [d for d, t in templates if labels_match(selector, t["metadata"]["labels"])]
        template = owner["spec"]["template"]
        component = template["metadata"]["labels"][constants.LABEL_COMPONENT]
        for index, endpoint in enumerate(monitor["spec"]["endpoints"]):
            target = _target(
                ports[component],
                f"{owner['metadata']['name']}-0",
                template["spec"]["containers"][0]["name"],
                CPU_NODE,
                template["metadata"]["labels"],
                svc["metadata"]["name"],
            )
            jobs.append(
                {
                    "job_name": f"serviceMonitor/{NAMESPACE}/{monitor['metadata']['name']}/{index}",
                    "honor_labels": bool(endpoint.get("honorLabels", False)),
                    "metrics_path": endpoint.get("path", "/metrics"),
                    "static_configs": [target],
                    "relabel_configs": _standard("", endpoint["port"], service=True)
                    + _relabelings(endpoint.get("relabelings", [])),
                }
            )
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": jobs,
    }


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as rsp:
        payload = json.load(rsp)
    assert payload["status"] == "success", payload
    result: list[dict[str, Any]] = payload["data"]["result"]
    return result


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not shutil.which("prometheus"):
        pytest.skip("Debian's prometheus binary is not installed (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("scrape")
    objs = objects(render(VALUES))
    ports = {c: _free_port() for c in ("gpu-daemon", "workers", "api", "operator", "prometheus")}
    nodes = {"gpu-daemon": GPU_NODE, "workers": GPU_NODE, "api": CPU_NODE, "operator": GPU_NODE}
    config = scrape_config(objs, ports)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for role, node in nodes.items():
            cmd = [sys.executable, str(EXPORTER), role, str(ports[role]), node]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - owned by the child
        procs.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        log.close()
        prom = f"http://127.0.0.1:{ports['prometheus']}"
        targets = sum(
            len(group["targets"])
            for job in config["scrape_configs"]
            for group in job["static_configs"]
        )
        wait_expr = f"rate({Metric.SHM_RESERVE_WAIT_SECONDS}_sum[1m]) > 0"
        deadline = time.monotonic() + 60
        while True:
            try:
                up = _query(prom, "up == 1")
                if len(up) == targets and _query(prom, wait_expr):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log_text = (tmp / "prometheus.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"targets not scraped in time:\n{log_text}")
            for proc in procs:
                assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
            time.sleep(0.5)
        yield {"url": prom, "config": config, "objs": objs}
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _series(prom: str, selector: str) -> list[dict[str, str]]:
    return [item["metric"] for item in _query(prom, selector)]


def test_daemon_and_worker_series_carry_their_node(prometheus: dict[str, Any]) -> None:
    prom = prometheus["url"]
    series = _series(prom, f'{{component=~"gpu-daemon|workers",namespace="{NAMESPACE}"}}')
    names = {s["__name__"] for s in series}
    # The daemon's own `node` label and the relabeled one, both present.
    assert {Metric.DEVICE_BUSY_RATIO, Metric.SHM_SLOTS_IN_USE, "up"} <= names
    assert {Metric.BACKLOG_JOBS, Metric.SHM_RESERVE_WAIT_SECONDS + "_sum"} <= names
    for labels in series:
        assert labels.get(NODE) == GPU_NODE, labels
        # Which of the node's GPU daemons (and its workers) a series is about.
        assert labels.get(constants.LABEL_GPU_METRIC) == "0", labels
        # honorLabels: the exporter's `node` is kept as is, not renamed exported_node.
        assert "exported_node" not in labels, labels


def test_api_series_carry_the_api_pods_node(prometheus: dict[str, Any]) -> None:
    series = _series(prometheus["url"], f'{Metric.API_REQUESTS_TOTAL}{{component="api"}}')
    assert series
    assert {s[NODE] for s in series} == {CPU_NODE}


def test_operator_series_keep_the_gpu_node_they_are_about(prometheus: dict[str, Any]) -> None:
    prom = prometheus["url"]
    (desired,) = _series(prom, Metric.AUTOSCALER_DESIRED_WORKERS)
    assert desired[NODE] == GPU_NODE and desired["component"] == "operator"
    assert "exported_node" not in desired
    decisions = _series(prom, Metric.AUTOSCALER_DECISIONS_TOTAL)
    assert decisions and all(NODE not in s for s in decisions)
    assert all(NODE not in s for s in _series(prom, 'up{component="operator"}'))


def test_the_operators_queries_see_per_node_values(prometheus: dict[str, Any]) -> None:
    from clipline_operator import prom as operator_prom

    (pipeline,) = by_kind(prometheus["objs"], constants.CRD_KIND)
    spec = pipeline["spec"]["autoscaling"]
    queries = operator_prom.build_queries(
        spec["prometheus"], NAMESPACE, pipeline["metadata"]["name"], spec["windowSeconds"]
    )
    client = operator_prom.PromClient(prometheus["url"])
    seen = asyncio.run(operator_prom.observe(client, queries))
    assert seen.ok, seen.error
    # Keyed by GPU daemon: the pods' clipline.dev/gpu label became the `gpu` label.
    assert seen.utilization == {(GPU_NODE, 0): pytest.approx(0.8)}
    assert set(seen.slot_wait_s) == {(GPU_NODE, 0)}
    assert 0 < seen.slot_wait_s[(GPU_NODE, 0)] < 1
    assert seen.gpu_utilization(GPU_NODE, 0) == pytest.approx(0.8)
    assert seen.queue_depth == 4


def test_per_node_panels_select_the_node(prometheus: dict[str, Any]) -> None:
    expr = f"max by ({NODE}) ({dashboards.sel(Metric.SHM_SLOTS_IN_USE, node=True)})"
    subs = {**dashboards.DEFAULT_SUBSTITUTIONS, dashboards.VAR_NODE: GPU_NODE}
    result = _query(prometheus["url"], dashboards.instantiate(expr, subs))
    assert [(r["metric"], float(r["value"][1])) for r in result] == [({NODE: GPU_NODE}, 3.0)]
    other = {**subs, dashboards.VAR_NODE: CPU_NODE}
    assert _query(prometheus["url"], dashboards.instantiate(expr, other)) == []
