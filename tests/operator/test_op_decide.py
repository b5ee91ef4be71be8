"""The pure autoscaling decision: each rule of the issue, the bounds, the stabilization
windows, holding on missing data, and a node's GPU daemons sharing its CPU."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from clipline_operator import crd
from clipline_operator.decide import (
    Decision,
    Observation,
    Policy,
    Reason,
    Recommendation,
    decide,
    decide_node,
    history_from_status,
    history_to_status,
    share_budget,
)

POLICY = Policy(up_window_s=0, down_window_s=0)


def obs(
    current: int, util: float | None, queue: float | None = 10, wait: float = 0.0, **kw: Any
) -> Observation:
    return Observation(
        current=current, utilization=util, queue_depth=queue, slot_wait_ratio=wait, **kw
    )


def test_policy_from_defaulted_spec() -> None:
    spec = crd.with_defaults({"image": "x", "redis": {"secretRef": {"name": "r"}}})
    p = Policy.from_spec(spec["autoscaling"])
    assert (p.target, p.min_workers, p.max_workers) == (0.95, 1, 16)
    assert p.down_window_s == 300 and p.max_step_down == 1


def test_starving_gpu_with_backlog_scales_up_in_proportion() -> None:
    d = decide(obs(4, 0.50), POLICY, [], now=0)
    assert (d.direction, d.reason) == ("up", Reason.FEEDERS_SHORT)
    assert d.recommendation == 8  # ceil(4 x 0.95 / 0.50)
    assert d.desired == 8  # within maxStepUp (4)
    small = decide(obs(4, 0.80), POLICY, [], now=0)
    assert small.desired == 5  # ceil(4.75)
    far = decide(obs(2, 0.10), POLICY, [], now=0)
    assert far.recommendation == 16 and far.desired == 6  # step limit 4
    assert far.limited_by == "StepLimit"


def test_opposite_of_hpa_rule() -> None:
    """HPA's ceil(current x util / target) would remove feeders here; we add them."""
    hpa = math.ceil(6 * 0.5 / 0.95)
    d = decide(obs(6, 0.5), POLICY, [], now=0)
    assert hpa < 6 < d.desired


def test_within_tolerance_holds() -> None:
    d = decide(obs(10, 0.93), POLICY, [], now=0)  # 0.95 - 0.03 <= 0.93
    assert (d.direction, d.reason) == ("hold", Reason.AT_TARGET)


def test_no_backlog_scales_down_toward_minimum_gradually() -> None:
    policy = Policy(min_workers=2, max_step_down=1, up_window_s=0, down_window_s=60)
    history: list[Recommendation] = []
    current, seen = 6, []
    for period in range(12):
        d = decide(obs(current, 0.3, queue=0), policy, history, now=period * 30.0)
        assert d.reason == Reason.NO_BACKLOG
        assert current - d.desired <= 1
        history, current = list(d.history), d.desired
        seen.append(current)
    # the 60 s window holds the first two periods (the history is seeded with 6)
    assert seen[:6] == [6, 6, 5, 4, 3, 2]
    assert seen[-1] == 2 and min(seen) == 2


def test_at_target_with_waiting_workers_sheds_feeders() -> None:
    d = decide(obs(10, 1.0, wait=0.4), POLICY, [], now=0)
    assert (d.direction, d.reason) == ("down", Reason.FEEDERS_WAITING)
    assert d.recommendation == 6  # ceil(10 x 0.6 x 0.95)
    assert d.desired == 9  # maxStepDown 1
    # small waits at saturation keep the count (ceil hysteresis)
    assert decide(obs(10, 0.99, wait=0.02), POLICY, [], now=0).desired == 10


def test_starving_gpu_while_feeders_wait_is_not_a_feeder_problem() -> None:
    d = decide(obs(8, 0.3, wait=0.7), POLICY, [], now=0)
    assert (d.desired, d.reason) == (8, Reason.FEEDERS_BLOCKED)


@pytest.mark.parametrize(
    ("observation", "reason"),
    [
        (obs(5, None), Reason.NO_DATA),
        (obs(5, float("nan")), Reason.NO_DATA),
        (obs(5, 0.2, queue=None), Reason.NO_DATA),
        (obs(5, 0.2, queue=float("nan")), Reason.NO_DATA),
        (obs(5, None, queue=None, prometheus_ok=False, error="refused"), Reason.PROMETHEUS_DOWN),
    ],
)
def test_missing_data_holds(observation: Observation, reason: str) -> None:
    d = decide(observation, Policy(min_workers=0), [Recommendation(0, 1)], now=10)
    assert (d.desired, d.direction, d.reason) == (5, "hold", reason)
    assert not d.data_ok
    assert d.history == (Recommendation(0, 1),)  # nothing recorded


def test_missing_data_never_scales_to_zero_but_bounds_still_apply() -> None:
    assert decide(obs(0, None), Policy(min_workers=1), [], now=0).desired == 1
    over = decide(obs(30, None), Policy(max_workers=16), [], now=0)
    assert (over.desired, over.reason) == (16, Reason.BOUNDS)


def test_bounds_and_allocatable_cpu() -> None:
    d = decide(obs(12, 0.2, cpu_cap=14), POLICY, [], now=0)
    assert d.desired == 14 and d.limited_by == "AllocatableCPU"
    m = decide(obs(15, 0.2), POLICY, [], now=0)
    assert m.desired == 16 and m.limited_by == "MaxWorkers"
    tiny = decide(obs(1, 0.2, cpu_cap=0), POLICY, [], now=0)
    assert tiny.desired == 1  # never below one pod for lack of CPU; it stays Pending


def test_no_scale_up_while_pods_are_not_ready() -> None:
    d = decide(obs(4, 0.4, ready=2), POLICY, [], now=0)
    assert (d.desired, d.reason) == (4, Reason.PODS_NOT_READY)
    assert decide(obs(4, 0.4, ready=4), POLICY, [], now=0).desired > 4


def test_up_window_requires_a_sustained_shortfall() -> None:
    policy = Policy(up_window_s=60, down_window_s=0)
    history = [Recommendation(0, 10), Recommendation(30, 10)]
    d = decide(obs(10, 0.8), policy, history, now=60)  # rec 12, but 10 within the window
    assert d.desired == 10 and d.limited_by == "Stabilization"
    history = [Recommendation(0, 12), Recommendation(30, 12)]
    assert decide(obs(10, 0.8), policy, history, now=60).desired == 12


def _noisy_loop(policy: Policy, seed: int) -> tuple[int, int]:
    """A tiny closed loop: the GPU needs 10.3 worker-equivalents; measurements are noisy."""
    rng = random.Random(seed)
    need = 10.3
    history: list[Recommendation] = []
    current, changes = 10, 0
    for period in range(80):
        util = min(1.0, current / need) + rng.uniform(-0.05, 0.05)
        wait = max(0.0, 1 - need / current) + rng.uniform(0.0, 0.08)
        d: Decision = decide(
            obs(current, min(util, 1.0), wait=wait), policy, history, period * 30.0
        )
        changes += d.changed
        history, current = list(d.history), d.desired
    return changes, current


@pytest.mark.parametrize("seed", range(5))
def test_noise_around_the_target_does_not_flap(seed: int) -> None:
    changes, current = _noisy_loop(Policy(up_window_s=30, down_window_s=300), seed)
    assert changes <= 1 and current in (10, 11)
    # The same loop without stabilization windows flaps: the windows are what holds it.
    unstable, _ = _noisy_loop(Policy(up_window_s=0, down_window_s=0), seed)
    assert unstable >= 5


def test_disabled_autoscaling_holds() -> None:
    d = decide(obs(3, 0.1), Policy(enabled=False), [], now=0)
    assert (d.desired, d.reason) == (3, Reason.DISABLED)


def test_history_round_trip_and_pruning() -> None:
    hist = [Recommendation(100.0, 3), Recommendation(200.5, 4)]
    assert history_from_status(history_to_status(hist)) == hist
    assert history_from_status([{"time": "x"}, None, {"time": 1, "workers": 2}]) == [
        Recommendation(1.0, 2)
    ]
    assert history_from_status("garbage") == []
    d = decide(obs(4, 0.95), Policy(up_window_s=30, down_window_s=60), hist, now=250.0)
    assert [r.time for r in d.history] == [200.5, 250.0]  # 100 is older than both windows
    seeded = decide(obs(4, 0.95), Policy(up_window_s=30, down_window_s=60), [], now=250.0)
    assert seeded.history[0].workers == 4 and 250.0 - seeded.history[0].time > 30


# ---------------------------------------------------------------------------
# Several GPU daemons on one node.
# ---------------------------------------------------------------------------
def test_each_gpu_is_decided_from_its_own_utilization() -> None:
    gpus = [obs(4, 0.50), obs(4, 0.97), obs(4, None), obs(4, 0.20, wait=0.6)]
    d = decide_node(gpus, POLICY, [[], [], [], []], now=0)
    assert [x.reason for x in d] == [
        Reason.FEEDERS_SHORT,
        Reason.AT_TARGET,
        Reason.NO_DATA,
        Reason.FEEDERS_BLOCKED,
    ]
    assert [x.desired for x in d] == [8, 4, 4, 4]
    # Alone, each is exactly the single-daemon decision.
    assert d[0] == decide(gpus[0], POLICY, [], now=0)


def test_node_cpu_is_shared_by_its_gpus() -> None:
    # Four GPUs, 24 worker pods of CPU: three starving ones want 8 each, a slow one at
    # target keeps 3: the slow one's spare share goes to the others (7 each), never
    # more than the node holds.
    gpus = [obs(4, 0.50), obs(4, 0.50), obs(4, 0.50), obs(3, 0.97)]
    d = decide_node(gpus, POLICY, [[]] * 4, now=0, cpu_cap=24)
    assert [x.desired for x in d] == [7, 7, 7, 3]
    assert sum(x.desired for x in d) == 24
    assert [x.limited_by for x in d][:3] == ["AllocatableCPU"] * 3
    assert d[3].limited_by is None
    assert "share its CPU" in d[0].message
    # Enough CPU: nothing is limited.
    free = decide_node(gpus, POLICY, [[]] * 4, now=0, cpu_cap=64)
    assert [x.desired for x in free] == [8, 8, 8, 3]


def test_sharing_takes_no_daemon_below_its_step_floor() -> None:
    # One GPU grew to 12 while the others were idle; now all want more than fits. The big
    # one sheds only maxStepDown (1) per period, the others fill what is left.
    policy = Policy(up_window_s=0, down_window_s=0, max_step_down=1)
    gpus = [obs(12, 0.90), obs(2, 0.30), obs(2, 0.30)]
    d = decide_node(gpus, policy, [[]] * 3, now=0, cpu_cap=16)
    assert d[0].desired == 11
    assert sum(x.desired for x in d) == 16
    assert sorted(x.desired for x in d[1:]) == [2, 3]


@pytest.mark.parametrize("seed", range(20))
def test_share_budget_properties(seed: int) -> None:
    rnd = random.Random(seed)
    n = rnd.randint(1, 8)
    wanted = [rnd.randint(0, 20) for _ in range(n)]
    floors = [rnd.randint(0, w) for w in wanted]
    budget = rnd.randint(0, 80)
    out = share_budget(wanted, floors, budget)
    assert all(0 <= o <= w for o, w in zip(out, wanted, strict=True))
    if sum(wanted) <= budget:
        assert out == wanted
        return
    assert sum(out) == budget  # the whole budget is used when there is demand for it
    if sum(floors) <= budget:
        assert all(o >= f for o, f in zip(out, floors, strict=True))
    # Max-min fair: a daemon left below what it wants is never more than one pod
    # behind any other that got more than its floor.
    for i, (o, w) in enumerate(zip(out, wanted, strict=True)):
        if o < w:
            for j, other in enumerate(out):
                if j != i and other > max(floors[j] if sum(floors) <= budget else 0, o):
                    assert other <= o + 1, (wanted, floors, budget, out)
    assert share_budget(wanted, floors, budget) == out  # deterministic
