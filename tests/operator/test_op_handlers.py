"""The kopf handlers end to end: kopf's runner against kmock's Kubernetes emulator.

No Kubernetes API server can run here, so the API is ``kmock.KubernetesEmulator`` (a
Kubernetes API mock server by kopf's author) serving in-memory objects over real HTTP.
The operator runs unmodified in a subprocess (``clipline-operator run --standalone``,
i.e. ``kopf.run`` with the handlers of ``clipline_operator.handlers``) with a kubeconfig
pointing at the emulator, and queries the
real Prometheus of ``conftest.py``. The only addition to the emulator is
:class:`Emulator`, which fills in what an API server assigns on creation
(``generateName`` -> name, ``uid``, ``resourceVersion``) because kopf's Events rely on it.
Owner-reference garbage collection is the API server's job and is checked in the
builder tests; the ``k8s``-marked test covers a real cluster.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
import pytest_asyncio
from op_helpers import (
    CRD_RES,
    GPU_DAEMONS,
    WINDOW_S,
    Emulator,
    PromFixture,
    declare_resources,
    free_port,
)

from clipline_core import constants

GPU_LABEL = {"clipline.dev/gpu": "yes"}


def _node(
    name: str, labels: dict[str, str], cpu: str = "16", gpus: str | None = None
) -> dict[str, Any]:
    allocatable = {"cpu": cpu} if gpus is None else {"cpu": cpu, "nvidia.com/gpu": gpus}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "uid": f"uid-{name}", "resourceVersion": "1"},
        "status": {
            "allocatable": allocatable,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _pipeline(ns: str, name: str, prom_url: str, **autoscaling: Any) -> dict[str, Any]:
    scaling = {
        "periodSeconds": 1,
        "windowSeconds": WINDOW_S,
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 0,
        "prometheus": {"url": prom_url, "timeoutSeconds": 2},
        **autoscaling,
    }
    return {
        "apiVersion": f"{constants.CRD_GROUP}/{constants.CRD_VERSION}",
        "kind": constants.CRD_KIND,
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": f"uid-{ns}-{name}",
            "resourceVersion": "1",
            "generation": 1,
        },
        "spec": {
            "image": "clipline:test",
            "redis": {"secretRef": {"name": "redis"}},
            "gpu": {"nodeSelector": dict(GPU_LABEL)},
            "autoscaling": scaling,
        },
    }


def _find(k: kmock.KubernetesEmulator, plural: str, ns: str | None, name: str) -> Any:
    for (res, obj_ns, obj_name), obj in k.objects.items():
        if res.plural == plural and obj_ns == ns and obj_name == name and not obj.deleted:
            return obj
    return None


def _raw(k: kmock.KubernetesEmulator, plural: str, ns: str | None, name: str) -> dict[str, Any]:
    obj = _find(k, plural, ns, name)
    return dict(obj.raw) if obj is not None else {}


def _events(k: kmock.KubernetesEmulator, ns: str) -> list[dict[str, Any]]:
    return [
        dict(obj.raw)
        for (res, obj_ns, _), obj in k.objects.items()
        if res.plural == "events" and obj_ns == ns and not obj.deleted
    ]


T0 = time.monotonic()


async def _until(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            print(f"{time.monotonic() - T0:7.2f} {what}")
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _absent(k: kmock.KubernetesEmulator, ns: str, name: str) -> bool:
    return _find(k, "deployments", ns, name) is None


def _condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


@pytest_asyncio.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[Emulator, Path]]:
    async with Emulator() as k, kmock.Server(k) as server:
        declare_resources(k)
        for ns in ("ns-load", "ns-down", "ns-gpus"):
            k.objects["v1/namespaces", None, ns] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns},
            }
        kubeconfig = tmp_path / "kubeconfig.json"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "kmock",
                    "contexts": [{"name": "kmock", "context": {"cluster": "c", "user": "u"}}],
                    "clusters": [{"name": "c", "cluster": {"server": str(server.url).rstrip("/")}}],
                    "users": [{"name": "u", "user": {"token": "test-token"}}],
                }
            )
        )
        yield k, kubeconfig


@pytest.mark.slow
@pytest.mark.asyncio
async def test_operator_reconciles_scales_and_reports(
    cluster: tuple[Emulator, Path], prometheus: PromFixture, tmp_path: Path
) -> None:
    k, kubeconfig = cluster
    for name in ("node-starved", "node-busy"):
        k.objects["v1/nodes", None, name] = _node(name, dict(GPU_LABEL))
    k.objects["v1/nodes", None, "cpu-only"] = _node("cpu-only", {})
    k.objects[CRD_RES, "ns-load", "load"] = _pipeline("ns-load", "load", prometheus.url)
    dead = f"http://127.0.0.1:{free_port()}"
    k.objects[CRD_RES, "ns-down", "down"] = _pipeline("ns-down", "down", dead)
    broken = _pipeline("ns-load", "broken", prometheus.url)
    broken["spec"]["autoscaling"].update(minWorkersPerGpu=5, maxWorkersPerGpu=2)
    k.objects[CRD_RES, "ns-load", "broken"] = broken

    k.objects["kopf.dev/v1/clusterkopfpeerings", None, "clipline-test"] = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": "clipline-test", "resourceVersion": "1"},
    }
    metrics_port, liveness_port = free_port(), free_port()
    env = dict(
        os.environ,
        KUBECONFIG=str(kubeconfig),
        CLIPLINE_OPERATOR_TICK_SECONDS="0.3",
        CLIPLINE_OPERATOR_METRICS_PORT=str(metrics_port),
        CLIPLINE_OPERATOR_PEERING="clipline-test",
    )
    log = (tmp_path / "operator.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipline_operator.cli",
        "run",
        "--verbose",
        "--liveness",
        f"http://127.0.0.1:{liveness_port}/healthz",
        env=dict(env, POD_ID="replica-1"),
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    replica2 = None
    log2_path = tmp_path / "replica2.log"
    log2 = log2_path.open("w")
    try:
        # Reconcile: a GPU daemon and its workers per (one-GPU) node, none for cpu-only.
        ds = await _until(
            "daemon", lambda: _raw(k, "deployments", "ns-load", "load-gpu-node-starved-0")
        )
        assert ds["spec"]["template"]["spec"]["nodeSelector"] == GPU_LABEL
        assert ds["metadata"]["ownerReferences"][0]["uid"] == "uid-ns-load-load"
        peering = _raw(k, "clusterkopfpeerings", None, "clipline-test")
        assert "replica-1" in peering.get("status", {})
        replica2 = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clipline_operator.cli",
            "run",
            "--verbose",
            env=dict(env, POD_ID="replica-2", CLIPLINE_OPERATOR_METRICS_PORT="0"),
            stdout=log2,
            stderr=asyncio.subprocess.STDOUT,
        )
        for node in ("node-starved", "node-busy"):
            name = f"load-workers-{node}-0"
            dep = await _until(name, functools.partial(_raw, k, "deployments", "ns-load", name))
            assert dep["spec"]["replicas"] == 1
            _find(k, "deployments", "ns-load", name).patch({"status": {"readyReplicas": 1}})
        assert not _find(k, "deployments", "ns-load", "load-workers-cpu-only-0")
        assert not _find(k, "deployments", "ns-load", "load-gpu-cpu-only-0")

        # A period: node-starved (utilization 0.40, backlog 25) goes 1 -> ceil(0.95/0.40) = 3.
        starved = await _until(
            "scale-up",
            lambda: (
                _raw(k, "deployments", "ns-load", "load-workers-node-starved-0")["spec"]["replicas"]
                == 3
            ),
        )
        assert starved
        status = await _until(
            "status",
            lambda: (
                (s := _raw(k, "clippipelines", "ns-load", "load").get("status", {}))
                and _condition(s, "ScalingActive").get("status") == "True"
                and s
            ),
        )
        by_node = {n["name"]: n for n in status["nodes"]}
        (busy,) = by_node["node-busy"]["daemons"]
        assert busy["lastDecision"]["reason"] == "AtTarget"
        assert busy["utilization"] == pytest.approx(0.97)
        assert _condition(status, "Ready")["status"] == "True"
        assert status["gpuNodes"] == 2
        events = await _until(
            "ScaledUp event",
            lambda: [e for e in _events(k, "ns-load") if e.get("reason") == "ScaledUp"],
        )
        assert "node-starved" in events[0]["message"] and "1 -> 3" in events[0]["message"]

        # Pods not ready yet: no further scale-up; once ready, the next step is bounded by
        # maxStepUp (4): ceil(3 x 0.95 / 0.40) = 8 -> 7.
        await asyncio.sleep(1.5)
        dep_key = ("apps/v1/deployments", "ns-load", "load-workers-node-starved-0")
        assert k.objects[dep_key].raw["spec"]["replicas"] == 3
        k.objects[dep_key].patch({"status": {"readyReplicas": 3}})
        await _until(
            "step-limited scale-up", lambda: k.objects[dep_key].raw["spec"]["replicas"] == 7
        )

        # A spec change (through the API, so kopf sees it) rolls the image out and keeps
        # the autoscaler's replica count.
        path = f"/apis/{CRD_RES.rsplit('/', 1)[0]}/namespaces/ns-load/{constants.CRD_PLURAL}/load"
        change = {"metadata": {"generation": 2}, "spec": {"image": "clipline:v2"}}
        async with k.patch(path, json=change) as rsp:
            assert rsp.status == 200
        await _until(
            "image rollout",
            lambda: (
                k.objects[dep_key].raw["spec"]["template"]["spec"]["containers"][0]["image"]
                == "clipline:v2"
            ),
        )
        assert k.objects[dep_key].raw["spec"]["replicas"] == 7
        ds_image = _raw(k, "deployments", "ns-load", "load-gpu-node-starved-0")["spec"]["template"][
            "spec"
        ]
        assert ds_image["containers"][0]["image"] == "clipline:v2"

        # A node joins the selector, another leaves it.
        k.objects["v1/nodes", None, "node-waiting"] = _node("node-waiting", dict(GPU_LABEL))
        k.objects["v1/nodes", None, "node-busy"].patch(
            {"metadata": {"labels": {"clipline.dev/gpu": None}}}
        )
        await _until(
            "join", lambda: _find(k, "deployments", "ns-load", "load-workers-node-waiting-0")
        )
        await _until(
            "leave",
            lambda: (
                _find(k, "deployments", "ns-load", "load-workers-node-busy-0") is None
                and _find(k, "deployments", "ns-load", "load-gpu-node-busy-0") is None
            ),
        )

        # Prometheus down: hold replicas, say so in status, warn once.
        down = await _until(
            "down status",
            lambda: (
                (s := _raw(k, "clippipelines", "ns-down", "down").get("status", {}))
                and _condition(s, "ScalingActive").get("reason") == "PrometheusUnavailable"
                and s
            ),
        )
        assert _condition(down, "ScalingActive")["status"] == "False"
        assert all(n["desiredWorkers"] == 1 for n in down["nodes"])
        assert all(
            d["lastDecision"]["direction"] == "hold" for n in down["nodes"] for d in n["daemons"]
        )
        assert [e for e in _events(k, "ns-down") if e.get("type") == "Warning"]

        # Invalid spec: Ready=False with the reason; nothing created for it.
        bad = await _until(
            "invalid status",
            lambda: _condition(
                _raw(k, "clippipelines", "ns-load", "broken").get("status", {}), "Ready"
            ),
        )
        assert (bad["status"], bad["reason"]) == ("False", "InvalidSpec")
        assert "minWorkersPerGpu" in bad["message"]
        assert not _find(k, "deployments", "ns-load", "broken-gpu-node-starved-0")

        # The operator's own metrics and kopf's liveness endpoint.
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            health = await client.get(f"http://127.0.0.1:{liveness_port}/healthz")
        assert health.status_code == 200
        assert (
            'clipline_autoscaler_desired_workers{node="node-starved",pipeline="ns-load/load"} 7.0'
            in text
        )
        assert 'clipline_autoscaler_decisions_total{direction="up",reason="FeedersShort"}' in text

        # Peering: the second replica, started later, has a lower priority and has stood
        # by all along (its ClipPipeline watch paused); when the first leaves, it takes over.
        peers = await _until(
            "second peer",
            lambda: (
                (st := _raw(k, "clusterkopfpeerings", None, "clipline-test").get("status") or {})
                and "replica-2" in st
                and st
            ),
        )
        assert peers["replica-1"]["priority"] > peers["replica-2"]["priority"]
        await asyncio.sleep(1.5)
        text2 = log2_path.read_text()
        assert "Pausing the watch-stream for clippipelines" in text2
        assert "Handler 'reconcile_pipeline'" not in text2
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=15)
        await _until(
            "takeover",
            lambda: "Handler 'reconcile_pipeline' succeeded" in log2_path.read_text(),
        )
        assert "Resuming operations after the pause" in log2_path.read_text()
    finally:
        for p in (proc, replica2):
            if p is None or p.returncode is not None:
                continue
            p.terminate()
            try:
                await asyncio.wait_for(p.wait(), timeout=15)
            except TimeoutError:
                p.kill()
                await p.wait()
        log.close()
        log2.close()
        print((tmp_path / "operator.log").read_text()[-8000:])
        print("peering:", json.dumps(_raw(k, "clusterkopfpeerings", None, "clipline-test")))
        if (tmp_path / "replica2.log").exists():
            print("replica-2:", (tmp_path / "replica2.log").read_text()[-3000:])
        for ns, name in (("ns-load", "load"), ("ns-down", "down"), ("ns-load", "broken")):
            print(name, json.dumps(_raw(k, "clippipelines", ns, name).get("status"), indent=1))


MULTI_LABEL = {"clipline.dev/gpu-pool": "multi"}


@pytest.mark.slow
@pytest.mark.asyncio
async def test_operator_runs_one_daemon_per_gpu_and_scales_each(
    cluster: tuple[Emulator, Path], prometheus: PromFixture, tmp_path: Path
) -> None:
    """Two GPU nodes, one with 4 GPUs: 5 GPU daemons, each with its own arena, GPU and
    workers; each GPU's workers follow that GPU's utilization (``GPU_DAEMONS``)."""
    k, kubeconfig = cluster
    k.objects["v1/nodes", None, "node-quad"] = _node("node-quad", MULTI_LABEL, "32", gpus="4")
    k.objects["v1/nodes", None, "node-single"] = _node("node-single", MULTI_LABEL, "8", gpus="1")
    body = _pipeline("ns-gpus", "multi", prometheus.url)
    body["spec"]["gpu"]["nodeSelector"] = dict(MULTI_LABEL)
    k.objects[CRD_RES, "ns-gpus", "multi"] = body
    env = dict(
        os.environ,
        KUBECONFIG=str(kubeconfig),
        CLIPLINE_OPERATOR_TICK_SECONDS="0.3",
        CLIPLINE_OPERATOR_METRICS_PORT="0",
    )
    log_path = tmp_path / "operator.log"
    log = log_path.open("w")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipline_operator.cli",
        "run",
        "--standalone",
        "--verbose",
        env=env,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    quad = [("node-quad", gpu) for gpu in range(4)]
    daemons = [*quad, ("node-single", 0)]
    try:
        arenas = {}
        for node, gpu in daemons:
            daemon = await _until(
                f"daemon {node}/{gpu}",
                functools.partial(_raw, k, "deployments", "ns-gpus", f"multi-gpu-{node}-{gpu}"),
            )
            workers = await _until(
                f"workers {node}/{gpu}",
                functools.partial(_raw, k, "deployments", "ns-gpus", f"multi-workers-{node}-{gpu}"),
            )
            pods = [o["spec"]["template"]["spec"] for o in (daemon, workers)]
            (c,) = pods[0]["containers"]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
            for pod in pods:
                env_of = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
                assert env_of["CLIPLINE_GPU_INDEX"] == str(gpu)
            paths = [
                next(v["hostPath"]["path"] for v in pod["volumes"] if v["name"] == "arena")
                for pod in pods
            ]
            assert paths[0] == paths[1]  # a daemon and its own workers share one arena
            arenas[(node, gpu)] = paths[0]
            _find(k, "deployments", "ns-gpus", f"multi-workers-{node}-{gpu}").patch(
                {"status": {"readyReplicas": 1}}
            )
        assert len({arenas[d] for d in quad}) == 4
        await _until(  # created in the same pass as the Deployments, maybe just after
            "workers PDB",
            functools.partial(_raw, k, "poddisruptionbudgets", "ns-gpus", "multi-workers"),
        )

        # One period: node-quad's GPU 1 (0.40) gets ceil(0.95 / 0.40) = 3 workers, GPU 3
        # (0.60) gets 2, the GPUs at target keep 1; node-single's series has no `gpu`
        # label and counts for its one daemon (0.97: at target).
        def replicas() -> list[int]:
            return [
                _raw(k, "deployments", "ns-gpus", f"multi-workers-{n}-{g}")["spec"]["replicas"]
                for n, g in daemons
            ]

        await _until("per-GPU scale-up", lambda: replicas() == [1, 3, 1, 2, 1])
        status = await _until(
            "status",
            lambda: (
                (s := _raw(k, "clippipelines", "ns-gpus", "multi").get("status", {}))
                and _condition(s, "ScalingActive").get("status") == "True"
                and s.get("totalWorkers") == 8
                and s
            ),
        )
        assert (status["gpuNodes"], status["gpus"]) == (2, 5)
        by_node = {n["name"]: n for n in status["nodes"]}
        assert by_node["node-quad"]["gpus"] == 4
        got = {d["gpu"]: d["utilization"] for d in by_node["node-quad"]["daemons"]}
        assert got == pytest.approx({g: v for (_, g), v in GPU_DAEMONS.items()})
        (single,) = by_node["node-single"]["daemons"]
        assert single["utilization"] == pytest.approx(0.97)
        assert single["lastDecision"]["reason"] == "AtTarget"
        events = await _until(
            "ScaledUp events",
            lambda: [e for e in _events(k, "ns-gpus") if e.get("reason") == "ScaledUp"],
        )
        assert any("node-quad GPU 1" in e["message"] for e in events)

        # The node's device plugin now reports 2 GPUs: daemons 2 and 3 and their workers go.
        k.objects["v1/nodes", None, "node-quad"].patch(
            {"status": {"allocatable": {"nvidia.com/gpu": "2"}}}
        )
        for gpu in (2, 3):
            for kind in ("gpu", "workers"):
                name = f"multi-{kind}-node-quad-{gpu}"
                await _until(f"{name} removed", functools.partial(_absent, k, "ns-gpus", name))
        assert _find(k, "deployments", "ns-gpus", "multi-workers-node-quad-1")
        await _until(
            "WorkersDeleted event",
            lambda: [e for e in _events(k, "ns-gpus") if e.get("reason") == "WorkersDeleted"],
        )
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
        print(log_path.read_text()[-6000:])
        print(json.dumps(_raw(k, "clippipelines", "ns-gpus", "multi").get("status"), indent=1))
