"""The operator's least-privilege RBAC, listed in one place.

``rbac_rules()`` is the ClusterRole's ``rules`` list; the Helm chart renders the same
rules and a test compares them. Why each rule exists:

* ``clippipelines`` (+ ``/status``): kopf watches the resources, stores its progress in
  annotations (patch) and the operator writes ``.status``.
* ``deployments``: the owned workloads, a GPU daemon and its workers per GPU (create,
  replace, scale by patching ``spec.replicas``; delete for a node that left the selector
  or was cordoned, or a GPU the node no longer has).
* ``poddisruptionbudgets``: the workers' budget (create, replace; delete when disabled).
* ``nodes``: read-only, to find the GPU nodes, their allocatable CPU and GPUs.
* ``events``: kopf posts the per-change Events.
* ``customresourcedefinitions``, ``namespaces``: read-only, kopf's resource and
  namespace discovery.
* ``clusterkopfpeerings``/``kopfpeerings``: kopf's peering (two replicas never both run
  the timers).

No access to Secrets or Pods: the Redis URL reaches the pods through ``secretKeyRef``.
"""

from __future__ import annotations

from typing import Any

from clipline_core import constants

READ = ["get", "list", "watch"]


def rbac_rules() -> list[dict[str, Any]]:
    """The ClusterRole rules for the operator's ServiceAccount."""
    return [
        {
            "apiGroups": [constants.CRD_GROUP],
            "resources": [constants.CRD_PLURAL],
            "verbs": [*READ, "patch"],
        },
        {
            "apiGroups": [constants.CRD_GROUP],
            "resources": [f"{constants.CRD_PLURAL}/status"],
            "verbs": ["get", "patch", "update"],
        },
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "verbs": [*READ, "create", "update", "patch", "delete"],
        },
        {
            "apiGroups": ["policy"],
            "resources": ["poddisruptionbudgets"],
            "verbs": [*READ, "create", "update", "patch", "delete"],
        },
        {"apiGroups": [""], "resources": ["nodes"], "verbs": READ},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["list", "watch"],
        },
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings", "kopfpeerings"],
            "verbs": [*READ, "patch"],
        },
    ]


def cluster_role(name: str = f"{constants.PROJECT}-operator") -> dict[str, Any]:
    """A complete ClusterRole object (for tests and plain-manifest installs)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": rbac_rules(),
    }
