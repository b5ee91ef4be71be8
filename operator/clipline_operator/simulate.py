"""Closed-loop simulation of GPU nodes fed by CPU workers, driven by the real decision.

An event-driven model of what the operator controls. One global job queue (Redis)
receives chunks at a Poisson rate during the load phase and none afterwards. A node has
one or more GPUs, each with its own GPU daemon, shared-memory arena and worker pods (as
the operator builds them). Each worker pod takes a chunk, spends a jittered CPU time on
it (fetch, decode, preprocess), then needs a free slot in its GPU's arena; when the
arena is full it blocks (that time is the ``shm_reserve_wait`` the operator sees). The
GPU takes up to ``max_batch`` ready chunks at once, is busy ``overhead + per_item x
batch`` seconds (so bigger batches are cheaper per chunk) and frees the slots when the
batch is done. New worker pods start producing after a startup delay.

Every ``periodSeconds`` the simulation computes what Prometheus would report per GPU
(busy ratio and slot-wait ratio over ``windowSeconds``, queue depth) and calls
:func:`clipline_operator.decide.decide_node` for each node (its GPUs share the node's
CPU) with the policy of a defaulted ClipPipeline spec and the recommendation histories
round-tripped through the status format, exactly as the operator does, then applies the
decisions.

``clipline-operator simulate`` runs the default scenario (two one-GPU nodes, one GPU
twice as fast; ``--scenario multi-gpu``: a node with four GPUs, one of them half as
fast, beside a one-GPU node), writes a PNG of utilization and workers per GPU and, with
``--json``, prints the summary the tests and the README quote. A GPU of a one-GPU node is
named after its node, the others ``<node>/gpu<i>``.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from clipline_operator import crd
from clipline_operator.decide import (
    Decision,
    Observation,
    Policy,
    decide_node,
    history_from_status,
    history_to_status,
)


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """One GPU (and its daemon and arena): how fast it serves batches."""

    gpu_overhead_s: float = 0.08
    gpu_per_item_s: float = 0.09
    max_batch: int = 8
    slots: int = 32

    @property
    def capacity(self) -> float:
        """Chunks per second with full batches."""
        return self.max_batch / (self.gpu_overhead_s + self.gpu_per_item_s * self.max_batch)


@dataclasses.dataclass(frozen=True)
class NodeModel:
    """One GPU node: its GPUs and how fast a worker feeds one; its GPUs share the CPU
    (``allocatable_cpu_workers`` worker pods in all)."""

    name: str
    gpus: tuple[GpuModel, ...] = (GpuModel(),)
    worker_item_s: float = 1.0
    worker_jitter: float = 0.3  # sigma of the log-normal factor on each chunk's CPU time
    allocatable_cpu_workers: int | None = 60

    @property
    def capacity(self) -> float:
        """Chunks per second of all its GPUs with full batches."""
        return sum(g.capacity for g in self.gpus)

    def daemon_names(self) -> list[str]:
        """The GPUs' names in the records: the node's for one GPU, else ``<node>/gpu<i>``."""
        if len(self.gpus) == 1:
            return [self.name]
        return [f"{self.name}/gpu{i}" for i in range(len(self.gpus))]


@dataclasses.dataclass(frozen=True)
class Scenario:
    nodes: tuple[NodeModel, ...]
    load_periods: int = 70
    idle_periods: int = 60
    overload: float = 1.15  # arrival rate / total GPU capacity during the load phase
    startup_s: float = 15.0
    initial_workers: int = 1
    seed: int = 7
    spec_autoscaling: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def spec(self) -> dict[str, Any]:
        return crd.with_defaults(
            {
                "image": "clipline:sim",
                "redis": {"secretRef": {"name": "redis"}},
                "autoscaling": dict(self.spec_autoscaling),
            }
        )


def default_scenario() -> Scenario:
    """Two nodes; ``gpu-fast``'s GPU serves batches twice as fast as ``gpu-a``'s."""
    return Scenario(
        nodes=(
            NodeModel("gpu-a"),
            NodeModel("gpu-fast", gpus=(GpuModel(gpu_overhead_s=0.04, gpu_per_item_s=0.045),)),
        )
    )


#: The slow GPU of :func:`multi_gpu_scenario` (half as fast as the others).
SLOW_GPU: Final = "gpu-x4/gpu3"


def multi_gpu_scenario() -> Scenario:
    """``gpu-x4``: four GPUs, the last one half as fast, whose daemons share CPU for 36
    worker pods (an equal split, 9 each, would starve the fast ones); ``gpu-a`` beside it
    with one GPU."""
    slow = GpuModel(gpu_overhead_s=0.16, gpu_per_item_s=0.18)
    quad = (GpuModel(), GpuModel(), GpuModel(), slow)
    return Scenario(
        nodes=(NodeModel("gpu-a"), NodeModel("gpu-x4", gpus=quad, allocatable_cpu_workers=36))
    )


SCENARIOS: Final = {"default": default_scenario, "multi-gpu": multi_gpu_scenario}


@dataclasses.dataclass
class _Worker:
    wid: int
    state: str = "starting"  # starting | idle | busy | blocked
    since: float = 0.0
    epoch: int = 0


@dataclasses.dataclass
class _Node:
    """One GPU daemon: its GPU, arena and workers."""

    model: GpuModel
    node: NodeModel
    name: str
    workers: dict[int, _Worker] = dataclasses.field(default_factory=dict)
    ready_items: int = 0  # chunks in the arena waiting for the GPU
    slots_used: int = 0
    gpu_busy_since: float | None = None
    batch: int = 0
    busy_cum: float = 0.0
    wait_cum: float = 0.0
    blocked: deque[int] = dataclasses.field(default_factory=deque)
    history: list[dict[str, float | int]] = dataclasses.field(default_factory=list)
    samples: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)

    def busy_at(self, now: float) -> float:
        extra = now - self.gpu_busy_since if self.gpu_busy_since is not None else 0.0
        return self.busy_cum + extra

    def wait_at(self, now: float) -> float:
        return self.wait_cum + sum(
            now - w.since for w in self.workers.values() if w.state == "blocked"
        )


@dataclasses.dataclass
class PeriodRecord:
    period: int
    time: float
    utilization: float
    slot_wait_ratio: float
    queue_depth: int
    workers: int
    desired: int
    reason: str
    load: bool


class Simulation:
    """The event-driven model; :meth:`run` returns per-node period records."""

    def __init__(self, scenario: Scenario) -> None:
        self.sc = scenario
        self.rng = random.Random(scenario.seed)
        self.spec = scenario.spec
        self.scaling = self.spec["autoscaling"]
        self.policy = Policy.from_spec(self.scaling)
        self.period_s = float(self.scaling["periodSeconds"])
        self.window_s = float(self.scaling["windowSeconds"])
        #: every GPU daemon by name, node by node
        self.nodes = {
            name: _Node(gpu, m, name)
            for m in scenario.nodes
            for gpu, name in zip(m.gpus, m.daemon_names(), strict=True)
        }
        self.queue = 0
        self.events: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self.seq = itertools.count()
        self.wids = itertools.count()
        self.now = 0.0
        self.records: dict[str, list[PeriodRecord]] = {name: [] for name in self.nodes}
        total_capacity = sum(m.capacity for m in scenario.nodes)
        self.arrival_rate = scenario.overload * total_capacity
        self.load_until = scenario.load_periods * self.period_s

    # -- event plumbing -------------------------------------------------
    def _at(self, t: float, kind: str, *args: Any) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, args))

    def _add_worker(self, node: _Node) -> None:
        w = _Worker(next(self.wids), since=self.now)
        node.workers[w.wid] = w
        self._at(self.now + self.sc.startup_s, "ready", node.name, w.wid, w.epoch)

    def _remove_worker(self, node: _Node) -> None:
        order = {"starting": 0, "idle": 1, "busy": 2, "blocked": 3}
        victim = min(node.workers.values(), key=lambda w: (order[w.state], -w.wid))
        if victim.state in ("busy", "blocked"):
            self.queue += 1  # the chunk goes back to the queue (Celery acks late)
        if victim.state == "blocked":
            node.wait_cum += self.now - victim.since
            node.blocked.remove(victim.wid)
        del node.workers[victim.wid]

    def _start_work(self, node: _Node, w: _Worker) -> None:
        if self.queue > 0:
            self.queue -= 1
            w.state, w.since, w.epoch = "busy", self.now, w.epoch + 1
            m = node.node
            factor = math.exp(self.rng.gauss(-0.5 * m.worker_jitter**2, m.worker_jitter))
            self._at(self.now + m.worker_item_s * factor, "done", node.name, w.wid, w.epoch)
        else:
            w.state, w.since = "idle", self.now

    def _gpu_kick(self, node: _Node) -> None:
        if node.gpu_busy_since is None and node.ready_items > 0:
            m = node.model
            node.batch = min(node.ready_items, m.max_batch)
            node.ready_items -= node.batch
            node.gpu_busy_since = self.now
            self._at(self.now + m.gpu_overhead_s + m.gpu_per_item_s * node.batch, "gpu", node.name)

    def _feed_idle(self) -> None:
        idle = [
            (node, w)
            for node in self.nodes.values()
            for w in node.workers.values()
            if w.state == "idle"
        ]
        self.rng.shuffle(idle)
        for node, w in idle:
            if self.queue <= 0:
                break
            self._start_work(node, w)

    # -- handlers -------------------------------------------------------
    def _on_arrival(self) -> None:
        self.queue += 1
        self._feed_idle()
        if self.now < self.load_until:
            self._at(self.now + self.rng.expovariate(self.arrival_rate), "arrival")

    def _on_ready(self, name: str, wid: int, epoch: int) -> None:
        node = self.nodes[name]
        w = node.workers.get(wid)
        if w is not None and w.state == "starting" and w.epoch == epoch:
            self._start_work(node, w)

    def _on_done(self, name: str, wid: int, epoch: int) -> None:
        node = self.nodes[name]
        w = node.workers.get(wid)
        if w is None or w.epoch != epoch or w.state != "busy":
            return
        if node.slots_used < node.model.slots:
            node.slots_used += 1
            node.ready_items += 1
            self._gpu_kick(node)
            self._start_work(node, w)
        else:
            w.state, w.since = "blocked", self.now
            node.blocked.append(wid)

    def _on_gpu(self, name: str) -> None:
        node = self.nodes[name]
        assert node.gpu_busy_since is not None
        node.busy_cum += self.now - node.gpu_busy_since
        node.gpu_busy_since = None
        node.slots_used -= node.batch
        freed = node.batch
        node.batch = 0
        while freed > 0 and node.blocked:
            w = node.workers[node.blocked.popleft()]
            node.wait_cum += self.now - w.since
            node.slots_used += 1
            node.ready_items += 1
            freed -= 1
            self._start_work(node, w)
        self._gpu_kick(node)

    def _observe(self, node: _Node) -> tuple[Observation, float | None, float]:
        """What Prometheus would report for one GPU daemon now."""
        busy, wait = node.busy_at(self.now), node.wait_at(self.now)
        node.samples.append((self.now, busy, wait))
        # Prometheus-like window: the oldest sample at least window_s old (or the first).
        base = node.samples[0]
        for sample in node.samples:
            if self.now - sample[0] >= self.window_s - 1e-9:
                base = sample
        span = self.now - base[0]
        current = len(node.workers)
        util = (busy - base[1]) / span if span > 0 else None
        wait_ratio = (wait - base[2]) / (span * current) if span > 0 and current else 0.0
        ready = sum(1 for w in node.workers.values() if w.state != "starting")
        obs = Observation(
            current=current,
            utilization=util,
            queue_depth=float(self.queue),
            slot_wait_ratio=wait_ratio,
            ready=ready,
        )
        return obs, util, wait_ratio

    def _on_period(self, k: int) -> None:
        for model in self.sc.nodes:
            daemons = [self.nodes[name] for name in model.daemon_names()]
            seen = [self._observe(d) for d in daemons]
            decisions: tuple[Decision, ...] = decide_node(
                [obs for obs, _, _ in seen],
                self.policy,
                [history_from_status(d.history) for d in daemons],
                self.now,
                model.allocatable_cpu_workers,
            )
            for node, (obs, util, wait_ratio), decision in zip(
                daemons, seen, decisions, strict=True
            ):
                node.history = history_to_status(decision.history)
                self.records[node.name].append(
                    PeriodRecord(
                        period=k,
                        time=self.now,
                        utilization=float("nan") if util is None else util,
                        slot_wait_ratio=wait_ratio,
                        queue_depth=self.queue,
                        workers=obs.current,
                        desired=decision.desired,
                        reason=decision.reason,
                        load=self.now < self.load_until,
                    )
                )
                while len(node.workers) < decision.desired:
                    self._add_worker(node)
                while len(node.workers) > decision.desired:
                    self._remove_worker(node)
        self._feed_idle()

    def run(self) -> dict[str, list[PeriodRecord]]:
        for node in self.nodes.values():
            for _ in range(self.sc.initial_workers):
                self._add_worker(node)
        self._at(self.rng.expovariate(self.arrival_rate), "arrival")
        total = self.sc.load_periods + self.sc.idle_periods
        for k in range(1, total + 1):
            self._at(k * self.period_s, "period", k)
        handlers: dict[str, Callable[..., None]] = {
            "arrival": self._on_arrival,
            "ready": self._on_ready,
            "done": self._on_done,
            "gpu": self._on_gpu,
            "period": self._on_period,
        }
        while self.events:
            t, _, kind, args = heapq.heappop(self.events)
            self.now = t
            handlers[kind](*args)
            if kind == "period" and args[0] == total:
                break
        return self.records


# ---------------------------------------------------------------------------
# Summary and picture.
# ---------------------------------------------------------------------------
SETTLE_WINDOW = 20


def summarize(
    records: Mapping[str, Sequence[PeriodRecord]], policy: Policy
) -> dict[str, dict[str, dict[str, Any]]]:
    """The ``--json`` summary.

    ``settled_period``: first period from which the utilization stays at or above the
    target for the next 3 periods; ``utilization_after_settle``: mean utilization over
    the following :data:`SETTLE_WINDOW` periods (or until the load stops);
    ``changes_after_settle``: worker-count changes in that span; ``workers_after_idle``:
    workers at the end of the idle phase.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, recs in records.items():
        loaded = [r for r in recs if r.load]
        settled: int | None = None
        for i in range(len(loaded) - 3):
            if all(r.utilization >= policy.target for r in loaded[i : i + 3]):
                settled = loaded[i].period
                break
        after = [r for r in loaded if settled is not None and r.period > settled][:SETTLE_WINDOW]
        changes = sum(1 for a, b in itertools.pairwise(after) if a.workers != b.workers)
        out[name] = {
            "settled_period": settled,
            "utilization_after_settle": (
                round(sum(r.utilization for r in after) / len(after), 4) if after else None
            ),
            "changes_after_settle": changes,
            "periods_after_settle": len(after),
            "workers_at_settle": after[0].workers if after else None,
            "max_workers": max(r.workers for r in recs),
            "workers_after_idle": recs[-1].desired,
            "min_workers": policy.min_workers,
        }
    return {"nodes": out}


def plot(
    records: Mapping[str, Sequence[PeriodRecord]], policy: Policy, path: Path, title: str
) -> Path:
    """Write a PNG: per node, GPU utilization and worker count over periods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(records)
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 3.0 * len(names) + 0.6), sharex=True)
    axes_list = [axes] if len(names) == 1 else list(axes)
    handles: list[Any] = []
    for ax, name in zip(axes_list, names, strict=True):
        recs = records[name]
        periods = [r.period for r in recs]
        util = [r.utilization for r in recs]
        workers = [r.workers for r in recs]
        load_end = max((r.period for r in recs if r.load), default=0)
        drained = next((r.period for r in recs if not r.load and r.queue_depth == 0), None)
        shade = ax.axvspan(0, load_end, color="0.93", label="jobs arriving")
        line_u = ax.plot(periods, util, color="tab:blue", label="GPU utilization")[0]
        line_t = ax.axhline(policy.target, color="tab:blue", linestyle=":", label="target")
        if drained is not None:
            ax.axvline(drained, color="0.5", linestyle="--", linewidth=0.8)
            ax.text(drained + 0.5, 0.05, "backlog empty", fontsize=8, color="0.35")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("GPU utilization")
        ax.set_title(name, fontsize=10)
        ax2 = ax.twinx()
        line_w = ax2.step(periods, workers, where="post", color="tab:orange", label="workers")[0]
        ax2.set_ylabel("worker pods")
        ax2.set_ylim(0, max(workers) * 1.15 + 1)
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
        handles = [shade, line_u, line_t, line_w]
    fig.legend(handles, [str(h.get_label()) for h in handles], loc="lower center", ncol=4)
    axes_list[-1].set_xlabel("period")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_default(
    png: Path | None = None, scenario: Scenario | None = None
) -> tuple[dict[str, Any], dict[str, list[PeriodRecord]]]:
    """Run a scenario (default: :func:`default_scenario`), optionally writing the PNG."""
    sc = scenario or default_scenario()
    sim = Simulation(sc)
    records = sim.run()
    summary: dict[str, Any] = dict(summarize(records, sim.policy))
    summary["period_seconds"] = sim.period_s
    summary["target"] = sim.policy.target
    if png is not None:
        plot(
            records,
            sim.policy,
            png,
            f"clipline autoscaler, closed loop (period {sim.period_s:g} s, "
            f"target {sim.policy.target:g})",
        )
    return summary, records
