"""kopf handlers of the clipline operator (thin: the work is in ``reconcile.py``).

Run with ``kopf run -m clipline_operator.handlers --all-namespaces`` or
``clipline-operator run``.

* create/resume/update(spec): validate the spec, apply one daemon Deployment per GPU of
  every GPU node and one workers Deployment per daemon, record ``Ready``.
* a timer per ClipPipeline ticks every ``CLIPLINE_OPERATOR_TICK_SECONDS`` (default 5)
  and, once ``spec.autoscaling.periodSeconds`` have passed since
  ``status.lastEvaluationTime``, re-syncs the objects (nodes joining, leaving the
  selector or cordoned, GPUs appearing or going), runs one autoscaling period, records
  the status and emits one Event per change.

Production settings (``configure``): server- and client-side watch timeouts so a silent
connection never stops the watch; peering through a ``ClusterKopfPeering`` named by
``CLIPLINE_OPERATOR_PEERING`` (mandatory when set) with a priority that favours the
longest-running replica, so two replicas never both run the timers; progress kept in
``clipline.dev/*`` annotations. API errors map to ``kopf.TemporaryError`` (retried:
conflicts, throttling, 5xx, network) or ``kopf.PermanentError`` (4xx such as forbidden
or invalid). Everything is idempotent: each step compares with the live state first.
kopf adds the ``clipline.dev/operator`` finalizer (its timers need it to stop cleanly), so
deleting a ClipPipeline while no operator runs waits until one is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import time
from collections.abc import Iterator, Mapping
from typing import Any

import kopf

from clipline_core import constants
from clipline_operator import metrics, reconcile
from clipline_operator.builders import Pipeline
from clipline_operator.cluster import KubeApi, KubeApiError
from clipline_operator.crd import SpecError

RESOURCE = (constants.CRD_GROUP, constants.CRD_VERSION, constants.CRD_PLURAL)
ENV_TICK = "CLIPLINE_OPERATOR_TICK_SECONDS"
ENV_PEERING = "CLIPLINE_OPERATOR_PEERING"
ENV_PRIORITY = "CLIPLINE_OPERATOR_PRIORITY"
ENV_METRICS_PORT = "CLIPLINE_OPERATOR_METRICS_PORT"


@dataclasses.dataclass(frozen=True)
class OperatorOptions:
    """Process-level options, from ``CLIPLINE_OPERATOR_*`` environment variables."""

    tick_s: float = 5.0
    peering: str = ""
    priority: int | None = None
    metrics_port: int = constants.DEFAULT_OPERATOR_METRICS_PORT
    watch_server_timeout_s: int = 300
    watch_client_timeout_s: int = 330
    retry_delay_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorOptions:
        env = os.environ if env is None else env
        prio = env.get(ENV_PRIORITY)
        return cls(
            tick_s=float(env.get(ENV_TICK, "5")),
            peering=env.get(ENV_PEERING, ""),
            priority=int(prio) if prio else None,
            metrics_port=int(env.get(ENV_METRICS_PORT, constants.DEFAULT_OPERATOR_METRICS_PORT)),
        )


OPTIONS = OperatorOptions.from_env()


def seniority_priority(started: float, rnd: random.Random | None = None) -> int:
    """A peering priority that is higher for replicas started earlier.

    A new replica (rolling update, second replica) waits in standby until the older one
    leaves. Start times count in milliseconds (two replicas a few hundred milliseconds
    apart must not tie); the random tail breaks ties within one millisecond. The value
    stays below 2**53, exact in any JSON reader.
    """
    tail = (rnd or random.Random()).randrange(100)
    return (10_000_000_000_000 - int(started * 1000)) * 100 + tail


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    """Map Kubernetes API failures to kopf's temporary/permanent errors."""
    try:
        yield
    except KubeApiError as exc:
        if exc.temporary or exc.status == 401:
            raise kopf.TemporaryError(str(exc), delay=OPTIONS.retry_delay_s) from exc
        raise kopf.PermanentError(str(exc)) from exc


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.watching.server_timeout = OPTIONS.watch_server_timeout_s
    settings.watching.client_timeout = OPTIONS.watch_client_timeout_s
    settings.watching.connect_timeout = 30
    settings.watching.reconnect_backoff = 2.0
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 15
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=constants.CRD_GROUP
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=constants.CRD_GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{constants.CRD_GROUP}/operator"
    # Handler log lines become Events only from warnings up; the operator's own Events
    # (scaling changes, workers created/deleted, scaling inactive) are always posted.
    settings.posting.level = logging.WARNING
    if OPTIONS.peering and not settings.peering.standalone:
        # ClusterKopfPeering when watching all namespaces, KopfPeering otherwise.
        settings.peering.name = OPTIONS.peering
        settings.peering.mandatory = True
    if OPTIONS.priority is not None:
        settings.peering.priority = OPTIONS.priority
    elif settings.peering.priority == 0:
        settings.peering.priority = seniority_priority(time.time())
    memo.api = KubeApi()
    metrics.serve(OPTIONS.metrics_port)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    api = memo.get("api")
    if isinstance(api, KubeApi):
        await api.close()


def _object_lock(memo: kopf.Memo) -> asyncio.Lock:
    """One lock per ClipPipeline (kopf's per-object memo): handlers and the timer of one
    object never reconcile at the same time."""
    lock = memo.get("lock")
    if not isinstance(lock, asyncio.Lock):
        lock = memo["lock"] = asyncio.Lock()
    return lock


def _pipeline_or_status(
    body: kopf.Body, status: Mapping[str, Any], patch: kopf.Patch, now: float
) -> Pipeline | None:
    try:
        return Pipeline.from_body(body)
    except SpecError as exc:
        gen = int(body.get("metadata", {}).get("generation") or 0)
        new = reconcile.invalid_status(status, str(exc), now, gen)
        if new != {k: status.get(k) for k in new}:  # the timer re-checks: write only changes
            patch.status.update(new)
        return None


def _announce_sync(body: kopf.Body, sync: reconcile.SyncResult) -> None:
    for node, gpu in sync.created:
        kopf.event(
            body,
            type="Normal",
            reason="WorkersCreated",
            message=f"GPU daemon and workers Deployments for node {node} GPU {gpu}",
        )
    for node, gpu in sync.deleted:
        why = "is cordoned" if node in sync.cordoned else "left the selector or has fewer GPUs"
        kopf.event(
            body,
            type="Normal",
            reason="WorkersDeleted",
            message=f"node {node} GPU {gpu}: daemon and workers removed (the node {why})",
        )


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile_pipeline(
    body: kopf.Body,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Make the owned objects match the spec."""
    now = time.time()
    pipeline = _pipeline_or_status(body, status, patch, now)
    if pipeline is None:
        raise kopf.PermanentError("invalid spec; see status.conditions")
    async with _object_lock(memo):
        with api_errors():
            sync = await reconcile.sync_objects(memo.api, pipeline, status)
    patch.status.update(reconcile.status_for(pipeline, status, sync, None, now))
    _announce_sync(body, sync)


def _last_evaluation(status: Mapping[str, Any], memo: kopf.Memo) -> float:
    last = float(memo.get("last_evaluation", 0.0))
    raw = status.get("lastEvaluationTime")
    if raw:
        with contextlib.suppress(ValueError):
            stamp = datetime.datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
            last = max(last, stamp.timestamp())
    return last


@kopf.timer(*RESOURCE, id="autoscale", interval=OPTIONS.tick_s, initial_delay=OPTIONS.tick_s)
async def autoscale_pipeline(
    body: kopf.Body,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """One autoscaling period, when due."""
    now = time.time()
    pipeline = _pipeline_or_status(body, status, patch, now)
    if pipeline is None:
        return
    period = float(pipeline.scaling["periodSeconds"])
    if now - _last_evaluation(status, memo) < period - OPTIONS.tick_s / 2:
        return
    async with _object_lock(memo):
        memo.last_evaluation = now
        with api_errors():
            sync = await reconcile.sync_objects(memo.api, pipeline, status)
            scaled = await reconcile.autoscale(memo.api, pipeline, sync, status, now)
    new_status = reconcile.status_for(pipeline, status, sync, scaled, now)
    patch.status.update(new_status)
    _announce_sync(body, sync)
    for change in scaled.changes:
        d = change.decision
        kopf.event(
            body,
            type="Normal",
            reason="ScaledUp" if d.direction == "up" else "ScaledDown",
            message=f"node {change.node} GPU {change.gpu}: workers {d.current} -> {d.desired} "
            f"({d.reason}: {d.message})",
        )
    was_active = next(
        (c.get("status") for c in status.get("conditions") or [] if c["type"] == "ScalingActive"),
        None,
    )
    now_active = next(c for c in new_status["conditions"] if c["type"] == "ScalingActive")
    if now_active["status"] == "False" and was_active != "False":
        kopf.event(body, type="Warning", reason=now_active["reason"], message=now_active["message"])
    logger.debug(f"autoscaled: {[(d.node, d.gpu, d.decision.reason) for d in scaled.daemons]}")
