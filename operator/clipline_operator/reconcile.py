"""Reconciliation and autoscaling steps, independent of kopf.

:func:`sync_objects` makes the cluster match a :class:`~builders.Pipeline`: on every
selected, schedulable GPU node one daemon Deployment per GPU (or MIG slice) and one
workers Deployment per daemon, plus the workers' PodDisruptionBudget (nodes that joined
the selector get theirs, nodes that left or were cordoned and GPUs that disappeared lose
theirs). :func:`autoscale` queries Prometheus, runs :func:`~decide.decide_node` per node
(one decision per GPU daemon, the node's CPU shared), scales the workers Deployments
that need it and returns the status to record and the changes to announce.
:func:`status_for` builds the ``.status`` patch with the ``Ready``, ``ScalingActive``
and ``ScalingLimited`` conditions. The kopf handlers (``handlers.py``) only glue these
to events.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Mapping, Sequence
from typing import Any

from clipline_core import constants
from clipline_operator import builders, metrics
from clipline_operator.cluster import Cluster, NodeInfo
from clipline_operator.decide import (
    Decision,
    Observation,
    Policy,
    Reason,
    decide_node,
    history_from_status,
    history_to_status,
    upper_bound,
)
from clipline_operator.prom import Observations, PromClient, build_queries, observe

JSON = dict[str, Any]


def utcnow_iso(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Daemon = tuple[str, int]  # (node, GPU index)


@dataclasses.dataclass
class SyncResult:
    nodes: list[NodeInfo]  # the GPU nodes in use (selected and schedulable)
    gpus: dict[str, int]  # node -> how many GPU daemons it runs
    deployments: dict[Daemon, JSON]  # live workers Deployment of each daemon
    daemons: dict[Daemon, JSON]  # live daemon Deployment of each daemon
    created: list[Daemon] = dataclasses.field(default_factory=list)
    deleted: list[Daemon] = dataclasses.field(default_factory=list)
    cordoned: list[str] = dataclasses.field(default_factory=list)

    def node_daemons(self, node: str) -> list[Daemon]:
        return [(node, gpu) for gpu in range(self.gpus.get(node, 0))]

    @property
    def all_daemons(self) -> list[Daemon]:
        return [d for node in self.nodes for d in self.node_daemons(node.name)]


@dataclasses.dataclass
class DaemonResult:
    node: str
    gpu: int
    deployment: str
    decision: Decision
    utilization: float | None
    slot_wait_ratio: float | None
    max_workers: int


@dataclasses.dataclass
class AutoscaleResult:
    observations: Observations
    daemons: list[DaemonResult]

    @property
    def changes(self) -> list[DaemonResult]:
        return [d for d in self.daemons if d.decision.changed]


def daemon_label(node: str, gpu: int) -> str:
    """How messages name a GPU daemon."""
    return f"{node} GPU {gpu}"


def _previous_nodes(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for item in status.get("nodes") or []:
        if isinstance(item, Mapping) and item.get("name"):
            out[str(item["name"])] = item
    return out


def _previous_daemons(status: Mapping[str, Any]) -> dict[Daemon, Mapping[str, Any]]:
    out: dict[Daemon, Mapping[str, Any]] = {}
    for name, node in _previous_nodes(status).items():
        for item in node.get("daemons") or []:
            if isinstance(item, Mapping) and isinstance(item.get("gpu"), int):
                out[(name, int(item["gpu"]))] = item
    return out


def _owned(pipeline: builders.Pipeline, obj: Mapping[str, Any]) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(r.get("uid") == pipeline.uid for r in refs) if pipeline.uid else True


def _daemon_of(obj: Mapping[str, Any]) -> tuple[str, int | None] | None:
    """``(node, gpu)`` of an owned Deployment (gpu None: one from before GPU indexes)."""
    meta = obj.get("metadata", {})
    node = (meta.get("annotations") or {}).get(builders.ANNOTATION_NODE)
    if not node:
        return None
    raw = (meta.get("labels") or {}).get(constants.LABEL_GPU)
    try:
        return str(node), (int(raw) if raw is not None else None)
    except ValueError:
        return str(node), None


async def _live(
    cluster: Cluster, pipeline: builders.Pipeline, component: str
) -> dict[tuple[str, int | None], JSON]:
    live = await cluster.list_deployments(
        pipeline.namespace, builders.selector_labels(pipeline, component)
    )
    out: dict[tuple[str, int | None], JSON] = {}
    for dep in live:
        key = _daemon_of(dep) if _owned(pipeline, dep) else None
        if key is not None:
            out[key] = dep
    return out


async def _apply(
    cluster: Cluster, obj: JSON, live: Mapping[str, Any] | None, *, keep_replicas: bool = False
) -> tuple[JSON, str]:
    """``cluster.apply`` unless the listed ``live`` object already has ``obj``'s spec hash
    (one list call per period instead of a GET per GPU daemon)."""
    key = builders.ANNOTATION_SPEC_HASH
    want = obj["metadata"]["annotations"][key]
    if live is not None and (live.get("metadata", {}).get("annotations") or {}).get(key) == want:
        return dict(live), "unchanged"
    return await cluster.apply(obj, keep_replicas=keep_replicas)


async def sync_objects(
    cluster: Cluster, pipeline: builders.Pipeline, status: Mapping[str, Any]
) -> SyncResult:
    """Create or update every GPU daemon and its workers; delete the ones not wanted.

    A node runs :func:`builders.gpus_on_node` daemons. Nodes that left the selector,
    cordoned nodes and GPUs a node no longer has lose their daemon and workers
    (deleted, not evicted: pods pinned to a cordoned node could never be ready again).
    """
    selected = await cluster.list_nodes(pipeline.spec["gpu"]["nodeSelector"])
    nodes = [n for n in selected if not n.unschedulable]
    live_daemons = await _live(cluster, pipeline, builders.COMPONENT_DAEMON)
    live_workers = await _live(cluster, pipeline, builders.COMPONENT_WORKERS)
    result = SyncResult(
        nodes=nodes,
        gpus={n.name: builders.gpus_on_node(pipeline, n.allocatable) for n in nodes},
        deployments={},
        daemons={},
        cordoned=[n.name for n in selected if n.unschedulable],
    )
    previous = _previous_daemons(status)
    policy = Policy.from_spec(pipeline.scaling)
    for node in nodes:
        daemons = result.gpus[node.name]
        cap = builders.workers_cpu_cap(pipeline, node.allocatable_cpu, daemons)
        high, _ = upper_bound(policy, cap)
        for key in result.node_daemons(node.name):
            _, gpu = key
            daemon, _ = await _apply(
                cluster,
                builders.build_daemon_deployment(pipeline, node.name, gpu),
                live_daemons.get(key),
            )
            result.daemons[key] = daemon
            initial = int(previous.get(key, {}).get("desiredWorkers") or policy.min_workers)
            initial = max(min(initial, high), 0)
            obj = builders.build_worker_deployment(pipeline, node.name, gpu, initial)
            dep, action = await _apply(cluster, obj, live_workers.get(key), keep_replicas=True)
            result.deployments[key] = dep
            if action == "created":
                result.created.append(key)
    wanted = set(result.all_daemons)
    gone: set[tuple[str, int | None]] = set()
    for live in (live_workers, live_daemons):
        for found, dep in sorted(live.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            if found not in wanted:
                await cluster.delete(dep)
                gone.add(found)
    result.deleted = sorted((node, gpu or 0) for node, gpu in gone)
    pdb = builders.build_worker_pdb(pipeline)
    if pipeline.spec["workers"]["podDisruptionBudget"]["enabled"]:
        await cluster.apply(pdb)
    else:
        await cluster.delete(pdb)
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
    """One autoscaling period for every GPU daemon of the pipeline, node by node."""
    scaling = pipeline.scaling
    prom_spec = scaling["prometheus"]
    policy = Policy.from_spec(scaling)
    queries = build_queries(
        prom_spec, pipeline.namespace, pipeline.name, int(scaling["windowSeconds"])
    )
    client = prom_client or PromClient(prom_spec["url"], float(prom_spec["timeoutSeconds"]))
    obs = await observe(client, queries)
    previous = _previous_daemons(status)
    concurrency = int(pipeline.spec["workers"]["concurrency"])
    results: list[DaemonResult] = []
    for node in sync.nodes:
        keys = sync.node_daemons(node.name)
        cap = builders.workers_cpu_cap(pipeline, node.allocatable_cpu, len(keys))
        observations: list[Observation] = []
        histories = []
        for key in keys:
            _, gpu = key
            current, ready = _replicas(sync.deployments[key])
            wait = obs.slot_wait_ratio(node.name, current * concurrency, gpu) if obs.ok else None
            observations.append(
                Observation(
                    current=current,
                    utilization=obs.gpu_utilization(node.name, gpu) if obs.ok else None,
                    queue_depth=obs.queue_depth if obs.ok else None,
                    slot_wait_ratio=wait,
                    ready=ready,
                    prometheus_ok=obs.ok,
                    error=obs.error,
                )
            )
            histories.append(history_from_status(previous.get(key, {}).get("recommendations")))
        decisions = decide_node(observations, policy, histories, now, cap)
        high, _ = upper_bound(policy, cap)
        for key, observation, decision in zip(keys, observations, decisions, strict=True):
            dep = sync.deployments[key]
            if decision.changed:
                name = dep["metadata"]["name"]
                await cluster.scale_deployment(pipeline.namespace, name, decision.desired)
            results.append(
                DaemonResult(
                    node=node.name,
                    gpu=key[1],
                    deployment=dep["metadata"]["name"],
                    decision=decision,
                    utilization=observation.utilization,
                    slot_wait_ratio=observation.slot_wait_ratio,
                    max_workers=high,
                )
            )
        metrics.record(f"{pipeline.namespace}/{pipeline.name}", node.name, decisions)
    return AutoscaleResult(observations=obs, daemons=results)


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


def _daemon_status(
    previous: Mapping[str, Any],
    key: Daemon,
    sync: SyncResult,
    result: DaemonResult | None,
    when: str,
) -> JSON:
    dep = sync.deployments[key]
    current, ready_pods = _replicas(dep)
    entry: JSON = dict(previous)
    entry.update(
        {
            "gpu": key[1],
            "daemonDeployment": sync.daemons[key]["metadata"]["name"],
            "deployment": dep["metadata"]["name"],
            "currentWorkers": current,
            "readyWorkers": ready_pods,
        }
    )
    entry.setdefault("desiredWorkers", current)
    if result is not None:
        d = result.decision
        entry.update(
            {
                "utilization": _num(result.utilization),
                "slotWaitRatio": _num(result.slot_wait_ratio),
                "currentWorkers": d.desired,
                "desiredWorkers": d.desired,
                "maxWorkers": result.max_workers,
                "lastDecision": _decision_json(d, when),
                "recommendations": history_to_status(d.history),
            }
        )
        if d.changed:
            entry["lastChange"] = _decision_json(d, when)
    return entry


def _scaling_active(pipeline: builders.Pipeline, scaled: AutoscaleResult) -> tuple[bool, str, str]:
    missing = [daemon_label(r.node, r.gpu) for r in scaled.daemons if not r.decision.data_ok]
    if not pipeline.scaling.get("enabled", True):
        return False, Reason.DISABLED, "spec.autoscaling.enabled is false"
    if not scaled.observations.ok:
        return False, Reason.PROMETHEUS_DOWN, f"holding replicas: {scaled.observations.error}"
    if missing:
        return False, Reason.NO_DATA, f"holding replicas: no data for {', '.join(missing)}"
    if not scaled.daemons:
        return False, "NoGpuNodes", "nothing to scale"
    return True, "ValidMetrics", "utilization and backlog available for every GPU"


def status_for(
    pipeline: builders.Pipeline,
    status: Mapping[str, Any],
    sync: SyncResult,
    scaled: AutoscaleResult | None,
    now: float,
) -> JSON:
    """The ``.status`` patch after a sync (and maybe an autoscaling period).

    ``status.nodes[]`` has one entry per GPU node (its worker totals) with one
    ``daemons[]`` entry per GPU daemon (utilization, workers, last decision and the
    recommendation history the next period stabilizes over).
    """
    when = utcnow_iso(now)
    prev_conditions = list(status.get("conditions") or [])
    previous = _previous_daemons(status)
    results = {(r.node, r.gpu): r for r in (scaled.daemons if scaled else [])}
    gen = pipeline.generation
    nodes_out: list[JSON] = []
    total = 0
    for node in sync.nodes:
        daemons = [
            _daemon_status(previous.get(key, {}), key, sync, results.get(key), when)
            for key in sync.node_daemons(node.name)
        ]
        entry: JSON = {
            "name": node.name,
            "gpus": len(daemons),
            "currentWorkers": sum(int(d["currentWorkers"]) for d in daemons),
            "readyWorkers": sum(int(d["readyWorkers"]) for d in daemons),
            "desiredWorkers": sum(int(d["desiredWorkers"]) for d in daemons),
            "daemons": daemons,
        }
        cap = builders.workers_cpu_cap(pipeline, node.allocatable_cpu, len(daemons))
        if cap is not None:
            entry["maxWorkers"] = cap
        total += int(entry["desiredWorkers"])
        nodes_out.append(entry)

    out: JSON = {
        "observedGeneration": gen,
        "gpuNodes": len(sync.nodes),
        "gpus": len(sync.all_daemons),
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
            f"{len(sync.all_daemons)} GPU daemon(s) and their workers on {len(sync.nodes)} node(s)",
            when,
            gen,
        )
    else:
        cordoned = f" ({', '.join(sync.cordoned)} cordoned)" if sync.cordoned else ""
        ready = condition(
            prev_conditions,
            "Ready",
            False,
            "NoGpuNodes",
            f"no schedulable node matches spec.gpu.nodeSelector{cordoned}",
            when,
            gen,
        )
    conditions: list[JSON] = [ready]
    if scaled is not None:
        out["lastEvaluationTime"] = when
        obs = scaled.observations
        out["queueDepth"] = _num(obs.queue_depth) if obs.ok else None
        conditions.append(
            condition(
                prev_conditions, "ScalingActive", *_scaling_active(pipeline, scaled), when, gen
            )
        )
        limited = [
            (daemon_label(r.node, r.gpu), r.decision.limited_by)
            for r in scaled.daemons
            if r.decision.limited_by in ("MaxWorkers", "MinWorkers", "AllocatableCPU")
        ]
        if limited:
            reason = str(limited[0][1])
            msg = ", ".join(f"{name}: {lim}" for name, lim in limited)
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
                    "every GPU's desired workers is within its bounds",
                    when,
                    gen,
                )
            )
        changed = [r for r in scaled.daemons if r.decision.changed]
        pick = changed[0] if changed else (scaled.daemons[0] if scaled.daemons else None)
        if pick is not None:
            out["lastDecision"] = dict(
                _decision_json(pick.decision, when), node=pick.node, gpu=pick.gpu
            )
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
