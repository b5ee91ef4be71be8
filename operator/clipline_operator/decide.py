"""The autoscaling decision: observations + policy + history -> desired workers + reason.

Pure and deterministic (no clock, no I/O), so the operator, the closed-loop simulation
and the tests all run the very same function.

Why not HPA/KEDA: their rule ``ceil(current x metric / target)`` on GPU utilization
would *remove* CPU feeders when the GPU starves. Here utilization is read the other way
round: the GPU is fed by ``current x (1 - slot_wait_ratio)`` worker-equivalents (a
worker blocked on a full arena feeds nothing), so holding the GPU at the target needs
``ceil(effective x target / utilization)`` workers. Per period, per GPU daemon (a node
with N GPUs runs N daemons, each fed by its own workers; :func:`decide` decides one of
them from that GPU's utilization, :func:`decide_node` all of a node's):

1. Prometheus down, utilization or queue depth missing/NaN: **hold** (never scale to
   zero on missing data); only the min/max bounds are enforced.
2. No backlog (queue empty and no worker waiting for a slot): demand-limited;
   recommend the minimum (the stabilization window and ``maxStepDown`` make it gradual).
3. Backlog and utilization below ``target - tolerance``: feeders are short; recommend
   ``ceil(effective x target / utilization)`` (at least one more), unless the workers are
   already mostly blocked on slots (then the GPU side is the bottleneck: hold).
4. Utilization at target: recommend ``min(current, ceil(effective x target /
   utilization))``, i.e. shed the feeders that only wait for free slots.

The raw recommendation is clamped to ``[min, min(max, cpu_cap)]`` (per GPU) and stabilized like
HPA's ``behavior``: scale up only to the lowest recommendation of the last
``scaleUpStabilizationSeconds``, scale down only to the highest of the last
``scaleDownStabilizationSeconds`` (both windows include their boundary and the current
recommendation; an empty history is seeded with the current size, so a restarted
operator never scales down at once); finally at most ``maxStepUp``/``maxStepDown`` per
period. Scale-ups also wait while pods of the previous step are not ready yet.

A node's GPU daemons share its allocatable CPU (``cpu_cap`` of :func:`decide_node`):
when their decisions together ask for more worker pods than fit, the budget is filled
level by level (max-min fairness: every daemon gets up to the same count, a daemon
that wants less keeps its share free for the others; leftover pods go to the daemons
with the fewest, lowest index first), never taking a daemon below what it keeps this
period anyway (its current size less ``maxStepDown``) unless those floors alone exceed
the budget. A slow GPU, satisfied with fewer feeders, so leaves CPU to the fast ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

Direction = Literal["up", "down", "hold"]


class Reason:
    """Bounded set of decision reasons (the ``reason`` label of the decisions counter)."""

    PROMETHEUS_DOWN: Final = "PrometheusUnavailable"
    NO_DATA: Final = "NoData"
    NO_BACKLOG: Final = "NoBacklog"
    FEEDERS_SHORT: Final = "FeedersShort"
    FEEDERS_WAITING: Final = "FeedersWaiting"
    FEEDERS_BLOCKED: Final = "FeedersBlocked"
    AT_TARGET: Final = "AtTarget"
    PODS_NOT_READY: Final = "PodsNotReady"
    BOUNDS: Final = "OutOfBounds"
    DISABLED: Final = "AutoscalingDisabled"

    ALL: Final = (
        PROMETHEUS_DOWN,
        NO_DATA,
        NO_BACKLOG,
        FEEDERS_SHORT,
        FEEDERS_WAITING,
        FEEDERS_BLOCKED,
        AT_TARGET,
        PODS_NOT_READY,
        BOUNDS,
        DISABLED,
    )


#: Slot-wait ratio above which a starving GPU is blamed on the GPU side, not the feeders.
BLOCKED_WAIT_RATIO: Final = 0.5
#: Below this utilization the proportional rule is capped (avoids dividing by ~0).
MIN_UTILIZATION: Final = 0.02
#: How far before the scale-up window a seeded recommendation is placed.
SEED_OFFSET_S: Final = 0.001


@dataclasses.dataclass(frozen=True)
class Policy:
    """The autoscaling knobs of one ClipPipeline (``spec.autoscaling``)."""

    target: float = 0.95
    tolerance: float = 0.03
    min_workers: int = 1
    max_workers: int = 16
    max_step_up: int = 4
    max_step_down: int = 1
    up_window_s: float = 30.0
    down_window_s: float = 300.0
    enabled: bool = True

    @classmethod
    def from_spec(cls, autoscaling: Mapping[str, Any]) -> Policy:
        """Build from a defaulted ``spec.autoscaling`` mapping."""
        return cls(
            target=float(autoscaling["targetGpuUtilization"]),
            tolerance=float(autoscaling["tolerance"]),
            min_workers=int(autoscaling["minWorkersPerGpu"]),
            max_workers=int(autoscaling["maxWorkersPerGpu"]),
            max_step_up=int(autoscaling["maxStepUp"]),
            max_step_down=int(autoscaling["maxStepDown"]),
            up_window_s=float(autoscaling["scaleUpStabilizationSeconds"]),
            down_window_s=float(autoscaling["scaleDownStabilizationSeconds"]),
            enabled=bool(autoscaling.get("enabled", True)),
        )


@dataclasses.dataclass(frozen=True)
class Observation:
    """What one GPU daemon and its workers look like this period.

    ``utilization``: the GPU's busy ratio over the window (None: no data). ``queue_depth``:
    jobs waiting in the queue (shared by all daemons; None: no data). ``slot_wait_ratio``:
    fraction of worker time spent waiting for a free arena slot (None counts as 0: the
    histogram has no series before the first wait). ``prometheus_ok``: False when the
    Prometheus API could not be queried at all.
    """

    current: int
    utilization: float | None
    queue_depth: float | None
    slot_wait_ratio: float | None = 0.0
    ready: int | None = None
    cpu_cap: int | None = None
    prometheus_ok: bool = True
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Recommendation:
    time: float
    workers: int


@dataclasses.dataclass(frozen=True)
class Decision:
    current: int
    desired: int
    direction: Direction
    reason: str
    message: str
    recommendation: int | None
    limited_by: str | None
    history: tuple[Recommendation, ...]

    @property
    def changed(self) -> bool:
        return self.desired != self.current

    @property
    def data_ok(self) -> bool:
        return self.reason not in (Reason.PROMETHEUS_DOWN, Reason.NO_DATA)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def upper_bound(policy: Policy, cpu_cap: int | None) -> tuple[int, str]:
    """The effective maximum and what sets it (``max`` or ``cpu``)."""
    if cpu_cap is not None and max(cpu_cap, 1) < policy.max_workers:
        return max(cpu_cap, 1), "cpu"
    return policy.max_workers, "max"


def _bounded(value: int, policy: Policy, cpu_cap: int | None) -> tuple[int, str | None]:
    high, high_kind = upper_bound(policy, cpu_cap)
    low = min(policy.min_workers, high)
    if value > high:
        return high, "MaxWorkers" if high_kind == "max" else "AllocatableCPU"
    if value < low:
        return low, "MinWorkers"
    return value, None


def _prune(history: Iterable[Recommendation], now: float, keep_s: float) -> list[Recommendation]:
    return [r for r in history if now - r.time <= keep_s and r.time <= now]


def _raw(obs: Observation, policy: Policy) -> tuple[int, str, str]:
    """The unstabilized recommendation for a node with valid data."""
    assert obs.utilization is not None and obs.queue_depth is not None
    util = float(obs.utilization)
    queue = float(obs.queue_depth)
    wait = float(obs.slot_wait_ratio) if obs.slot_wait_ratio is not None else 0.0
    wait = wait if math.isfinite(wait) else 0.0
    wait = min(max(wait, 0.0), 1.0)
    util = min(max(util, 0.0), 1.0)
    current = obs.current
    backlog = queue > 0.0 or wait > 0.0
    if not backlog:
        return (
            policy.min_workers,
            Reason.NO_BACKLOG,
            f"no backlog (queue empty, no slot waits); utilization {util:.2f} is demand-limited",
        )
    effective = current * (1.0 - wait)
    if util < policy.target - policy.tolerance:
        if current == 0:
            return 1, Reason.FEEDERS_SHORT, f"backlog {queue:g} and no workers"
        if wait >= BLOCKED_WAIT_RATIO:
            return (
                current,
                Reason.FEEDERS_BLOCKED,
                f"utilization {util:.2f} below target but workers wait {wait:.0%} of the "
                "time for slots: the GPU side is the bottleneck",
            )
        need = math.ceil(effective * policy.target / max(util, MIN_UTILIZATION) - 1e-9)
        return (
            max(current + 1, need),
            Reason.FEEDERS_SHORT,
            f"utilization {util:.2f} < {policy.target:.2f} - {policy.tolerance:.2f} with "
            f"backlog {queue:g}: feeders are short",
        )
    need = math.ceil(effective * policy.target / max(util, MIN_UTILIZATION) - 1e-9)
    if need < current:
        return (
            need,
            Reason.FEEDERS_WAITING,
            f"utilization {util:.2f} at target while workers wait {wait:.0%} of the time "
            f"for free slots: {need} suffice",
        )
    return current, Reason.AT_TARGET, f"utilization {util:.2f} at target"


def decide(
    obs: Observation,
    policy: Policy,
    history: Sequence[Recommendation],
    now: float,
) -> Decision:
    """Decide one GPU daemon's worker count for this period (see the module docstring)."""
    current = max(0, int(obs.current))
    keep = max(policy.up_window_s, policy.down_window_s)
    past = _prune(history, now, keep)

    def hold(reason: str, message: str) -> Decision:
        bounded, limit = _bounded(current, policy, obs.cpu_cap)
        if bounded != current:
            message += f"; bounds move {current} -> {bounded}"
        return Decision(
            current=current,
            desired=bounded,
            direction=_direction(current, bounded),
            reason=reason if bounded == current else Reason.BOUNDS,
            message=message,
            recommendation=None,
            limited_by=limit,
            history=tuple(past),
        )

    if not policy.enabled:
        return hold(Reason.DISABLED, "autoscaling disabled")
    if not obs.prometheus_ok:
        return hold(
            Reason.PROMETHEUS_DOWN,
            f"Prometheus unavailable ({obs.error or 'no answer'}); holding {current}",
        )
    if not _finite(obs.utilization) or not _finite(obs.queue_depth):
        missing = [
            name
            for name, value in (("utilization", obs.utilization), ("queue depth", obs.queue_depth))
            if not _finite(value)
        ]
        return hold(Reason.NO_DATA, f"no data for {' and '.join(missing)}; holding {current}")

    raw, reason, message = _raw(obs, policy)
    raw, limited_by = _bounded(raw, policy, obs.cpu_cap)
    if not past and policy.down_window_s > policy.up_window_s:
        # No history (new pipeline, or the operator was away longer than the windows):
        # like HPA, count the current size as recommended, here just before the
        # scale-up window, so it blocks premature scale-downs but not scale-ups.
        past = [Recommendation(now - policy.up_window_s - SEED_OFFSET_S, current)]
    recs = [*past, Recommendation(now, raw)]

    # HPA-style stabilization on the recorded recommendations.
    up_floor = min(r.workers for r in recs if now - r.time <= policy.up_window_s)
    down_ceiling = max(r.workers for r in recs if now - r.time <= policy.down_window_s)
    stabilized = current
    if stabilized < up_floor:
        stabilized = up_floor
    if stabilized > down_ceiling:
        stabilized = down_ceiling
    if stabilized != raw and limited_by is None:
        limited_by = "Stabilization"

    desired = min(stabilized, current + policy.max_step_up)
    desired = max(desired, current - policy.max_step_down)
    if desired != stabilized:
        limited_by = "StepLimit"
    if desired > current and obs.ready is not None and obs.ready < current:
        desired = current
        reason = Reason.PODS_NOT_READY
        message = f"{obs.ready}/{current} worker pods ready; waiting before adding more"
        limited_by = "PodsNotReady"
    # Bounds win over steps (e.g. the spec's maximum was lowered).
    desired, bound = _bounded(desired, policy, obs.cpu_cap)
    limited_by = bound or limited_by
    return Decision(
        current=current,
        desired=desired,
        direction=_direction(current, desired),
        reason=reason,
        message=message,
        recommendation=raw,
        limited_by=limited_by,
        history=tuple(recs),
    )


def share_budget(wanted: Sequence[int], floors: Sequence[int], budget: int | None) -> list[int]:
    """Worker pods per daemon within ``budget`` (see the module docstring).

    ``wanted[i]``: what daemon *i*'s own decision asks for; ``floors[i]`` (at most
    ``wanted[i]``): what it keeps whatever the others want. Pure and deterministic.
    """
    want = [max(0, int(w)) for w in wanted]
    if budget is None or sum(want) <= budget:
        return want
    budget = max(0, int(budget))
    keep = [min(max(0, int(f)), w) for f, w in zip(floors, want, strict=True)]
    if sum(keep) > budget:
        keep = [0] * len(want)

    def filled(level: int) -> list[int]:
        return [min(w, max(k, level)) for w, k in zip(want, keep, strict=True)]

    low, high = 0, max(want)
    while low < high:  # the highest level whose allocation fits
        mid = (low + high + 1) // 2
        if sum(filled(mid)) <= budget:
            low = mid
        else:
            high = mid - 1
    out = filled(low)
    left = budget - sum(out)
    for i in sorted(range(len(out)), key=lambda j: (out[j], j)):
        if left <= 0:
            break
        if out[i] < want[i]:
            out[i] += 1
            left -= 1
    return out


def decide_node(
    gpus: Sequence[Observation],
    policy: Policy,
    histories: Sequence[Sequence[Recommendation]],
    now: float,
    cpu_cap: int | None = None,
) -> tuple[Decision, ...]:
    """Decide every GPU daemon of one node: :func:`decide` per daemon (each bounded by
    the node's ``cpu_cap`` alone), then :func:`share_budget` of ``cpu_cap`` among them."""
    own = [
        decide(dataclasses.replace(obs, cpu_cap=cpu_cap), policy, history, now)
        for obs, history in zip(gpus, histories, strict=True)
    ]
    wanted = [d.desired for d in own]
    floors = [min(d.desired, max(d.current - policy.max_step_down, 0)) for d in own]
    shared = share_budget(wanted, floors, cpu_cap)
    out: list[Decision] = []
    for d, desired in zip(own, shared, strict=True):
        if desired == d.desired:
            out.append(d)
            continue
        message = (
            f"{d.message}; the node's {len(own)} GPU daemons share its CPU "
            f"({cpu_cap} worker pods): {desired} here"
        )
        out.append(
            dataclasses.replace(
                d,
                desired=desired,
                direction=_direction(d.current, desired),
                reason=Reason.BOUNDS if desired < d.current <= d.desired else d.reason,
                message=message,
                limited_by="AllocatableCPU",
            )
        )
    return tuple(out)


def _direction(current: int, desired: int) -> Direction:
    if desired > current:
        return "up"
    if desired < current:
        return "down"
    return "hold"


def history_to_status(history: Iterable[Recommendation]) -> list[dict[str, float | int]]:
    return [{"time": round(r.time, 3), "workers": r.workers} for r in history]


def history_from_status(raw: Any) -> list[Recommendation]:
    """Parse ``status.nodes[].recommendations`` leniently (bad entries are dropped)."""
    out: list[Recommendation] = []
    if not isinstance(raw, list):
        return out
    for item in raw:
        try:
            out.append(Recommendation(float(item["time"]), int(item["workers"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out
