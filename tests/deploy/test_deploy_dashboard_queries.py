"""Every dashboard query returns data from a real Prometheus over a running local stack.

What runs for real: the local stack (``clipline up``: the job API, the GPU daemon on the
CPU device, two Celery workers, the callback worker) under a unique deployment name on
the Redis at 127.0.0.1:6379 (or the stack's embedded Valkey where none runs); Debian's
``prometheus`` binary on a free loopback port, scraping every second and evaluating the
chart's rule file (``charts/clipline/rules/clipline.rules.yaml``); the operator's
reconcile and autoscaling code (``e2e_operator.py``, with its in-memory cluster and
kube-state-metrics stand-in) deciding from that Prometheus. The load: jobs in three
priority classes submitted faster than two workers finish them (a backlog), failures
with three error codes (a file that is not a video, a missing file, a path outside the
allowed directories), a cancelled job and a completion callback.

Prometheus' scrape configuration mirrors the chart's PodMonitor/ServiceMonitors: every
target gets ``namespace`` and ``component``, the GPU daemon's and the workers' ``node``
and ``gpu`` (as the PodMonitor copies them from the pod), the API's ``node``.

Then every query of every dashboard panel and annotation, with the Grafana variables
set to "All", must return data, except the ones listed by name in :data:`NEEDS_GPU`
(NVML and the DCGM exporter: no NVIDIA device here; NVML's are checked when the daemon
exports them) and :data:`NOT_IN_THE_LOCAL_STACK`. Every recording rule records, the
failure-rate alert goes pending and no target-down or absent alert does.

``CLIPLINE_WRITE_PREVIEW=1`` writes the README's picture, ``docs/dashboard-preview.png``,
from this run (:mod:`clipline.preview`); ``CLIPLINE_E2E_EXTRA_JOBS=N`` adds N jobs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from deploylib import ROOT, objects, render
from stacklib import Api, Procs
from stacklib import callback_receiver as _callback_receiver
from stacklib import free_port as _free_port
from stacklib import has_data as _has_data
from stacklib import state as _state
from stacklib import wait_http as _wait_http

from clipline import dashboards, preview, samples
from clipline_core.constants import Metric

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NODE = "e2e-node"
GPU = "0"
NAMESPACE = "e2e"
REDIS_URL = os.environ.get("CLIPLINE_E2E_REDIS_URL", "redis://127.0.0.1:6379/0")
RATE = "15s"
SUBSTITUTIONS = {**dashboards.DEFAULT_SUBSTITUTIONS, dashboards.VAR_RATE: RATE}
EXTRA_JOBS = int(os.environ.get("CLIPLINE_E2E_EXTRA_JOBS", "0"))

#: Queries that need an NVIDIA GPU: NVML's (checked when the daemon exports them) and
#: the DCGM exporter's (never here).
NVML_QUERIES = {"clipline-overview: GPU utilization per GPU (NVML) [{{node}} gpu {{gpu}}]"}
DCGM_QUERIES = {
    f"clipline-overview: {title} [{{{{node}}}} GPU {{{{gpu}}}}]"
    for title in (
        "GPU utilization (DCGM)",
        "GPU memory used (DCGM)",
        "GPU power (DCGM)",
        "SM clock (DCGM)",
    )
}
NEEDS_GPU = NVML_QUERIES | DCGM_QUERIES
#: Every series the dashboards read exists in the local stack (the callback worker serves
#: its own port, recorded in ``stack.json`` and scraped through a file-based target).
NOT_IN_THE_LOCAL_STACK: set[str] = set()
#: Alerts that must not even go pending while everything runs.
TARGET_ALERTS = {a.name for a in dashboards.ALERTS if a.name.endswith(("Down", "Absent"))}


def _prometheus_config(ports: dict[str, int], rules: Path, targets: Path) -> dict[str, Any]:
    def job(name: str, port: int, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "job_name": name,
            "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}],
        }

    ns = {"namespace": NAMESPACE}
    gpu_node = {**ns, "node": NODE, "gpu": GPU}
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            job("gpu-daemon", ports["daemon"], {**gpu_node, "component": "gpu-daemon"}),
            job("workers", ports["worker"], {**gpu_node, "component": "workers"}),
            job("api", ports["api"], {**ns, "component": "api", "node": NODE}),
            job("operator", ports["operator"], {**ns, "component": "operator"}),
            {  # the callback worker's port is the stack's choice: written once it is up
                "job_name": "callbacks",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
            },
            job("kube-state-metrics", ports["ksm"], {}),
        ],
    }


def _pipeline(prom_url: str, deployment: str, tmp: Path) -> Path:
    """The chart's default ClipPipeline, deciding from this Prometheus every second on
    the daemon's busy ratio (there is no NVML utilization on a CPU device)."""
    busy = f"avg by (node, gpu) (avg_over_time({Metric.DEVICE_BUSY_RATIO}{{selector}}[{{window}}]))"
    values = {
        "pipeline": {
            "name": "e2e",
            "autoscaling": {
                "periodSeconds": 1,
                "windowSeconds": 10,
                "scaleUpStabilizationSeconds": 0,
                "scaleDownStabilizationSeconds": 5,
                "prometheus": {"url": prom_url, "utilizationQuery": busy},
            },
        },
        "deploymentName": deployment,
    }
    (pipeline,) = [
        o for o in objects(render(values, namespace=NAMESPACE)) if o["kind"] == "ClipPipeline"
    ]
    path = tmp / "pipeline.json"
    path.write_text(json.dumps(pipeline))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Start everything, run the load, yield what the checks need, stop everything."""
    if not shutil.which("prometheus"):
        reason = "Debian's prometheus binary is not installed (apt-get install prometheus)"
        print(reason)
        pytest.skip(reason)
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        redis_env = {"CLIPLINE_REDIS_URL": REDIS_URL}
    except redis.RedisError as exc:
        print(f"the Redis at {REDIS_URL} is not reachable ({exc}); using the embedded one")
        redis_env = {}
    tmp = tmp_path_factory.mktemp("queries")
    logs = tmp / "logs"
    logs.mkdir()
    ports = {k: _free_port() for k in ("prometheus", "daemon", "worker", "api", "operator", "ksm")}
    prom_url = f"http://127.0.0.1:{ports['prometheus']}"
    deployment = f"dq-{uuid.uuid4().hex[:8]}"
    media_dir = tmp / "media"
    image = samples.make_product_image(media_dir / "product.jpg", seed=3)
    videos = []
    for seed in (1, 2):
        video = media_dir / f"planted-{seed}.avi"
        samples.make_planted_video(video, image, before_s=2, product_s=5, after_s=2, seed=seed)
        videos.append(video)
    bad = media_dir / "not-a-video.mp4"
    bad.write_bytes(b"this is not a video\n" * 100)
    outside = tmp / "outside" / "elsewhere.avi"  # outside the allowed directories
    outside.parent.mkdir()
    shutil.copyfile(videos[0], outside)
    env = {
        **os.environ,
        **redis_env,
        "CLIPLINE_DEPLOYMENT": deployment,
        "CLIPLINE_STATE_DIR": str(tmp / "state"),
        "CLIPLINE_NODE_NAME": NODE,
        "CLIPLINE_DEVICE": "cpu",
        "CLIPLINE_DAEMON_METRICS_PORT": str(ports["daemon"]),
        "CLIPLINE_WORKER_METRICS_PORT": str(ports["worker"]),
        "CLIPLINE_API_PORT": str(ports["api"]),
        "CLIPLINE_CALLBACK_SECRET": "queries-callback-secret",
        "CLIPLINE_ALLOW_LOOPBACK": "1",  # the callback receiver listens on 127.0.0.1
        "CLIPLINE_LOCAL_ROOTS": str(media_dir),
        "CLIPLINE_ARTIFACTS_DIR": str(tmp / "artifacts"),
    }
    procs = Procs(logs)
    clipline = str(BIN / "clipline")
    received: list[str] = []
    receiver = _callback_receiver(received)
    try:
        config = tmp / "prometheus.yml"
        targets = tmp / "callbacks-targets.json"
        targets.write_text("[]")
        config.write_text(yaml.safe_dump(_prometheus_config(ports, dashboards.RULES_FILE, targets)))
        prom = procs.start(
            "prometheus",
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
                "--log.level=warn",
            ],
            env,
        )
        _wait_http(f"{prom_url}/-/ready", "prometheus", prom)
        up = subprocess.run(
            [clipline, "up", "--workers", "2"], env=env, capture_output=True, text=True,
            timeout=180, check=False,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        operator = procs.start(
            "operator",
            [
                sys.executable,
                str(Path(__file__).with_name("e2e_operator.py")),
                "--pipeline", str(_pipeline(prom_url, deployment, tmp)),
                "--prometheus", prom_url,
                "--operator-port", str(ports["operator"]),
                "--ksm-port", str(ports["ksm"]),
                "--node", NODE,
                "--period", "1",
            ],
            env,
        )  # fmt: skip
        _wait_http(f"http://127.0.0.1:{ports['operator']}/metrics", "operator", operator)
        record = json.loads((tmp / "state" / deployment / "stack.json").read_text())
        callbacks_url = record["metrics"]["callbacks"]
        targets.write_text(
            json.dumps(
                [
                    {
                        "targets": [callbacks_url.split("/")[2]],
                        "labels": {"namespace": NAMESPACE, "component": "callbacks"},
                    }
                ]
            )
        )
        api = Api(record["api_url"], record["api_key"])
        time.sleep(3)  # every target scraped at least twice: the first sample is a baseline
        start = time.time()

        # The load: more jobs than two workers finish at once, in three priority classes,
        # three kinds of failure, a cancellation and a callback.
        priorities = ("normal", "low", "high")
        jobs = [api.submit(videos[n % 2], image, priorities[n % 3]) for n in range(6)]
        jobs.append(api.submit(bad, image, "low"))
        jobs.append(api.submit(media_dir / "missing.avi", image, "normal"))
        jobs.append(api.submit(outside, image, "high"))
        callback = f"http://127.0.0.1:{receiver.server_port}/done"
        jobs.append(api.submit(videos[0], image, "normal", callback))
        for n in range(EXTRA_JOBS):
            jobs.append(api.submit(bad if n % 6 == 5 else videos[n % 2], image, priorities[n % 3]))
        cancelled = api.submit(videos[1], image, "low")  # last in the queue: still queued
        api.call("DELETE", f"/v1/jobs/{cancelled}")
        summaries = [api.wait(job, 300) for job in [*jobs, cancelled]]
        # A second wave once every series exists: rates over the run see an increase.
        time.sleep(3)
        wave = [api.submit(v, image, p) for v, p in zip(videos, ("high", "low"), strict=True)]
        wave.append(api.submit(bad, image, "normal"))
        summaries += [api.wait(job, 300) for job in wave]
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(5)  # a few more scrapes and rule evaluations after the last job
        end = time.time()
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['daemon']}/metrics") as rsp:
            daemon_metrics = rsp.read().decode()
        yield {
            "prometheus": prom_url,
            "start": start,
            "end": end,
            "summaries": summaries,
            "cancelled": cancelled,
            "callbacks": received,
            "daemon_metrics": daemon_metrics,
            "logs": logs,
        }
    finally:
        subprocess.run([clipline, "down"], env=env, capture_output=True, timeout=90, check=False)
        procs.stop()
        receiver.shutdown()


def _nvml_exported(run: dict[str, Any]) -> bool:
    prefix = Metric.GPU_UTILIZATION_RATIO + "{"
    return any(line.startswith(prefix) for line in run["daemon_metrics"].splitlines())


def _excused(run: dict[str, Any]) -> set[str]:
    excused = DCGM_QUERIES | NOT_IN_THE_LOCAL_STACK
    return excused if _nvml_exported(run) else excused | NVML_QUERIES


def test_the_load_ran(run: dict[str, Any]) -> None:
    by_state: dict[str | None, int] = {}
    for summary in run["summaries"]:
        by_state[_state(summary)] = by_state.get(_state(summary), 0) + 1
    failed = [s for s in run["summaries"] if _state(s) == "failed"]
    codes = sorted(s["error"]["code"] for s in failed)
    assert {"not_found", "forbidden_source"} <= set(codes), codes
    assert {"not_a_video", "undecodable_video"} & set(codes), codes
    assert by_state.get("cancelled") == 1, by_state
    assert by_state.get("succeeded", 0) >= 8, by_state
    assert run["callbacks"] == ["/done"]


def test_excused_queries_are_dashboard_queries() -> None:
    names = {name for name, _ in dashboards.all_dashboard_expressions()}
    listed = NEEDS_GPU | NOT_IN_THE_LOCAL_STACK
    assert not listed - names, listed - names


def test_every_dashboard_query_returns_data(run: dict[str, Any]) -> None:
    excused = _excused(run)
    missing, skipped = [], []
    for name, expr in dashboards.all_dashboard_expressions():
        if name in excused:
            skipped.append(name)
            continue
        concrete = dashboards.instantiate(expr, SUBSTITUTIONS)
        if not _has_data(run["prometheus"], concrete, run["start"], run["end"]):
            missing.append(f"{name}\n    {concrete}")
    print("not checked here (need a GPU, or not in the local stack):", *skipped, sep="\n  ")
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)
    # The list stays honest: what it excuses really has no data here.
    expressions = dict(dashboards.all_dashboard_expressions())
    stale = [
        name
        for name in skipped
        if _has_data(
            run["prometheus"],
            dashboards.instantiate(expressions[name], SUBSTITUTIONS),
            run["start"],
            run["end"],
        )
    ]
    assert not stale, f"excused but returning data (drop them from the lists): {stale}"


def test_node_and_gpu_variables_select_the_node(run: dict[str, Any]) -> None:
    """The variables' queries (on ``up``, not NVML) list the node and its GPU, and a
    per-GPU panel filtered to another node is empty."""
    model = dashboards.dashboard_json(dashboards.OVERVIEW)
    variables = {v["name"]: v for v in model["templating"]["list"]}
    for name, want in (("node", NODE), ("gpu", GPU)):
        query = dashboards.instantiate(
            variables[name]["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0]
        )
        params = urllib.parse.urlencode(
            {"match[]": query, "start": run["start"], "end": run["end"]}
        )
        url = f"{run['prometheus']}/api/v1/label/{name}/values?{params}"
        with urllib.request.urlopen(url) as rsp:
            assert json.load(rsp)["data"] == [want]
    (busy,) = [p for p in dashboards.OVERVIEW.panels() if p.title == "Device busy per GPU"]
    expr = busy.queries[0].expr
    ours = dashboards.instantiate(expr, {**SUBSTITUTIONS, "$node": NODE, "$gpu": GPU})
    other = dashboards.instantiate(expr, {**SUBSTITUTIONS, "$node": "other-node"})
    assert _has_data(run["prometheus"], ours, run["start"], run["end"])
    assert not _has_data(run["prometheus"], other, run["start"], run["end"])


def test_recording_rules_record(run: dict[str, Any]) -> None:
    nvml = _nvml_exported(run)
    missing = [
        r.record
        for r in dashboards.RECORDINGS
        if (nvml or r.record != dashboards.REC_GPU_UTILIZATION)
        and not _has_data(run["prometheus"], r.record, run["start"], run["end"])
    ]
    assert not missing, missing
    # The SLI is what the failures make it: 5 of the first wave's 10 finished jobs failed
    # at most (4 failures, 6 + 1 successes before the second wave).
    ratio = preview.query_range(
        run["prometheus"], dashboards.REC_JOB_SUCCESS, run["start"], run["end"], 1.0
    )
    values = [v for _, points in ratio for _, v in points if math.isfinite(v)]
    assert values and 0 < min(values) < 1


def test_alerts_pending_during_the_run(run: dict[str, Any]) -> None:
    series = preview.query_range(
        run["prometheus"], 'ALERTS{alertstate=~"pending|firing"}', run["start"], run["end"], 1.0
    )
    active = {labels["alertname"] for labels, points in series if points}
    print("alerts pending during the run:", sorted(active))
    assert "ClipLineJobFailureRateHigh" in active
    assert not active & TARGET_ALERTS, active & TARGET_ALERTS


def test_preview_png_from_the_run(run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    nvml = _nvml_exported(run)
    counts = preview.render_preview(
        run["prometheus"],
        run["start"],
        run["end"],
        out,
        step=1.0,
        substitutions=SUBSTITUTIONS,
        subtitle="real Prometheus data: a local run (clipline up, "
        + f"{len(run['summaries'])} jobs, "
        + ("GPU" if nvml else "CPU device, no NVML")
        + f", $__rate_interval={RATE})",
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 40_000
    assert not [title for title, n in counts.items() if n == 0], counts
    stats = [p.title for p in dashboards.OVERVIEW.rows[0].panels]
    assert set(stats) <= set(counts)
    if os.environ.get("CLIPLINE_WRITE_PREVIEW") == "1":
        target = ROOT / "docs" / "dashboard-preview.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(out, target)
