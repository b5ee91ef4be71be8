"""``cluster.KubeApi`` over real HTTP against kmock's Kubernetes emulator (no API server
can run here; see ``op_helpers.Emulator``), ``reconcile.sync_objects`` through it on
nodes with several GPUs, and the handlers' error mapping."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kopf
import pytest
import pytest_asyncio
from op_helpers import Emulator, declare_resources

from clipline_core import constants
from clipline_operator import builders, handlers, reconcile
from clipline_operator.builders import Pipeline
from clipline_operator.cluster import KubeApi, KubeApiError


def _pipeline(image: str = "img:1", **spec: Any) -> Pipeline:
    return Pipeline.from_body(
        {
            "metadata": {"name": "p", "namespace": "ns", "uid": "uid-p"},
            "spec": {"image": image, "redis": {"secretRef": {"name": "r"}}, **spec},
        }
    )


def _node(name: str, labels: dict[str, str], allocatable: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"allocatable": allocatable},
    }


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
    dep = builders.build_worker_deployment(_pipeline(), "gpu-1", 0, 1)
    live, action = await client.apply(dep, keep_replicas=True)
    assert action == "created" and live["spec"]["replicas"] == 1
    _, action = await client.apply(dep, keep_replicas=True)
    assert action == "unchanged"
    await client.scale_deployment("ns", dep["metadata"]["name"], 5)
    newer = builders.build_worker_deployment(_pipeline("img:2"), "gpu-1", 0, 1)
    live, action = await client.apply(newer, keep_replicas=True)
    assert action == "replaced"
    assert live["spec"]["replicas"] == 5  # the autoscaler's count survives a spec change
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "img:2"
    listed = await client.list_deployments("ns", builders.selector_labels(_pipeline(), "workers"))
    assert [d["metadata"]["name"] for d in listed] == ["p-workers-gpu-1-0"]
    assert await client.list_deployments("ns", {"app.kubernetes.io/instance": "other"}) == []
    await client.delete(live)
    await client.delete(live)  # already gone: fine
    assert await client.list_deployments("ns", {}) == []


@pytest.mark.asyncio
async def test_nodes_are_filtered_by_labels(api: tuple[Emulator, KubeApi]) -> None:
    k, client = api
    for name, labels, cpu in (("g1", {"gpu": "y"}, "8"), ("c1", {}, "4")):
        k.objects["v1/nodes", None, name] = _node(name, labels, {"cpu": cpu, "nvidia.com/gpu": "4"})
    nodes = await client.list_nodes({"gpu": "y"})
    assert [(n.name, n.allocatable_cpu, n.ready) for n in nodes] == [("g1", "8", True)]
    assert nodes[0].allocatable["nvidia.com/gpu"] == "4"


def _names(k: Emulator, plural: str) -> set[str]:
    return {
        name
        for (res, _, name), obj in k.objects.items()
        if res.plural == plural and not obj.deleted
    }


@pytest.mark.asyncio
async def test_sync_runs_one_daemon_per_gpu_and_follows_the_nodes(
    api: tuple[Emulator, KubeApi],
) -> None:
    """Two GPU nodes, one with 4 GPUs: 5 daemons, each with its workers; GPUs going away,
    a cordoned node and a disabled budget remove what they should."""
    k, client = api
    gpu = {"nvidia.com/gpu.present": "true"}
    k.objects["v1/nodes", None, "quad"] = _node("quad", gpu, {"cpu": "32", "nvidia.com/gpu": "4"})
    k.objects["v1/nodes", None, "single"] = _node(
        "single", gpu, {"cpu": "8", "nvidia.com/gpu": "1"}
    )
    k.objects["v1/nodes", None, "cpu"] = _node("cpu", {}, {"cpu": "64"})
    p = _pipeline()
    sync = await reconcile.sync_objects(client, p, {})
    assert sync.gpus == {"quad": 4, "single": 1}
    assert sorted(sync.created) == [
        ("quad", 0),
        ("quad", 1),
        ("quad", 2),
        ("quad", 3),
        ("single", 0),
    ]
    daemons = {f"p-gpu-quad-{i}" for i in range(4)} | {"p-gpu-single-0"}
    workers = {f"p-workers-quad-{i}" for i in range(4)} | {"p-workers-single-0"}
    assert _names(k, "deployments") == daemons | workers
    assert _names(k, "poddisruptionbudgets") == {"p-workers"}
    arenas = set()
    for (node, gpu_index), dep in sync.deployments.items():
        pod = dep["spec"]["template"]["spec"]
        daemon_pod = sync.daemons[(node, gpu_index)]["spec"]["template"]["spec"]
        (arena,) = [v["hostPath"]["path"] for v in pod["volumes"] if v["name"] == "arena"]
        assert arena in str(daemon_pod["volumes"])
        arenas.add((node, arena))
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels[constants.LABEL_GPU] == str(gpu_index)
        assert dep["spec"]["replicas"] == 1
    assert len({arena for node, arena in arenas if node == "quad"}) == 4  # node-local
    # The status names every daemon; the next sync keeps the autoscaler's counts.
    status = reconcile.status_for(p, {}, sync, None, now=0.0)
    assert (status["gpuNodes"], status["gpus"], status["totalWorkers"]) == (2, 5, 5)
    quad = next(n for n in status["nodes"] if n["name"] == "quad")
    assert [d["gpu"] for d in quad["daemons"]] == [0, 1, 2, 3]
    assert quad["maxWorkers"] == 28  # 32 CPUs less 4 daemons of 1 CPU, 1 CPU per worker

    # The quad node's device plugin now reports 2 GPUs, "single" is cordoned.
    k.objects["v1/nodes", None, "quad"].patch({"status": {"allocatable": {"nvidia.com/gpu": "2"}}})
    k.objects["v1/nodes", None, "single"].patch({"spec": {"unschedulable": True}})
    sync = await reconcile.sync_objects(client, p, status)
    assert sync.gpus == {"quad": 2} and sync.cordoned == ["single"]
    assert sorted(sync.deleted) == [("quad", 2), ("quad", 3), ("single", 0)]
    assert _names(k, "deployments") == {
        "p-gpu-quad-0",
        "p-gpu-quad-1",
        "p-workers-quad-0",
        "p-workers-quad-1",
    }
    status = reconcile.status_for(p, status, sync, None, now=1.0)
    assert status["gpus"] == 2

    # No budget wanted: it goes; the daemons stay.
    off = _pipeline(workers={"podDisruptionBudget": {"enabled": False}})
    await reconcile.sync_objects(client, off, status)
    assert _names(k, "poddisruptionbudgets") == set()
    assert len(_names(k, "deployments")) == 4


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
