"""Shared fixtures of the operator tests: a real Prometheus scraping real exporters.

``prometheus`` (session scope) serves three ``prometheus_client`` exporters from this
test process, each on its own loopback port, and starts the ``prometheus`` binary on a
free loopback port with a 1-second scrape of them. Static target labels give each
exporter a ``namespace`` (``ns-load``: nodes with load and a backlog; ``ns-idle``: an
empty queue; ``ns-gpus``: the GPU daemons of a four-GPU node, labelled ``node`` and
``gpu``, beside a one-GPU node without ``gpu``) so the operator's default selector
``namespace="{namespace}"`` picks one of them.
The values are set before Prometheus starts and stay fixed (the slot-wait histogram
is fed at a steady rate by a background thread) so window averages are exact.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from op_helpers import (
    GPU_DAEMONS,
    GPU_PLAIN_NODES,
    GPU_QUEUE,
    IDLE_NODES,
    LOAD_NODES,
    LOAD_QUEUE,
    WAIT_RATE,
    WINDOW_S,
    PromFixture,
    free_port,
)
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from clipline_core.constants import LABEL_GPU_METRIC, LABEL_NODE_METRIC, LABEL_PRIORITY, Metric


def _exporter(
    nodes: dict[str, float], queue: dict[str, float], with_waits: bool
) -> tuple[int, Any, threading.Event]:
    registry = CollectorRegistry()
    util = Gauge(
        Metric.GPU_UTILIZATION_RATIO, "GPU busy ratio", [LABEL_NODE_METRIC], registry=registry
    )
    depth = Gauge(Metric.BACKLOG_JOBS, "Queued jobs", [LABEL_PRIORITY], registry=registry)
    wait = Histogram(
        Metric.SHM_RESERVE_WAIT_SECONDS,
        "Slot reservation waits",
        [LABEL_NODE_METRIC],
        registry=registry,
    )
    for node, value in nodes.items():
        util.labels(node).set(value)
    for prio, value in queue.items():
        depth.labels(prio).set(value)
    stop = threading.Event()
    if with_waits:
        child = wait.labels("node-waiting")

        def feed() -> None:
            # Observe the wall time actually elapsed, so a thread delayed by a busy
            # machine still feeds exactly WAIT_RATE seconds of waiting per second.
            last = time.monotonic()
            while not stop.wait(0.1):
                now = time.monotonic()
                child.observe(WAIT_RATE * (now - last))
                last = now

        threading.Thread(target=feed, daemon=True).start()
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return port, server, stop


def _gpu_exporter() -> tuple[int, Any]:
    """Per-GPU utilization (``node`` and ``gpu`` labels) and a queue, for ns-gpus."""
    registry = CollectorRegistry()
    util = Gauge(
        Metric.GPU_UTILIZATION_RATIO,
        "GPU busy ratio",
        [LABEL_NODE_METRIC, LABEL_GPU_METRIC],
        registry=registry,
    )
    depth = Gauge(Metric.BACKLOG_JOBS, "Queued jobs", [LABEL_PRIORITY], registry=registry)
    for (node, gpu), value in GPU_DAEMONS.items():
        util.labels(node, str(gpu)).set(value)
    for node, value in GPU_PLAIN_NODES.items():
        util.labels(node, "").set(value)  # an empty label is no label in Prometheus
    for prio, value in GPU_QUEUE.items():
        depth.labels(prio).set(value)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return port, server


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromFixture]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the Debian 'prometheus' binary is not installed (apt-get install prometheus)")
    load_port, load_server, load_stop = _exporter(LOAD_NODES, LOAD_QUEUE, with_waits=True)
    idle_port, idle_server, idle_stop = _exporter(IDLE_NODES, {"normal": 0.0}, with_waits=False)
    gpus_port, gpus_server = _gpu_exporter()
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: clipline\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{load_port}']\n"
        "        labels: {namespace: ns-load}\n"
        f"      - targets: ['127.0.0.1:{idle_port}']\n"
        "        labels: {namespace: ns-idle}\n"
        f"      - targets: ['127.0.0.1:{gpus_port}']\n"
        "        labels: {namespace: ns-gpus}\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fixture = PromFixture(url=f"http://127.0.0.1:{port}", load_port=load_port, idle_port=idle_port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{fixture.url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("prometheus did not become ready")
            time.sleep(0.1)
        # Two samples of every series (so rate() over the wait histogram has data).
        fixture.wait_for(
            f"{Metric.GPU_UTILIZATION_RATIO}",
            count=len(LOAD_NODES) + len(IDLE_NODES) + len(GPU_DAEMONS) + len(GPU_PLAIN_NODES),
        )
        fixture.wait_for(
            f"count_over_time({Metric.SHM_RESERVE_WAIT_SECONDS}_sum[{WINDOW_S}s]) >= {WINDOW_S}",
            count=1,
            timeout=30,
        )
        yield fixture
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for stop in (load_stop, idle_stop):
            stop.set()
        load_server.shutdown()
        idle_server.shutdown()
        gpus_server.shutdown()
