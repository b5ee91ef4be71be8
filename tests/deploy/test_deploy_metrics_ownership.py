"""Every metric is exported by exactly the process that owns it, in a real local stack.

One ``clipline up`` for the module (the job API, the GPU daemon on the CPU device, one
Celery worker and the callback worker, as the user starts them) on the real Redis under
a unique deployment. Three jobs go through the API: one succeeds and calls back to a
receiver in this test, one fails (not a video), one is cancelled. Then every process is
scraped at the URL ``clipline status`` shows for it, and:

* each process exports exactly the metric families its role owns
  (:data:`clipline_core.metrics.OWNERS`), plus ``clipline_build_info`` with its role and
  the ``process_*``/``python_*`` families: no family appears in two roles;
* the series carry the values of what happened (job outcomes and latency from the API,
  frames from the worker, arena slots from the daemon, deliveries from the callback
  worker), and no label value is empty;
* ``promtool check metrics`` passes on every scrape;
* the daemon, worker and callback worker servers listen on 127.0.0.1 only, and answer
  their probes.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipline.client import Client
from clipline_core import metrics
from clipline_core.constants import Metric, MetricRole

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "clipline.cli"]
#: the processes of the stack, by their name in ``stack.json``, and their role
ROLES = {
    "api": MetricRole.API,
    "worker": MetricRole.WORKERS,
    "gpu-daemon": MetricRole.GPU_DAEMON,
    "callbacks": MetricRole.CALLBACKS,
}
SHM_SLOTS = 6


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180
    )


class Receiver(http.server.ThreadingHTTPServer):
    """Completion callbacks: answers 200, counts the events."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner.events.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families[metrics.family_name(name.removesuffix("_count").removesuffix("_sum"))]
    for s in family.samples:
        if s.name == name and s.labels == labels:
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels} in {family.samples}")


def common(name: str) -> bool:
    return name in metrics.COMMON or name.startswith(("process_", "python_"))


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path], redis_url: str
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ownership")
    cwd = tmp / "work"
    cwd.mkdir()
    for name in ("short", "product"):
        shutil.copy(media[name], cwd / media[name].name)
    (cwd / "not-a-video.mp4").write_bytes(b"this is not a video\n" * 100)
    deployment = f"own-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    env.update(
        CLIPLINE_REDIS_URL=redis_url,
        CLIPLINE_STATE_DIR=str(tmp / "state"),
        CLIPLINE_SHM_DIR=f"/dev/shm/clipline-test-{uuid.uuid4().hex[:8]}",
        CLIPLINE_SHM_SLOTS=str(SHM_SLOTS),
        CLIPLINE_DEPLOYMENT=deployment,
        CLIPLINE_DEVICE="cpu",
        CLIPLINE_ALLOW_LOOPBACK="1",  # the callback receiver listens on 127.0.0.1
    )
    receiver = Receiver()
    up = run_cli(["up", "--workers", "1"], env, cwd)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = json.loads(run_cli(["status", "--json"], env, cwd).stdout)
        record = json.loads((tmp / "state" / deployment / "stack.json").read_text())
        api = Client(status["api_url"], record["api_key"])
        video, image = str(cwd / media["short"].name), str(cwd / media["product"].name)
        good = api.submit(video, [image], callback_url=receiver.url)
        bad = api.submit(str(cwd / "not-a-video.mp4"), [image])
        views = {"good": api.wait(good.id, 240), "bad": api.wait(bad.id, 240)}
        # Cancelled while it waits behind a job the single worker is running.
        blocker = api.submit(video, [image])
        doomed = api.submit(video, [image], priority="low")
        api.cancel(doomed.id)
        views["cancelled"] = api.wait(doomed.id, 60)
        api.wait(blocker.id, 240)
        deadline = time.monotonic() + 60
        while not receiver.events and time.monotonic() < deadline:
            time.sleep(0.2)
        urls = {"api": f"{status['api_url']}/metrics", **status["metrics"]}
        # A job is counted right after its terminal transition (one more round trip):
        # wait for the last one's bookkeeping.
        while time.monotonic() < deadline:
            ended = parse(scrape(urls["api"]))[metrics.family_name(Metric.JOBS_TOTAL)]
            if sum(s.value for s in ended.samples) >= 4:
                break
            time.sleep(0.2)
        yield {
            "env": env,
            "cwd": cwd,
            "status": status,
            "urls": urls,
            "views": views,
            "events": receiver.events,
            "scrapes": {name: scrape(url) for name, url in urls.items()},
        }
    finally:
        run_cli(["down"], env, cwd)
        receiver.shutdown()
        receiver.server_close()
        shutil.rmtree(env["CLIPLINE_SHM_DIR"], ignore_errors=True)


def test_status_shows_the_api_and_every_metrics_endpoint(stack: dict[str, Any]) -> None:
    status = stack["status"]
    assert status["api_url"].startswith("http://127.0.0.1:")
    assert set(status["metrics"]) == {"gpu-daemon", "worker", "callbacks"}
    ports = set()
    for name, url in status["metrics"].items():
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), (name, url)
        ports.add(url.split(":")[2].split("/")[0])
    assert len(ports) == 3  # one port each: the callback worker does not share the worker's
    text = run_cli(["status"], stack["env"], stack["cwd"]).stdout
    assert status["api_url"] in text and status["metrics"]["callbacks"] in text


def test_the_jobs_ended_as_expected(stack: dict[str, Any]) -> None:
    views = stack["views"]
    assert views["good"].state.value == "succeeded", views["good"]
    assert views["bad"].state.value == "failed" and views["bad"].error.code == "not_a_video"
    assert views["cancelled"].state.value == "cancelled"
    assert len(stack["events"]) >= 1


def test_each_family_is_exported_by_its_owner_only(stack: dict[str, Any]) -> None:
    seen: dict[str, set[str]] = {}
    for name, text in stack["scrapes"].items():
        role = ROLES[name]
        families = parse(text)
        own = {f for f in families if not common(f)}
        assert own == metrics.family_names(role), (name, sorted(own ^ metrics.family_names(role)))
        for family in own:
            seen.setdefault(family, set()).add(name)
        (info,) = families[Metric.BUILD_INFO].samples
        assert info.labels["role"] == role.value and info.value == 1.0
        assert info.labels["version"] == metrics.version()
        assert any(f.startswith("process_") for f in families), name
    assert {f: names for f, names in seen.items() if len(names) > 1} == {}


def test_series_carry_what_happened(stack: dict[str, Any]) -> None:
    api = parse(stack["scrapes"]["api"])
    assert value(api, Metric.JOBS_TOTAL, status="succeeded") >= 2
    assert value(api, Metric.JOBS_TOTAL, status="failed") == 1
    assert value(api, Metric.JOBS_TOTAL, status="cancelled") == 1
    assert value(api, Metric.JOB_FAILURES_TOTAL, code="not_a_video") == 1
    assert value(api, Metric.JOB_FAILURES_TOTAL, code="cancelled") == 1
    latency = f"{Metric.JOB_LATENCY_SECONDS}_count"
    assert value(api, latency, priority="normal", status="succeeded") >= 2
    assert value(api, latency, priority="low", status="cancelled") == 1
    assert (
        value(api, f"{Metric.JOB_LATENCY_SECONDS}_sum", priority="normal", status="succeeded") > 0
    )
    for state in ("queued", "fetching", "decoding", "inferring", "rendering"):
        assert value(api, Metric.JOBS_BY_STATE, state=state) == 0, state
    worker = parse(stack["scrapes"]["worker"])
    assert value(worker, Metric.FRAMES_DECODED_TOTAL) > 0
    assert value(worker, Metric.JOBS_IN_FLIGHT) == 0
    assert value(worker, f"{Metric.STAGE_SECONDS}_count", stage="decode") >= 2
    for priority in ("high", "normal", "low"):  # sampled every few seconds: any value
        assert value(worker, Metric.BACKLOG_JOBS, priority=priority) >= 0
    daemon = parse(stack["scrapes"]["gpu-daemon"])
    assert value(daemon, Metric.SHM_SLOTS_TOTAL) == SHM_SLOTS
    assert value(daemon, f"{Metric.ARENA_WAIT_SECONDS}_count") > 0
    callbacks = parse(stack["scrapes"]["callbacks"])
    assert value(callbacks, Metric.CALLBACKS_TOTAL, outcome="delivered") >= 1
    for name, text in stack["scrapes"].items():
        for family in parse(text).values():
            for s in family.samples:
                assert all(v != "" for v in s.labels.values()), (name, s)


def test_promtool_accepts_every_scrape(stack: dict[str, Any]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    for name, text in stack["scrapes"].items():
        out = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, (name, out.stdout + out.stderr)


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_metrics_servers_bind_loopback_and_answer_probes(stack: dict[str, Any]) -> None:
    for name, url in stack["status"]["metrics"].items():
        port = int(url.split(":")[2].split("/")[0])
        assert _listening(port) == {"0100007F"}, name  # 127.0.0.1 only
        base = url.removesuffix("/metrics")
        for probe in ("/healthz", "/readyz"):
            with urllib.request.urlopen(base + probe, timeout=5) as resp:
                assert resp.status == 200, (name, probe)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/nowhere", timeout=5)
        assert info.value.code == 404


def test_down_stops_every_endpoint(stack: dict[str, Any]) -> None:
    """Last: after `clipline down` nothing listens on the recorded ports."""
    down = run_cli(["down"], stack["env"], stack["cwd"])
    assert down.returncode == 0, down.stdout + down.stderr
    for url in stack["urls"].values():
        port = int(url.split(":")[2].split("/")[0])
        assert _listening(port) == set(), url
