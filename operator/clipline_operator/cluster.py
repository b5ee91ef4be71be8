"""The one module that talks to the Kubernetes API (besides kopf itself).

:class:`KubeApi` is a small aiohttp client over the REST API using kopf's public login
helpers for credentials (in-cluster service account first, then ``KUBECONFIG``). It
offers exactly what the reconciler needs (:class:`Cluster`): list the GPU nodes (with
their allocatable GPUs), list, create-or-patch, scale and delete the owned workloads
(Deployments and the workers' PodDisruptionBudget). Every API failure raises
:class:`KubeApiError`, whose ``temporary`` flag tells the handlers whether to retry
(conflicts, throttling, server errors, network trouble) or give up (bad requests,
forbidden, invalid objects).

The client also filters lists by labels on its side, so it behaves the same against
servers that ignore ``labelSelector``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import kopf

from clipline_operator import builders

JSON = dict[str, Any]
log = logging.getLogger(__name__)

TEMPORARY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class KubeApiError(Exception):
    """A failed Kubernetes API call."""

    def __init__(self, status: int, message: str, *, method: str = "", path: str = "") -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}".strip())
        self.status = status
        self.message = message

    @property
    def temporary(self) -> bool:
        """True for errors worth retrying (0 = no HTTP answer at all)."""
        return self.status == 0 or self.status in TEMPORARY_STATUSES


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """What the reconciler reads of a node (``allocatable``: its allocatable resources,
    e.g. ``nvidia.com/gpu`` or a MIG profile, as strings)."""

    name: str
    labels: Mapping[str, str]
    allocatable_cpu: str | None
    ready: bool
    unschedulable: bool
    allocatable: Mapping[str, str] = dataclasses.field(default_factory=dict)


class Cluster(Protocol):
    """What the reconciler needs from Kubernetes."""

    async def list_nodes(self, selector: Mapping[str, str]) -> list[NodeInfo]: ...

    async def list_deployments(self, namespace: str, labels: Mapping[str, str]) -> list[JSON]: ...

    async def apply(self, obj: JSON, *, keep_replicas: bool = False) -> tuple[JSON, str]: ...

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> JSON: ...

    async def delete(self, obj: Mapping[str, Any]) -> None: ...


def _matches(labels: Mapping[str, str] | None, selector: Mapping[str, str]) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _selector_param(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _collection_path(api_version: str, plural: str, namespace: str | None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        return f"{base}/namespaces/{quote(namespace)}/{plural}"
    return f"{base}/{plural}"


_PLURALS = {
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Node": "nodes",
}


def object_path(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    plural = _PLURALS[obj["kind"]]
    coll = _collection_path(obj["apiVersion"], plural, meta.get("namespace"))
    return f"{coll}/{quote(meta['name'])}"


def default_login() -> kopf.ConnectionInfo:
    """Credentials like kopf's fallback login: service account, else kubeconfig."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig found")
    return info


class KubeApi:
    """A minimal async Kubernetes REST client (see the module docstring)."""

    FIELD_MANAGER = builders.MANAGED_BY

    def __init__(
        self,
        login: Callable[[], kopf.ConnectionInfo] = default_login,
        timeout_s: float = 30.0,
    ) -> None:
        self._login = login
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._lock = asyncio.Lock()

    async def _ensure(self) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is None or self._session.closed:
                info = self._login()
                ssl_ctx: Any = False if info.insecure else None
                if info.server.startswith("https") and not info.insecure:
                    ssl_ctx = info.as_ssl_context()
                self._server = info.server.rstrip("/")
                self._session = aiohttp.ClientSession(
                    headers=info.as_http_headers(),
                    connector=aiohttp.TCPConnector(ssl=ssl_ctx),
                    timeout=self._timeout,
                )
            return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        session = await self._ensure()
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        try:
            async with session.request(
                method, self._server + path, data=data, params=params, headers=headers
            ) as rsp:
                text = await rsp.text()
                if rsp.status == 401:
                    await self.close()  # re-login next time (rotated tokens)
                if rsp.status >= 400:
                    try:
                        message = json.loads(text).get("message", text)
                    except ValueError:
                        message = text
                    raise KubeApiError(rsp.status, str(message)[:500], method=method, path=path)
                return json.loads(text) if text else {}
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise KubeApiError(0, f"{type(exc).__name__}: {exc}", method=method, path=path) from exc

    # -- what the reconciler uses ---------------------------------------
    async def list_nodes(self, selector: Mapping[str, str]) -> list[NodeInfo]:
        params = {"labelSelector": _selector_param(selector)} if selector else None
        raw = await self.request("GET", "/api/v1/nodes", params=params)
        out: list[NodeInfo] = []
        for item in raw.get("items", []):
            meta = item.get("metadata", {})
            if not _matches(meta.get("labels"), selector):
                continue
            status = item.get("status", {})
            conditions = {c.get("type"): c.get("status") for c in status.get("conditions", [])}
            allocatable = {str(k): str(v) for k, v in (status.get("allocatable") or {}).items()}
            out.append(
                NodeInfo(
                    name=meta["name"],
                    labels=dict(meta.get("labels") or {}),
                    allocatable_cpu=allocatable.get("cpu"),
                    ready=conditions.get("Ready", "True") == "True",
                    unschedulable=bool(item.get("spec", {}).get("unschedulable")),
                    allocatable=allocatable,
                )
            )
        return sorted(out, key=lambda n: n.name)

    async def list_deployments(self, namespace: str, labels: Mapping[str, str]) -> list[JSON]:
        path = _collection_path("apps/v1", "deployments", namespace)
        raw = await self.request("GET", path, params={"labelSelector": _selector_param(labels)})
        return [
            item
            for item in raw.get("items", [])
            if _matches(item.get("metadata", {}).get("labels"), labels)
            and item.get("metadata", {}).get("namespace", namespace) == namespace
        ]

    async def apply(self, obj: JSON, *, keep_replicas: bool = False) -> tuple[JSON, str]:
        """Create ``obj``, or replace its spec when its spec hash changed.

        Returns the live object and what happened: ``created``, ``replaced`` or
        ``unchanged``. A replacement is one JSON patch that replaces ``/spec`` as a
        whole (fields we dropped disappear, as with PUT) and sets our labels,
        annotations and owner references next to the live ones; with ``keep_replicas``
        the live ``spec.replicas`` is kept (the autoscaler owns it).
        """
        path = object_path(obj)
        try:
            live = await self.request("GET", path)
        except KubeApiError as exc:
            if exc.status != 404:
                raise
            coll = path.rsplit("/", 1)[0]
            try:
                created = await self.request(
                    "POST", coll, body=obj, params={"fieldManager": self.FIELD_MANAGER}
                )
                return created, "created"
            except KubeApiError as post_exc:
                if post_exc.status != 409:  # 409: created meanwhile; compare with it below
                    raise
            live = await self.request("GET", path)
        live_meta = live.get("metadata", {})
        want = obj["metadata"]["annotations"][builders.ANNOTATION_SPEC_HASH]
        if live_meta.get("annotations", {}).get(builders.ANNOTATION_SPEC_HASH) == want:
            return live, "unchanged"
        spec = json.loads(json.dumps(obj["spec"]))
        if keep_replicas and "replicas" in live.get("spec", {}):
            spec["replicas"] = live["spec"]["replicas"]
        meta = obj["metadata"]
        ops = [
            {"op": "replace", "path": "/spec", "value": spec},
            {
                "op": "add",
                "path": "/metadata/labels",
                "value": {**(live_meta.get("labels") or {}), **meta.get("labels", {})},
            },
            {
                "op": "add",
                "path": "/metadata/annotations",
                "value": {**(live_meta.get("annotations") or {}), **meta.get("annotations", {})},
            },
            {"op": "add", "path": "/metadata/ownerReferences", "value": meta["ownerReferences"]},
        ]
        replaced = await self.request(
            "PATCH",
            path,
            body=ops,
            params={"fieldManager": self.FIELD_MANAGER},
            content_type="application/json-patch+json",
        )
        return replaced, "replaced"

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> JSON:
        path = f"{_collection_path('apps/v1', 'deployments', namespace)}/{quote(name)}"
        return await self.request(
            "PATCH",
            path,
            body={"spec": {"replicas": int(replicas)}},
            params={"fieldManager": self.FIELD_MANAGER},
            content_type="application/merge-patch+json",
        )

    async def delete(self, obj: Mapping[str, Any]) -> None:
        try:
            await self.request("DELETE", object_path(obj), body={"propagationPolicy": "Background"})
        except KubeApiError as exc:
            if exc.status != 404:
                raise
