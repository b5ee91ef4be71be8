"""The operator's reconcile loop without a Kubernetes API server, for the metrics e2e test.

No Kubernetes API server (and so no kube-state-metrics) can run here. This process runs
the operator's real code: ``reconcile.sync_objects`` builds the node's GPU-daemon and
worker Deployments with the real builders, and ``reconcile.autoscale`` queries
the real Prometheus with the real ``PromClient``, decides with the real policy and records
``clipline_autoscaler_*`` in the operator's own registry, served on ``--operator-port``.

The only stand-in is :class:`MemoryCluster`, as thin as the ``Cluster`` protocol it
implements (objects kept in a dict; a Deployment's status mirrors its spec as if the
kubelet started every pod). ``--ksm-port`` serves what kube-state-metrics would export
for those Deployments: ``kube_deployment_status_replicas`` and ``kube_deployment_labels``
(with the allow-listed labels the chart documents).

    python tests/deploy/e2e_operator.py --pipeline pipeline.json --prometheus URL \\
        --operator-port N --ksm-port M --node NODE [--period S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from clipline import dashboards
from clipline_core import constants
from clipline_operator import builders, metrics, reconcile
from clipline_operator.cluster import NodeInfo
from clipline_operator.prom import PromClient

JSON = dict[str, Any]


class MemoryCluster:
    """The ``clipline_operator.cluster.Cluster`` protocol over a dict."""

    def __init__(self, nodes: list[NodeInfo]) -> None:
        self.nodes = nodes
        self.objects: dict[tuple[str, str, str], JSON] = {}

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
        meta = obj["metadata"]
        return (obj["kind"], meta.get("namespace", ""), meta["name"])

    async def list_nodes(self, selector: Mapping[str, str]) -> list[NodeInfo]:
        return list(self.nodes)

    async def list_deployments(self, namespace: str, labels: Mapping[str, str]) -> list[JSON]:
        return [
            o
            for (kind, ns, _), o in self.objects.items()
            if kind == "Deployment"
            and ns == namespace
            and all(o["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())
        ]

    async def apply(self, obj: JSON, *, keep_replicas: bool = False) -> tuple[JSON, str]:
        key = self._key(obj)
        live = self.objects.get(key)
        new = copy.deepcopy(obj)
        if live is not None and keep_replicas and "replicas" in live["spec"]:
            new["spec"]["replicas"] = live["spec"]["replicas"]
        self._settle(new)
        self.objects[key] = new
        return new, "created" if live is None else "replaced"

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> JSON:
        obj = self.objects[("Deployment", namespace, name)]
        obj["spec"]["replicas"] = int(replicas)
        self._settle(obj)
        return obj

    async def delete(self, obj: Mapping[str, Any]) -> None:
        self.objects.pop(self._key(obj), None)

    @staticmethod
    def _settle(obj: JSON) -> None:
        if obj["kind"] == "Deployment":
            replicas = int(obj["spec"].get("replicas", 1))
            obj["status"] = {"replicas": replicas, "readyReplicas": replicas}


class KubeStateMetrics(Collector):
    """The two kube-state-metrics series the dashboards read, for the cluster's objects."""

    def __init__(self, cluster: MemoryCluster) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator[GaugeMetricFamily]:
        replicas = GaugeMetricFamily(
            dashboards.KSM_DEPLOYMENT_REPLICAS,
            "The number of replicas per deployment.",
            labels=["namespace", "deployment"],
        )
        label_names = [dashboards.KSM_COMPONENT_LABEL, dashboards.KSM_NODE_LABEL]
        labels = GaugeMetricFamily(
            dashboards.KSM_DEPLOYMENT_LABELS,
            "Kubernetes labels converted to Prometheus labels.",
            labels=["namespace", "deployment", *label_names],
        )
        for (kind, namespace, name), obj in sorted(self.cluster.objects.items()):
            if kind != "Deployment":
                continue
            meta_labels = obj["metadata"].get("labels", {})
            replicas.add_metric([namespace, name], obj["status"]["replicas"])
            labels.add_metric(
                [
                    namespace,
                    name,
                    meta_labels.get(constants.LABEL_COMPONENT, ""),
                    meta_labels.get(constants.LABEL_NODE, ""),
                ],
                1,
            )
        yield replicas
        yield labels


async def loop(args: argparse.Namespace, stop: asyncio.Event) -> None:
    body = json.loads(Path(args.pipeline).read_text())
    body["metadata"].setdefault("uid", "e2e")
    pipeline = builders.Pipeline.from_body(body)
    cluster = MemoryCluster([NodeInfo(args.node, {}, str(args.node_cpu), True, False)])
    ksm = CollectorRegistry(auto_describe=True)
    ksm.register(KubeStateMetrics(cluster))
    start_http_server(args.ksm_port, addr="127.0.0.1", registry=ksm)
    metrics.serve(args.operator_port, addr="127.0.0.1")
    client = PromClient(args.prometheus, timeout_s=5.0)
    while not stop.is_set():
        sync = await reconcile.sync_objects(cluster, pipeline, {})
        result = await reconcile.autoscale(cluster, pipeline, sync, {}, time.time(), client)
        for node in result.daemons:
            print(
                json.dumps(
                    {
                        "node": node.node,
                        "gpu": node.gpu,
                        "direction": node.decision.direction,
                        "reason": node.decision.reason,
                        "desired": node.decision.desired,
                        "utilization": node.utilization,
                    }
                ),
                flush=True,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=args.period)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True, help="ClipPipeline object as JSON")
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--operator-port", type=int, required=True)
    parser.add_argument("--ksm-port", type=int, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--node-cpu", type=int, default=8)
    parser.add_argument("--period", type=float, default=2.0)
    args = parser.parse_args()

    async def run() -> None:
        stop = asyncio.Event()
        loop_ = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop_.add_signal_handler(sig, stop.set)
        await loop(args, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
