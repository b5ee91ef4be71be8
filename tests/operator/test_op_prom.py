"""The operator's Prometheus path against a real Prometheus scraping real exporters.

See ``conftest.py``: the Debian ``prometheus`` binary runs on loopback and scrapes two
``prometheus_client`` exporters whose values this test module controls (per node, and
per GPU daemon of a multi-GPU node).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from op_helpers import (
    GPU_DAEMONS,
    GPU_PLAIN_NODES,
    LOAD_NODES,
    LOAD_QUEUE,
    WAIT_RATE,
    WINDOW_S,
    PromFixture,
    free_port,
)

from clipline_core.constants import Metric
from clipline_operator import crd, prom
from clipline_operator.decide import Observation, Policy, Reason, decide, decide_node


def _queries(namespace: str, **prom_spec: Any) -> prom.Queries:
    spec = crd.with_defaults(
        {
            "image": "img",
            "redis": {"secretRef": {"name": "r"}},
            "autoscaling": {"windowSeconds": WINDOW_S, "prometheus": prom_spec},
        }
    )
    return prom.build_queries(spec["autoscaling"]["prometheus"], namespace, "p", WINDOW_S)


def _observe(url: str, queries: prom.Queries) -> prom.Observations:
    return asyncio.run(prom.observe(prom.PromClient(url, timeout_s=3), queries))


def test_default_queries_select_the_namespace_and_window() -> None:
    q = _queries("ns-load")
    assert q.utilization == (
        "avg by (node, gpu) "
        '(avg_over_time(clipline_gpu_utilization_ratio{namespace="ns-load"}[3s]))'
    )
    assert q.slot_wait.startswith("sum by (node, gpu) ")
    assert f'{Metric.BACKLOG_JOBS}{{namespace="ns-load"}}' in q.queue_depth
    assert 'clipline_shm_reserve_wait_seconds_sum{namespace="ns-load"}[3s]' in q.slot_wait


def test_queries_return_what_the_exporters_set(prometheus: PromFixture) -> None:
    obs = _observe(prometheus.url, _queries("ns-load"))
    assert obs.ok, obs.error
    for node, value in LOAD_NODES.items():
        got = obs.gpu_utilization(node)
        assert got is not None, node
        if math.isnan(value):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(value, abs=1e-9)
    assert ("node-idle", None) not in obs.utilization  # other namespace
    assert obs.queue_depth == pytest.approx(sum(LOAD_QUEUE.values()))
    # The histogram is fed at WAIT_RATE seconds per second on node-waiting.
    assert obs.slot_wait_s[("node-waiting", None)] == pytest.approx(WAIT_RATE, rel=0.35)
    assert obs.slot_wait_ratio("node-waiting", 2) == pytest.approx(WAIT_RATE / 2, rel=0.35)
    assert obs.slot_wait_ratio("node-busy", 2) == 0.0  # no series yet: no waits


def test_decisions_from_real_observations(prometheus: PromFixture) -> None:
    obs = _observe(prometheus.url, _queries("ns-load"))
    policy = Policy()

    def run(node: str, current: int) -> Any:
        o = Observation(
            current=current,
            utilization=obs.gpu_utilization(node),
            queue_depth=obs.queue_depth,
            slot_wait_ratio=obs.slot_wait_ratio(node, current * 2),
            ready=current,
        )
        return decide(o, policy, [], now=1000.0)

    starved = run("node-starved", 2)
    assert (starved.direction, starved.reason) == ("up", Reason.FEEDERS_SHORT)
    assert starved.desired == 5  # ceil(2 x 0.95 / 0.40)
    busy = run("node-busy", 4)
    assert (busy.direction, busy.reason) == ("hold", Reason.AT_TARGET)
    nan = run("node-nan", 4)
    assert (nan.desired, nan.reason) == (4, Reason.NO_DATA)
    # node-waiting: 1 pod x 2 processes wait 25% of the time; GPU saturated -> keep 1.
    assert run("node-waiting", 1).desired == 1


def test_empty_queue_namespace_means_no_backlog(prometheus: PromFixture) -> None:
    obs = _observe(prometheus.url, _queries("ns-idle"))
    assert obs.ok and obs.queue_depth == 0.0
    assert obs.gpu_utilization("node-idle") == pytest.approx(0.30)
    d = decide(
        Observation(current=6, utilization=0.30, queue_depth=obs.queue_depth),
        Policy(down_window_s=0),
        [],
        now=50.0,
    )
    assert (d.direction, d.reason, d.desired) == ("down", Reason.NO_BACKLOG, 5)


def test_no_data_holds_replicas(prometheus: PromFixture) -> None:
    obs = _observe(prometheus.url, _queries("ns-nobody"))
    assert obs.ok
    assert obs.utilization == {} and obs.queue_depth is None
    d = decide(
        Observation(current=3, utilization=obs.gpu_utilization("node-busy"), queue_depth=None),
        Policy(),
        [],
        now=1.0,
    )
    assert (d.desired, d.reason) == (3, Reason.NO_DATA)


def test_bad_override_query_is_reported_not_raised(prometheus: PromFixture) -> None:
    obs = _observe(prometheus.url, _queries("ns-load", utilizationQuery="avg by (node) ((("))
    assert not obs.ok
    assert obs.error is not None and "400" in obs.error


def test_utilization_override_query(prometheus: PromFixture) -> None:
    q = _queries(
        "ns-load",
        utilizationQuery="max by (node) (clipline_gpu_utilization_ratio{selector}) * 0.5",
    )
    obs = _observe(prometheus.url, q)
    assert obs.gpu_utilization("node-busy") == pytest.approx(0.485)


def test_prometheus_down_holds_replicas() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    obs = _observe(url, _queries("ns-load"))
    assert not obs.ok and obs.error
    d = decide(
        Observation(
            current=4,
            utilization=None,
            queue_depth=None,
            prometheus_ok=obs.ok,
            error=obs.error,
        ),
        Policy(min_workers=0),
        [],
        now=1.0,
    )
    assert (d.desired, d.direction, d.reason) == (4, "hold", Reason.PROMETHEUS_DOWN)


def test_utilization_per_gpu_daemon(prometheus: PromFixture) -> None:
    """Series labelled ``gpu`` tell a node's daemons apart; one without ``gpu`` counts for
    every daemon of its node."""
    obs = _observe(prometheus.url, _queries("ns-gpus"))
    assert obs.ok, obs.error
    for (node, gpu), value in GPU_DAEMONS.items():
        assert obs.gpu_utilization(node, gpu) == pytest.approx(value)
        assert (node, gpu) in obs.utilization
    assert obs.gpu_utilization("node-quad", 7) is None  # no such daemon, no fallback
    (plain,) = GPU_PLAIN_NODES
    assert (plain, None) in obs.utilization
    assert obs.gpu_utilization(plain, 0) == obs.gpu_utilization(plain, 3)
    assert obs.gpu_utilization(plain, 0) == pytest.approx(GPU_PLAIN_NODES[plain])
    # One decision per GPU: only the starving daemons get more feeders.
    gpus = [
        Observation(current=2, utilization=obs.gpu_utilization("node-quad", g), queue_depth=12)
        for g in range(4)
    ]
    decisions = decide_node(gpus, Policy(), [[]] * 4, now=1.0, cpu_cap=30)
    assert [d.reason for d in decisions] == [
        Reason.AT_TARGET,
        Reason.FEEDERS_SHORT,
        Reason.AT_TARGET,
        Reason.FEEDERS_SHORT,
    ]
    assert [d.desired for d in decisions] == [2, 5, 2, 4]
