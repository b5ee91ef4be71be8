"""Helpers shared by the operator tests (importable by a unique module name)."""

from __future__ import annotations

import dataclasses
import itertools
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import kmock

from clipline_core import constants

REPO = Path(__file__).resolve().parents[2]
CRD_RES = f"{constants.CRD_GROUP}/{constants.CRD_VERSION}/{constants.CRD_PLURAL}"

#: Per-node utilization exported under namespace ns-load.
LOAD_NODES = {
    "node-busy": 0.97,
    "node-starved": 0.40,
    "node-waiting": 1.0,
    "node-nan": float("nan"),
}
#: Seconds of slot waiting per second on node-waiting (fed by a thread).
WAIT_RATE = 0.5
LOAD_QUEUE = {"high": 5.0, "normal": 20.0, "low": 0.0}
IDLE_NODES = {"node-idle": 0.30}
#: Per-GPU utilization exported under namespace ns-gpus (labels node and gpu, as the
#: chart's PodMonitor gives the daemons of a multi-GPU node): (node, gpu) -> value.
GPU_DAEMONS = {
    ("node-quad", 0): 0.97,
    ("node-quad", 1): 0.40,
    ("node-quad", 2): 0.97,
    ("node-quad", 3): 0.60,
}
#: A one-GPU node of ns-gpus whose series has no gpu label (a scrape that adds none).
GPU_PLAIN_NODES = {"node-single": 0.97}
GPU_QUEUE = {"normal": 12.0}
#: The query window the tests use (seconds; the fixture waits until it is full).
WINDOW_S = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class PromFixture:
    url: str
    load_port: int
    idle_port: int

    def query(self, promql: str) -> list[dict[str, Any]]:
        rsp = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        rsp.raise_for_status()
        return list(rsp.json()["data"]["result"])

    def wait_for(self, promql: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until ``promql`` returns at least ``count`` series (scrapes have landed)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if len(result) >= count:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{promql!r} returned {result!r}")
            time.sleep(0.2)


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what the API server assigns to new objects."""

    _names = itertools.count(1)

    async def _handle(self, request: Any) -> Any:
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{next(self._names)}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("resourceVersion", "1")
            meta.setdefault("generation", 1)
        return await super()._handle(request)


def declare_resources(k: kmock.KubernetesEmulator) -> None:
    """The resources the operator uses, as discovery would list them."""
    info = kmock.ResourceInfo
    verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
    k.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs=verbs)
    k.resources["v1/events"] = info(kind="Event", namespaced=True, verbs=verbs)
    k.resources["v1/nodes"] = info(kind="Node", namespaced=False, verbs=verbs)
    k.resources["apps/v1/deployments"] = info(kind="Deployment", namespaced=True, verbs=verbs)
    k.resources["policy/v1/poddisruptionbudgets"] = info(
        kind="PodDisruptionBudget", namespaced=True, verbs=verbs
    )
    k.resources["kopf.dev/v1/clusterkopfpeerings"] = info(
        kind="ClusterKopfPeering", namespaced=False, verbs=verbs
    )
    k.resources[CRD_RES] = info(
        kind=constants.CRD_KIND,
        singular=constants.CRD_SINGULAR,
        namespaced=True,
        subresources={"status"},
        verbs=verbs,
    )
