"""``cluster.KubeApi`` over real HTTP against kmock's Kubernetes emulator (no API server
can run here; see ``op_helpers.Emulator``), and the handlers' error mapping."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import kmock
import kopf
import pytest
import pytest_asyncio
from op_helpers import Emulator, declare_resources

from clipline_operator import builders, handlers
from clipline_operator.builders import Pipeline
from clipline_operator.cluster import KubeApi, KubeApiError


def _pipeline(image: str = "img:1") -> Pipeline:
    return Pipeline.from_body(
        {
            "metadata": {"name": "p", "namespace": "ns", "uid": "uid-p"},
            "spec": {"image": image, "redis": {"secretRef": {"name": "r"}}},
        }
    )


@pytest_asyncio.fixture
async def api() -> AsyncIterator[tuple[Emulator, KubeApi]]:
    async with Emulator() as k, kmock.Server(k) as server:
        declare_resources(k)
        url = str(server.url).rstrip("/")
        client = KubeApi(login=lambda: kopf.ConnectionInfo(server=url, token="t"))
        try:
            yield k, client
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_apply_creates_then_leaves_alone_then_replaces_keeping_replicas(
    api: tuple[Emulator, KubeApi],
) -> None:
    _, client = api
    dep = builders.build_worker_deployment(_pipeline(), "gpu-1", 1)
    live, action = await client.apply(dep, keep_replicas=True)
    assert action == "created" and live["spec"]["replicas"] == 1
    _, action = await client.apply(dep, keep_replicas=True)
    assert action == "unchanged"
    await client.scale_deployment("ns", dep["metadata"]["name"], 5)
    newer = builders.build_worker_deployment(_pipeline("img:2"), "gpu-1", 1)
    live, action = await client.apply(newer, keep_replicas=True)
    assert action == "replaced"
    assert live["spec"]["replicas"] == 5  # the autoscaler's count survives a spec change
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "img:2"
    listed = await client.list_deployments("ns", builders.selector_labels(_pipeline(), "workers"))
    assert [d["metadata"]["name"] for d in listed] == ["p-workers-gpu-1"]
    assert await client.list_deployments("ns", {"app.kubernetes.io/instance": "other"}) == []
    await client.delete(live)
    await client.delete(live)  # already gone: fine
    assert await client.list_deployments("ns", {}) == []


@pytest.mark.asyncio
async def test_nodes_are_filtered_by_labels(api: tuple[Emulator, KubeApi]) -> None:
    k, client = api
    for name, labels, cpu in (("g1", {"gpu": "y"}, "8"), ("c1", {}, "4")):
        k.objects["v1/nodes", None, name] = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"cpu": cpu}},
        }
    nodes = await client.list_nodes({"gpu": "y"})
    assert [(n.name, n.allocatable_cpu, n.ready) for n in nodes] == [("g1", "8", True)]


@pytest.mark.asyncio
async def test_api_errors_carry_status(api: tuple[Emulator, KubeApi]) -> None:
    _, client = api
    with pytest.raises(KubeApiError) as err:
        await client.request("GET", "/apis/apps/v1/namespaces/ns/deployments/missing")
    assert err.value.status == 404 and not err.value.temporary
    unreachable = KubeApi(login=lambda: kopf.ConnectionInfo(server="http://127.0.0.1:1"))
    with pytest.raises(KubeApiError) as err:
        await unreachable.request("GET", "/api/v1/nodes")
    await unreachable.close()
    assert err.value.status == 0 and err.value.temporary


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (409, kopf.TemporaryError),
        (429, kopf.TemporaryError),
        (503, kopf.TemporaryError),
        (0, kopf.TemporaryError),
        (401, kopf.TemporaryError),
        (403, kopf.PermanentError),
        (422, kopf.PermanentError),
    ],
)
def test_api_errors_map_to_kopf_errors(status: int, kind: type[Exception]) -> None:
    with pytest.raises(kind), handlers.api_errors():
        raise KubeApiError(status, "boom")


def test_seniority_priority_prefers_older_replicas() -> None:
    older = handlers.seniority_priority(1_700_000_000.0)
    newer = handlers.seniority_priority(1_700_000_001.0)
    assert older > newer > 0
    # Replicas started a few milliseconds apart (a second replica right after the first)
    # never tie, whatever their random tails.
    for seed in range(50):
        a = handlers.seniority_priority(1_700_000_000.250, random.Random(seed))
        b = handlers.seniority_priority(1_700_000_000.252, random.Random(seed + 1000))
        assert a > b
    assert 0 < handlers.seniority_priority(4_102_444_800.0) < 2**53  # the year 2100


def test_options_from_env() -> None:
    opts = handlers.OperatorOptions.from_env(
        {
            "CLIPLINE_OPERATOR_TICK_SECONDS": "2",
            "CLIPLINE_OPERATOR_PEERING": "clipline",
            "CLIPLINE_OPERATOR_METRICS_PORT": "0",
        }
    )
    assert (opts.tick_s, opts.peering, opts.metrics_port, opts.priority) == (
        2.0,
        "clipline",
        0,
        None,
    )
    assert opts.watch_server_timeout_s < opts.watch_client_timeout_s
