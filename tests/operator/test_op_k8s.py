"""End to end against a real Kubernetes cluster (``KUBECONFIG``), marked ``k8s``.

Installs the CRD, creates a throw-away namespace and a ClipPipeline selecting every
Linux node, runs ``clipline-operator run --standalone -n <ns>`` and checks: one GPU-daemon
Deployment and one workers Deployment per node exist (nodes without GPUs run one each)
with the workers' PodDisruptionBudget, the status says Ready with scaling inactive
(Prometheus deliberately unreachable) and replicas held at the minimum; deleting the
ClipPipeline lets the garbage collector remove the Deployments (owner references).
The pods themselves may stay Pending (no GPU needed for this check).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from clipline_core import constants
from clipline_operator import builders, crd
from clipline_operator.cluster import KubeApi, KubeApiError

pytestmark = pytest.mark.k8s

CRD_BASE = f"/apis/{constants.CRD_GROUP}/{constants.CRD_VERSION}"


async def _until(what: str, check: Callable[[], Awaitable[Any]], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(1)


async def _scenario() -> None:
    api = KubeApi()
    ns = f"clipline-e2e-{uuid.uuid4().hex[:6]}"
    try:
        await api.request(
            "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body=crd.build_crd()
        )
    except KubeApiError as exc:
        if exc.status != 409:
            raise
    await api.request("POST", "/api/v1/namespaces", body={"metadata": {"name": ns}})
    proc = None
    try:

        async def crd_served() -> bool:
            try:
                await api.request("GET", f"{CRD_BASE}/namespaces/{ns}/{constants.CRD_PLURAL}")
                return True
            except KubeApiError:
                return False

        await _until("CRD served", crd_served)
        body = {
            "apiVersion": crd.API_VERSION,
            "kind": constants.CRD_KIND,
            "metadata": {"name": "e2e", "namespace": ns},
            "spec": {
                "image": "busybox:1.36",
                "redis": {"secretRef": {"name": "none"}},
                "gpu": {"nodeSelector": {"kubernetes.io/os": "linux"}},
                "autoscaling": {
                    "periodSeconds": 5,
                    "prometheus": {"url": "http://127.0.0.1:1", "timeoutSeconds": 1},
                },
            },
        }
        await api.request("POST", f"{CRD_BASE}/namespaces/{ns}/{constants.CRD_PLURAL}", body=body)
        env = dict(
            os.environ, CLIPLINE_OPERATOR_TICK_SECONDS="1", CLIPLINE_OPERATOR_METRICS_PORT="0"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clipline_operator.cli",
            "run",
            "--standalone",
            "--namespace",
            ns,
            env=env,
        )
        nodes = [
            n for n in await api.list_nodes({"kubernetes.io/os": "linux"}) if not n.unschedulable
        ]
        assert nodes, "the cluster has no Linux nodes"
        path = f"{CRD_BASE}/namespaces/{ns}/{constants.CRD_PLURAL}/e2e"

        async def scaled_status() -> dict[str, Any] | None:
            status = (await api.request("GET", path)).get("status") or {}
            conds = {c["type"]: c for c in status.get("conditions") or []}
            if conds.get("ScalingActive", {}).get("reason") == "PrometheusUnavailable":
                return status
            return None

        status = await _until("status", scaled_status)
        assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
        assert status["gpuNodes"] == len(nodes)
        labels = {
            constants.LABEL_INSTANCE: "e2e",
            constants.LABEL_COMPONENT: builders.COMPONENT_WORKERS,
        }
        deps = await api.list_deployments(ns, labels)
        assert all(d["spec"]["replicas"] == 1 for d in deps)
        daemons = await api.list_deployments(
            ns, dict(labels, **{constants.LABEL_COMPONENT: builders.COMPONENT_DAEMON})
        )
        # One daemon per GPU a node advertises (one on a node without GPUs), each with
        # its workers.
        assert len(daemons) == len(deps) == status["gpus"] >= len(nodes)
        await api.request(
            "GET", f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/e2e-workers"
        )

        await api.request("DELETE", path)

        async def collected() -> bool:
            return not await api.list_deployments(ns, labels)

        await _until("garbage collection", collected)
    finally:
        if proc is not None:
            proc.terminate()
            await proc.wait()
        await api.request("DELETE", f"/api/v1/namespaces/{ns}")
        await api.close()


def test_operator_on_a_real_cluster() -> None:
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("KUBECONFIG is not set: no Kubernetes cluster to test against")
    asyncio.run(_scenario())
