"""Reconciliation and autoscaling steps, independent of kopf.

:func:`sync_objects` makes the cluster match a :class:`~builders.Pipeline`: the GPU
daemon DaemonSet and one workers Deployment per selected GPU node (nodes that joined
the selector get one, nodes that left lose theirs). :func:`autoscale` queries
Prometheus, runs :func:`~decide.decide` per node, scales the Deployments that need it and
returns the status to record and the changes to announce. :func:`status_for` builds the
``.status`` patch with the ``Ready``, ``ScalingActive`` and ``ScalingLimited``
conditions. The kopf handlers (``handlers.py``) only glue these to events.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Mapping, Sequence
from typing import Any

from clipline_operator import builders, metrics
from clipline_operator.cluster import Cluster, NodeInfo
from clipline_operator.decide import (
    Decision,
    Observation,
    Policy,
    Reason,
    decide,
    history_from_status,
    history_to_status,
    upper_bound,
)
from clipline_operator.prom import Observations, PromClient, build_queries, observe

JSON = dict[str, Any]


def utcnow_iso(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class SyncResult:
    nodes: list[NodeInfo]
    deployments: dict[str, JSON]  # node -> live workers Deployment
    daemonset: str  # created | replaced | unchanged
    created: list[str] = dataclasses.field(default_factory=list)
    deleted: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class NodeResult:
    node: str
    deployment: str
    decision: Decision
    utilization: float | None
    slot_wait_ratio: float | None
    max_workers: int


@dataclasses.dataclass
class AutoscaleResult:
    observations: Observations
    nodes: list[NodeResult]

    @property
    def changes(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.decision.changed]


def _previous_nodes(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for item in status.get("nodes") or []:
        if isinstance(item, Mapping) and item.get("name"):
            out[str(item["name"])] = item
    return out


def _owned(pipeline: builders.Pipeline, obj: Mapping[str, Any]) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(r.get("uid") == pipeline.uid for r in refs) if pipeline.uid else True


async def sync_objects(
    cluster: Cluster, pipeline: builders.Pipeline, status: Mapping[str, Any]
) -> SyncResult:
    """Create or update the DaemonSet and the per-node Deployments; delete stale ones."""
    _, ds_action = await cluster.apply(builders.build_daemonset(pipeline))
    nodes = await cluster.list_nodes(pipeline.spec["gpu"]["nodeSelector"])
    wanted = {n.name for n in nodes}
    live = await cluster.list_deployments(
        pipeline.namespace, builders.selector_labels(pipeline, builders.COMPONENT_WORKERS)
    )
    by_node: dict[str, JSON] = {}
    for dep in live:
        if not _owned(pipeline, dep):
            continue
        node = dep.get("metadata", {}).get("annotations", {}).get(builders.ANNOTATION_NODE)
        if node:
            by_node[str(node)] = dep
    result = SyncResult(nodes=nodes, deployments={}, daemonset=ds_action)
    previous = _previous_nodes(status)
    policy = Policy.from_spec(pipeline.scaling)
    for node in nodes:
        initial = int(previous.get(node.name, {}).get("desiredWorkers") or policy.min_workers)
        high, _ = upper_bound(policy, builders.workers_cpu_cap(pipeline, node.allocatable_cpu))
        initial = max(min(initial, high), 0)
        obj = builders.build_worker_deployment(pipeline, node.name, initial)
        dep, action = await cluster.apply(obj, keep_replicas=True)
        result.deployments[node.name] = dep
        if action == "created":
            result.created.append(node.name)
    for node_name, dep in sorted(by_node.items()):
        if node_name not in wanted:
            await cluster.delete(dep)
            result.deleted.append(node_name)
    return result


def _replicas(dep: Mapping[str, Any]) -> tuple[int, int]:
    """``(spec.replicas, status.readyReplicas)``; an unset ``replicas`` means 1."""
    replicas = (dep.get("spec") or {}).get("replicas")
    ready = (dep.get("status") or {}).get("readyReplicas")
    return (1 if replicas is None else int(replicas)), int(ready or 0)


async def autoscale(
    cluster: Cluster,
    pipeline: builders.Pipeline,
    sync: SyncResult,
    status: Mapping[str, Any],
    now: float,
    prom_client: PromClient | None = None,
) -> AutoscaleResult:
    """One autoscaling period for every node of the pipeline."""
    scaling = pipeline.scaling
    prom_spec = scaling["prometheus"]
    policy = Policy.from_spec(scaling)
    queries = build_queries(
        prom_spec, pipeline.namespace, pipeline.name, int(scaling["windowSeconds"])
    )
    client = prom_client or PromClient(prom_spec["url"], float(prom_spec["timeoutSeconds"]))
    obs = await observe(client, queries)
    previous = _previous_nodes(status)
    concurrency = int(pipeline.spec["workers"]["concurrency"])
    results: list[NodeResult] = []
    for node in sync.nodes:
        dep = sync.deployments[node.name]
        current, ready = _replicas(dep)
        cap = builders.workers_cpu_cap(pipeline, node.allocatable_cpu)
        wait = obs.slot_wait_ratio(node.name, current * concurrency) if obs.ok else None
        util = obs.node_utilization(node.name) if obs.ok else None
        observation = Observation(
            current=current,
            utilization=util,
            queue_depth=obs.queue_depth if obs.ok else None,
            slot_wait_ratio=wait,
            ready=ready,
            cpu_cap=cap,
            prometheus_ok=obs.ok,
            error=obs.error,
        )
        history = history_from_status(previous.get(node.name, {}).get("recommendations"))
        decision = decide(observation, policy, history, now)
        if decision.changed:
            name = dep["metadata"]["name"]
            await cluster.scale_deployment(pipeline.namespace, name, decision.desired)
        metrics.record(f"{pipeline.namespace}/{pipeline.name}", node.name, decision)
        high, _ = upper_bound(policy, cap)
        results.append(
            NodeResult(
                node=node.name,
                deployment=dep["metadata"]["name"],
                decision=decision,
                utilization=util,
                slot_wait_ratio=wait,
                max_workers=high,
            )
        )
    return AutoscaleResult(observations=obs, nodes=results)


# ---------------------------------------------------------------------------
# Status.
# ---------------------------------------------------------------------------
def _num(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 4)


def _decision_json(d: Decision, when: str) -> JSON:
    return {
        "time": when,
        "direction": d.direction,
        "from": d.current,
        "to": d.desired,
        "reason": d.reason,
        "message": d.message,
    }


def condition(
    previous: Sequence[Mapping[str, Any]],
    ctype: str,
    ok: bool,
    reason: str,
    message: str,
    when: str,
    generation: int,
) -> JSON:
    """A condition that keeps its ``lastTransitionTime`` while its status is unchanged."""
    value = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == ctype), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == value else None
    return {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or when,
        "observedGeneration": generation,
    }


def status_for(
    pipeline: builders.Pipeline,
    status: Mapping[str, Any],
    sync: SyncResult,
    scaled: AutoscaleResult | None,
    now: float,
) -> JSON:
    """The ``.status`` patch after a sync (and maybe an autoscaling period)."""
    when = utcnow_iso(now)
    prev_conditions = list(status.get("conditions") or [])
    previous = _previous_nodes(status)
    gen = pipeline.generation
    nodes_out: list[JSON] = []
    total = 0
    for node in sync.nodes:
        dep = sync.deployments[node.name]
        current, ready_pods = _replicas(dep)
        entry: JSON = dict(previous.get(node.name, {}))
        entry.update(
            {
                "name": node.name,
                "deployment": dep["metadata"]["name"],
                "currentWorkers": current,
                "readyWorkers": ready_pods,
            }
        )
        entry.setdefault("desiredWorkers", current)
        if scaled is not None:
            res = next((r for r in scaled.nodes if r.node == node.name), None)
            if res is not None:
                d = res.decision
                entry.update(
                    {
                        "utilization": _num(res.utilization),
                        "slotWaitRatio": _num(res.slot_wait_ratio),
                        "currentWorkers": d.desired,
                        "desiredWorkers": d.desired,
                        "maxWorkers": res.max_workers,
                        "lastDecision": _decision_json(d, when),
                        "recommendations": history_to_status(d.history),
                    }
                )
                if d.changed:
                    entry["lastChange"] = _decision_json(d, when)
        total += int(entry["desiredWorkers"])
        nodes_out.append(entry)

    out: JSON = {
        "observedGeneration": gen,
        "gpuNodes": len(sync.nodes),
        "totalWorkers": total,
        "nodes": nodes_out,
    }
    ready: JSON
    if sync.nodes:
        ready = condition(
            prev_conditions,
            "Ready",
            True,
            "Reconciled",
            f"GPU daemon DaemonSet and {len(sync.nodes)} workers Deployment(s) in place",
            when,
            gen,
        )
    else:
        ready = condition(
            prev_conditions,
            "Ready",
            False,
            "NoGpuNodes",
            "no node matches spec.gpu.nodeSelector",
            when,
            gen,
        )
    conditions: list[JSON] = [ready]
    if scaled is not None:
        out["lastEvaluationTime"] = when
        obs = scaled.observations
        out["queueDepth"] = _num(obs.queue_depth) if obs.ok else None
        decisions = [r.decision for r in scaled.nodes]
        if not pipeline.scaling.get("enabled", True):
            active = (False, Reason.DISABLED, "spec.autoscaling.enabled is false")
        elif not scaled.observations.ok:
            active = (
                False,
                Reason.PROMETHEUS_DOWN,
                f"holding replicas: {scaled.observations.error}",
            )
        elif any(not d.data_ok for d in decisions):
            missing = [r.node for r in scaled.nodes if not r.decision.data_ok]
            active = (False, Reason.NO_DATA, f"holding replicas: no data for {', '.join(missing)}")
        elif not decisions:
            active = (False, "NoGpuNodes", "nothing to scale")
        else:
            active = (True, "ValidMetrics", "utilization and backlog available for every node")
        conditions.append(condition(prev_conditions, "ScalingActive", *active, when, gen))
        limited = [
            (r.node, r.decision.limited_by)
            for r in scaled.nodes
            if r.decision.limited_by in ("MaxWorkers", "MinWorkers", "AllocatableCPU")
        ]
        if limited:
            reason = str(limited[0][1])
            msg = ", ".join(f"{node}: {lim}" for node, lim in limited)
            conditions.append(
                condition(prev_conditions, "ScalingLimited", True, reason, msg, when, gen)
            )
        else:
            conditions.append(
                condition(
                    prev_conditions,
                    "ScalingLimited",
                    False,
                    "DesiredWithinRange",
                    "every node's desired workers is within its bounds",
                    when,
                    gen,
                )
            )
        changed = [r for r in scaled.nodes if r.decision.changed]
        pick = changed[0] if changed else (scaled.nodes[0] if scaled.nodes else None)
        if pick is not None:
            out["lastDecision"] = dict(_decision_json(pick.decision, when), node=pick.node)
    else:
        conditions.extend(
            c for c in prev_conditions if c.get("type") in ("ScalingActive", "ScalingLimited")
        )
    out["conditions"] = conditions
    return out


def invalid_status(status: Mapping[str, Any], message: str, now: float, generation: int) -> JSON:
    """Status of a pipeline whose spec cannot be acted on."""
    when = utcnow_iso(now)
    prev = list(status.get("conditions") or [])
    return {
        "observedGeneration": generation,
        "conditions": [
            condition(prev, "Ready", False, "InvalidSpec", message[:1000], when, generation),
            *[c for c in prev if c.get("type") in ("ScalingActive", "ScalingLimited")],
        ],
    }
