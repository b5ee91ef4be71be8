"""``clipline bench chaos``: break the running system on purpose and count what survives.

One command starts a real local stack (:class:`clipline.stack.LocalStack`: the GPU
daemon, a Celery worker with ``W`` prefork children) for each row, runs a fixed batch of
small real jobs (the generated videos of :mod:`clipline_bench.e2e_media`, fetched over
HTTP from 127.0.0.1, each with a completion callback), and injects one fault while the
batch runs. The first row runs the batch with no fault: the throughput the other rows
are compared with. The benchmark only drives the system from outside (signals, its own
Redis, its own HTTP servers) and measures it.

Faults (``--faults`` picks some; ``--short`` runs the CI subset marked *):

* ``child-kill`` * — SIGKILL the pool child holding a job's lease, mid-decode;
* ``parent-kill`` — SIGKILL the Celery worker's main process while its children run
  jobs; the benchmark starts a new worker (``LocalStack.start_one``: a bare
  ``LocalStack`` does not restart children, only ``clipline up``'s supervisor does);
* ``retry-parent-kill`` — a job whose video answers HTTP 503 twice (with
  ``fetch_retries=0`` each 503 fails an attempt, and the task retries itself after a
  Celery countdown): SIGKILL the worker's main process during the second countdown,
  while it holds the retry message, then start a new worker;
* ``daemon-kill`` * — SIGKILL the GPU daemon while jobs are inferring, then start a new
  one as the stack would;
* ``redis-restart`` — SIGKILL the Redis server mid-batch and start it again on the same
  port from its append-only file (the benchmark runs that server itself, with
  ``appendonly yes`` and a password, for every row: the stack's embedded server keeps
  no data, so it cannot be restarted with its jobs);
* ``arena-full`` — a stack with ``shm_slots=2``: far more chunks in flight than slots;
* ``hang-source`` * — one job's video URL accepts the connection and never answers;
* ``trickle-source`` — one job's video URL sends a byte a second, forever;
* ``callback-dead`` — every job's callback URL refuses connections;
* ``callback-slow`` * — every job's callback receiver answers after 5 s;
* ``supervisor-kill`` — ``clipline up`` (detached supervisor, API included), SIGKILL the
  supervisor mid-batch, count the stack's processes still alive ``job_lease_s + 10`` s
  later (then end them), ``clipline up`` again, let the batch finish, ``clipline down``.

Per row:

* **jobs in** — jobs accepted (stored and enqueued);
* **terminal once** — jobs that reached a terminal state and whose terminal transition
  was announced exactly once. Every transition of the job store is one Lua script that
  also PUBLISHes the new state on the job's channel, so the benchmark (subscribed to
  the deployment's channels before the first job) sees every terminal transition,
  including a second one; the callback receiver counts distinct (event, finished_at)
  pairs as a second witness (redeliveries of one event repeat the pair), and polling
  the job hashes catches a job that left a terminal state;
* **lost** — accepted jobs not terminal by the row's deadline (``--deadline`` seconds
  after the fault; the trickle row adds the job soft time limit);
* **dup** — jobs with more than one terminal transition;
* **leaked shm** — files of the row's deployment left in the shared-memory directory
  after the stack stopped;
* **orphans** — processes recorded while the stack ran (its children's sessions and
  their descendants, pid and start time from ``/proc``) still alive after it stopped;
  the benchmark then ends them and removes leaked files, so rows do not pile up;
* **recovery s** — worst over the affected jobs of the time from the fault to the job's
  next progress that the fault blocked: a new claim or a terminal state after a
  worker-side kill (the job must be taken again), inference results (``rendering``), a
  new claim or a terminal state after a daemon kill, any transition after a Redis
  restart or from the first request to a bad source (the worker is free of it again).
  The documented target is ``job_lease_s + 10`` s; a row passes when it is met;
* **throughput** — jobs per minute of the jobs the fault did not touch, over the time
  from submission to the last of them, divided by the fault-free row's (a handful of
  jobs on a shared machine: read it as a rough figure);
* **failed**, **retried** — jobs that ended failed (the JSON has their error codes; a
  bad source's job is expected to), and jobs put back to the queue at least once (the
  JSON has each ``last_error``).

The stack runs with settings that make recovery measurable in seconds:
``job_lease_s=10``, ``fetch_retries=0``, ``fetch_read_timeout_s=5``,
``inference_timeout_s=20``, ``max_attempts=3``, soft/hard time limits 45/55 s, and a
callback secret (loopback callbacks allowed). Output: a table on stdout, the JSON in
``--json`` (default ``bench/results/chaos.json``); the exit code is 1 when any row
breaks an invariant (lost, duplicated, leaked, orphaned) or misses the recovery target.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "chaos.json"
MEDIA_DIR = REPO_ROOT / ".samples" / "bench-chaos"
LEASE_S = 10.0
SLOW_CALLBACK_S = 5.0
ACTIVE_VALUES = ("fetching", "decoding", "inferring", "rendering")
TERMINAL_VALUES = ("succeeded", "failed", "cancelled")


@dataclasses.dataclass(frozen=True)
class Fault:
    name: str
    what: str
    recovery: str | None  # progress that counts as recovered (see PROGRESS), None: no fault time
    short: bool = False
    overrides: tuple[tuple[str, Any], ...] = ()


FAULTS: tuple[Fault, ...] = (
    Fault("child-kill", "SIGKILL the pool child holding a job, mid-decode", "claim", True),
    Fault("parent-kill", "SIGKILL the Celery main process mid-batch, start a new one", "claim"),
    Fault(
        "retry-parent-kill",
        "SIGKILL the Celery main process while a job waits on its retry countdown",
        "claim",
    ),
    Fault("daemon-kill", "SIGKILL the GPU daemon while jobs infer, restart it", "inference", True),
    Fault("redis-restart", "SIGKILL Redis mid-batch, restart it from its AOF", "any"),
    Fault("arena-full", "shm_slots=2: more chunks than slots", None, False, (("shm_slots", 2),)),
    Fault("hang-source", "one job's video URL never answers", "any", True),
    Fault("trickle-source", "one job's video URL sends a byte a second", "any"),
    Fault("callback-dead", "every callback URL refuses connections", None),
    Fault("callback-slow", f"callbacks answered after {SLOW_CALLBACK_S:.0f} s", None, True),
    Fault("supervisor-kill", "SIGKILL `clipline up`'s supervisor, `clipline up` again", "claim"),
)  # fmt: skip
BASELINE = Fault("none", "no fault (the reference batch)", None, True)
#: the states that count as recovered, per kind of fault (None: any transition)
PROGRESS: dict[str, frozenset[str] | None] = {
    "claim": frozenset({"fetching", *TERMINAL_VALUES}),
    "inference": frozenset({"rendering", "fetching", *TERMINAL_VALUES}),
    "any": None,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(f.name for f in FAULTS)
    parser.add_argument(
        "--short",
        "--quick",
        dest="short",
        action="store_true",
        help="CI subset: " + ", ".join(f.name for f in FAULTS if f.short) + ", few jobs",
    )
    parser.add_argument("--jobs", type=int, default=None, help="jobs per batch (6; short: 3)")
    parser.add_argument(
        "--json",
        "--out",
        dest="json_path",
        default=None,
        help=f"where to write the JSON (default {DEFAULT_OUT.relative_to(REPO_ROOT)})",
    )
    parser.add_argument("--faults", default="", help=f"comma-separated subset of: {names}")
    parser.add_argument("--workers", type=int, default=2, help="W: worker children (2)")
    parser.add_argument("--models", default="", help="daemon models (default: Settings.models)")
    parser.add_argument(
        "--lease", type=float, default=LEASE_S, help=f"job_lease_s of the stack ({LEASE_S:g})"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds after the fault by which every job must be terminal (60; short: 45)",
    )
    parser.add_argument("--media-dir", default=None, help=f"job media (default {MEDIA_DIR.name})")


_T0 = time.monotonic()


def _say(msg: str) -> None:
    sys.stderr.write(f"[chaos {time.monotonic() - _T0:6.1f}s] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# One invocation's shared parts.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    run_id: str
    workers: int
    jobs: int
    lease_s: float
    deadline_s: float
    models: str
    redis: Any  # chaos_parts.AofRedis
    sources: Any  # chaos_parts.SourceServer
    callbacks: Any  # chaos_parts.CallbackReceiver (answers at once)
    slow_callbacks: Any  # chaos_parts.CallbackReceiver (answers after SLOW_CALLBACK_S)
    media: list[Any]  # e2e_media.JobInput
    state_root: Path
    callback_secret: str

    def settings(self, fault: Fault) -> Any:
        from clipline_core.settings import Settings

        dep = f"chaos-{self.run_id}-{fault.name}"
        changes: dict[str, Any] = {
            "deployment": dep,
            "redis_url": self.redis.url,
            "state_dir": str(self.state_root / fault.name),
            "worker_concurrency": self.workers,
            "job_lease_s": self.lease_s,
            "allow_loopback": True,
            "fetch_retries": 0,
            "fetch_read_timeout_s": 5.0,
            "inference_timeout_s": 20.0,
            "max_attempts": 3,
            "job_soft_time_limit_s": 45.0,
            "job_time_limit_s": 55.0,
            "callback_secret": self.callback_secret,
            "api_keys": "",
            "api_key_file": "",
            "api_port": 0,
        }
        if self.models:
            changes["models"] = self.models
        changes.update(dict(fault.overrides))
        return Settings.from_env({}).replace(**changes)


@dataclasses.dataclass
class Batch:
    ids: list[str]  # every accepted job, in submission order
    normal: list[str]  # the media jobs
    special: list[str]  # the job a source fault targets
    t_submit: float
    token: str  # the special job's source token


@dataclasses.dataclass
class Injected:
    t: float | None = None  # when the fault struck (monotonic); None: not injected / no time
    affected: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    orphans: dict[int, str] = dataclasses.field(default_factory=dict)  # seen during the row


@dataclasses.dataclass
class Row:
    """What one row needs while its stack runs."""

    ctx: Context
    fault: Fault
    settings: Any
    watcher: Any  # chaos_parts.JobWatcher
    tracker: Any  # chaos_parts.ProcTracker
    client: Any  # redis.Redis
    stack: Any = None  # clipline.stack.LocalStack (None: the supervisor row)
    batch: Batch | None = None
    daemon: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------
# Submitting.
# ---------------------------------------------------------------------------
def _callback_url(ctx: Context, fault: Fault) -> str:
    from clipline_bench.chaos_parts import dead_url

    if fault.name == "callback-dead":
        return dead_url()
    if fault.name == "callback-slow":
        return str(ctx.slow_callbacks.url)
    return str(ctx.callbacks.url)


def submit_batch(row: Row) -> Batch:
    from clipline_core.job import JobSpec
    from clipline_core.store import JobStore
    from workers.app import make_app
    from workers.submit import submit

    ctx, fault = row.ctx, row.fault
    store = JobStore(row.client, row.settings.deployment, 3600)
    app = make_app(row.settings)
    src = ctx.sources
    hook = _callback_url(ctx, fault)
    token = uuid.uuid4().hex[:12]
    first = ctx.media[0]
    special_video = {
        "retry-parent-kill": lambda: src.flaky_url(token, 2, first.video),
        "hang-source": lambda: src.hang_url(token),
        "trickle-source": lambda: src.trickle_url(token),
    }.get(fault.name)

    def spec(video: str, images: Sequence[str]) -> JobSpec:
        return JobSpec(
            video_url=video,
            image_urls=[src.url(i) for i in images],
            duration_s=5.0,
            callback_url=hook,
        )

    ids: list[str] = []
    special: list[str] = []
    normal: list[str] = []
    t_submit = time.monotonic()
    try:
        if special_video is not None:  # first, so it is fetched at once
            job_id, _ = submit(store, app, spec(special_video(), first.images))
            row.watcher.track([job_id])
            special.append(job_id)
            ids.append(job_id)
        for k in range(ctx.jobs):
            inp = ctx.media[k % len(ctx.media)]
            job_id, _ = submit(store, app, spec(src.url(inp.video), inp.images))
            row.watcher.track([job_id])
            normal.append(job_id)
            ids.append(job_id)
    finally:
        app.close()
    return Batch(ids, normal, special, t_submit, token)


# ---------------------------------------------------------------------------
# Faults.
# ---------------------------------------------------------------------------
def _wait_active(row: Row, states: Sequence[str], n: int = 1, timeout_s: float = 60.0) -> bool:
    w = row.watcher
    return bool(w.wait(lambda: len(w.in_states(states)) >= n, timeout_s))


def _restart(row: Row, name: str) -> None:
    """SIGKILL-ed ``name`` is gone: start a new one as the stack would, and track it."""
    row.stack.procs.pop(name, None)
    row.stack.start_one(name, time.monotonic() + 120)
    row.tracker.add_root(row.stack.procs[name].pid)


def _kill_proc(row: Row, name: str) -> float:
    proc = row.stack.procs[name]
    row.tracker.snapshot()
    t = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return t


def inject_child_kill(row: Row) -> Injected:
    if not _wait_active(row, ("decoding", "inferring")):
        return Injected(notes=["no job reached decoding"])
    time.sleep(0.3)
    worker_pid = row.stack.procs["worker"].pid
    row.tracker.snapshot()
    for job in row.watcher.in_states(("decoding", "inferring")):
        pid = row.watcher.holder_pid(job, row.client)
        if pid and pid != worker_pid and pid in row.tracker.pids():
            t = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            return Injected(t, [job], [f"killed child {pid} holding job {job[:8]}"])
    return Injected(notes=["no job held by a pool child of this stack"])


def inject_parent_kill(row: Row) -> Injected:
    n = min(2, row.ctx.workers)
    if not _wait_active(row, ("decoding", "inferring"), n):
        return Injected(notes=[f"fewer than {n} jobs running at once"])
    time.sleep(0.3)
    affected = row.watcher.in_states(ACTIVE_VALUES)
    pid = row.stack.procs["worker"].pid
    t = _kill_proc(row, "worker")
    _restart(row, "worker")
    return Injected(t, affected, [f"killed worker main process {pid}; new worker started"])


def inject_retry_parent_kill(row: Row) -> Injected:
    assert row.batch is not None
    job = row.batch.special[0]
    w = row.watcher

    def requeued_twice() -> bool:
        with w._lock:
            return sum(1 for e in w.events.get(job, []) if e[1] == "queued" and e[2] == "pub") >= 2

    if not w.wait(requeued_twice, 60.0):
        return Injected(notes=["the flaky job was not retried twice"])
    time.sleep(0.5)  # into the 2-s countdown of the third attempt
    if w.states().get(job) != "queued":
        return Injected(notes=["the countdown was over before the kill"])
    affected = [job, *w.in_states(ACTIVE_VALUES)]
    pid = row.stack.procs["worker"].pid
    t = _kill_proc(row, "worker")
    _restart(row, "worker")
    return Injected(t, affected, [f"killed worker main process {pid} during the countdown"])


def inject_daemon_kill(row: Row) -> Injected:
    if not _wait_active(row, ("inferring",)):
        return Injected(notes=["no job reached inferring"])
    time.sleep(0.2)
    affected = row.watcher.in_states(("decoding", "inferring"))
    pid = row.stack.procs["gpu-daemon"].pid
    t = _kill_proc(row, "gpu-daemon")
    _restart(row, "gpu-daemon")
    return Injected(t, affected, [f"killed daemon {pid}; new daemon started"])


def inject_redis_restart(row: Row) -> Injected:
    if not _wait_active(row, ("decoding", "inferring")):
        return Injected(notes=["no job reached decoding"])
    time.sleep(0.3)
    affected = row.watcher.in_states(ACTIVE_VALUES)
    t = row.ctx.redis.restart(down_s=1.0)
    return Injected(t, affected, ["Redis SIGKILLed, down 1 s, restarted from its AOF"])


def inject_bad_source(row: Row) -> Injected:
    assert row.batch is not None
    src, token = row.ctx.sources, row.batch.token
    if not row.watcher.wait(lambda: src.first_request(token) is not None, 60.0, 0.05):
        return Injected(notes=["the bad source was never requested"])
    return Injected(src.first_request(token), list(row.batch.special))


def inject_nothing(row: Row) -> Injected:
    return Injected()


INJECT: dict[str, Callable[[Row], Injected]] = {
    "none": inject_nothing,
    "child-kill": inject_child_kill,
    "parent-kill": inject_parent_kill,
    "retry-parent-kill": inject_retry_parent_kill,
    "daemon-kill": inject_daemon_kill,
    "redis-restart": inject_redis_restart,
    "arena-full": inject_nothing,
    "hang-source": inject_bad_source,
    "trickle-source": inject_bad_source,
    "callback-dead": inject_nothing,
    "callback-slow": inject_nothing,
}


# ---------------------------------------------------------------------------
# Running a row.
# ---------------------------------------------------------------------------
def _deadline(row: Row, inj: Injected) -> float:
    assert row.batch is not None
    start = inj.t if inj.t is not None else row.batch.t_submit
    extra = row.settings.job_soft_time_limit_s if row.fault.name == "trickle-source" else 0.0
    return start + row.ctx.deadline_s + extra


def _finish_batch(row: Row, inj: Injected) -> dict[str, str]:
    """Wait until every job is terminal or the deadline; the final states from Redis."""
    from clipline_core import constants

    assert row.batch is not None
    ids = row.batch.ids
    w = row.watcher
    remaining = _deadline(row, inj) - time.monotonic()
    if not w.wait(lambda: w.all_terminal(ids), max(0.0, remaining), 0.1):
        _say(f"{row.fault.name}: deadline reached with jobs not terminal")
    if row.fault.name not in ("callback-dead", "callback-slow"):  # the second witness
        cb = row.ctx.callbacks
        w.wait(lambda: cb.deliveries(ids) >= len(ids), 3.0, 0.1)
    pipe = row.client.pipeline(transaction=False)
    for j in ids:
        pipe.hget(constants.job_key(row.settings.deployment, j), "state")
    return {j: (s or b"").decode() for j, s in zip(ids, pipe.execute(), strict=True)}


def _daemon_counts(row: Row) -> dict[str, Any]:
    """The (last) daemon's item and batch counters: the arena row batches at most 2."""
    from clipline_core import constants

    key = constants.daemon_heartbeat_key(row.settings.deployment, row.settings.node_name)
    raw = {k.decode(): v.decode() for k, v in row.client.hgetall(key).items()}
    items, batches = int(raw.get("items", 0) or 0), int(raw.get("batches", 0) or 0)
    return {
        "items": items,
        "batches": batches,
        "mean_batch": round(items / batches, 2) if batches else None,
    }


def _codes(row: Row, final: dict[str, str]) -> dict[str, int]:
    from clipline_core import constants

    codes: collections.Counter[str] = collections.Counter()
    for j, state in final.items():
        if state == "failed":
            raw = row.client.hget(constants.job_key(row.settings.deployment, j), "error")
            try:
                codes[json.loads(raw or b"{}").get("code", "?")] += 1
            except ValueError:
                codes["?"] += 1
    return dict(codes)


def measure(
    row: Row,
    inj: Injected,
    final: dict[str, str],
    orphans: dict[int, str],
    leaked: list[str],
    wall_s: float,
) -> dict[str, Any]:
    assert row.batch is not None
    b, w, ctx, fault = row.batch, row.watcher, row.ctx, row.fault
    terminal = [j for j in b.ids if final.get(j) in TERMINAL_VALUES]
    duplicated, once, unobserved = [], 0, 0
    for j in b.ids:
        n = max(
            w.published_terminal[j],
            ctx.callbacks.terminal_transitions(j) + ctx.slow_callbacks.terminal_transitions(j),
        )
        if w.poll_anomalies[j]:
            n = max(n, 2)
        if n > 1:
            duplicated.append(j)
        elif j in terminal:
            once += 1
            unobserved += n == 0
    target = ctx.lease_s + 10.0
    recovery: float | None = None
    unrecovered: list[str] = []
    if fault.recovery is not None and inj.t is not None:
        wanted = PROGRESS[fault.recovery]
        times = []
        for j in inj.affected:
            t = w.first_after(j, inj.t, wanted)
            if t is None:
                unrecovered.append(j)
            else:
                times.append(t - inj.t)
        recovery = round(max(times), 2) if times and not unrecovered else None
    unaffected = [j for j in b.normal if j not in inj.affected]
    done = [w.terminal_at(j) for j in unaffected if final.get(j) == "succeeded"]
    done_t = [t for t in done if t is not None]
    span = max(done_t) - b.t_submit if done_t else 0.0
    throughput = round(len(done_t) / span * 60.0, 2) if span > 0 else 0.0
    failures: list[str] = []
    injected = fault.name == "none" or fault.recovery is None or inj.t is not None
    if not injected:
        failures.append("fault not injected")
    lost = len(b.ids) - len(terminal)
    if lost:
        failures.append(f"{lost} lost")
    if duplicated:
        failures.append(f"{len(duplicated)} duplicated")
    if leaked:
        failures.append(f"{len(leaked)} shm files leaked")
    if orphans:
        failures.append(f"{len(orphans)} orphan processes")
    if fault.recovery is not None and inj.t is not None:
        if unrecovered:
            failures.append(f"{len(unrecovered)} affected jobs never recovered")
        elif recovery is not None and recovery > target:
            failures.append(f"recovery {recovery:.1f} s > target {target:.0f} s")
    return {
        "fault": fault.name,
        "what": fault.what,
        "deployment": row.settings.deployment,
        "jobs_in": len(b.ids),
        "terminal_once": once,
        "lost": lost,
        "duplicated": len(duplicated),
        "leaked_shm": len(leaked),
        "leaked_files": leaked,
        "orphans": len(orphans),
        "orphan_processes": [f"{pid} {cmd}" for pid, cmd in sorted(orphans.items())],
        "recovery_s": recovery,
        "recovery_kind": fault.recovery,
        "recovery_target_s": target if fault.recovery else None,
        "affected": len(inj.affected),
        "unrecovered": len(unrecovered),
        "unaffected_jobs": len(unaffected),
        "throughput_jobs_per_min": throughput,
        "throughput_ratio": None,  # filled in against the fault-free row
        "succeeded": sum(1 for j in b.ids if final.get(j) == "succeeded"),
        "failed": sum(1 for j in b.ids if final.get(j) == "failed"),
        "failed_codes": _codes(row, final),
        "retried": sum(1 for j in b.ids if w.retry_reasons.get(j)),
        "retry_reasons": dict(
            collections.Counter(r for j in b.ids for r in w.retry_reasons.get(j, ()))
        ),
        "terminal_unobserved": unobserved,
        "pubsub_disconnects": w.disconnects,
        "callbacks_received": ctx.callbacks.deliveries(b.ids)
        + ctx.slow_callbacks.deliveries(b.ids),
        "daemon": row.daemon,
        "timelines": _timelines(w, inj),
        "notes": inj.notes,
        "wall_s": round(wall_s, 1),
        "ok": not failures,
        "failures": failures,
    }


def _timelines(w: Any, inj: Injected) -> dict[str, list[tuple[float, str, str]]]:
    """The affected jobs' transitions, seconds from the fault (job id prefix -> events)."""
    if inj.t is None:
        return {}
    with w._lock:
        return {
            j[:8]: [(round(t - inj.t, 2), s, src) for t, s, src in w.events.get(j, [])]
            for j in inj.affected
        }


def _leftovers(row: Row, dep: str, extra_orphans: dict[int, str]) -> tuple[dict[int, str], list]:
    """After the stack stopped: orphans and leaked shm files (then cleaned up)."""
    from clipline_bench.chaos_parts import remove_shm, shm_entries, wait_gone

    orphans = dict(extra_orphans)
    orphans.update(wait_gone(row.tracker, row.tracker.pids(), 3.0))
    row.tracker.kill(orphans)
    leaked = shm_entries(row.settings.shm_dir, dep)
    remove_shm(row.settings.shm_dir, leaked)
    return orphans, leaked


def run_stack_row(ctx: Context, fault: Fault) -> dict[str, Any]:
    import redis

    from clipline.stack import LocalStack
    from clipline_bench.chaos_parts import JobWatcher, ProcTracker

    t_row = time.monotonic()
    settings = ctx.settings(fault)
    row = Row(
        ctx,
        fault,
        settings,
        JobWatcher(ctx.redis.url, settings.deployment).start(),
        ProcTracker().start(),
        redis.Redis.from_url(ctx.redis.url, socket_connect_timeout=2.0),
    )
    row.stack = LocalStack(settings, workers=ctx.workers)
    inj = Injected()
    final: dict[str, str] = {}
    try:
        _say(f"{fault.name}: starting the stack ({settings.deployment})")
        row.settings = row.stack.start(timeout_s=120.0)
        for proc in row.stack.procs.values():
            row.tracker.add_root(proc.pid)
        row.batch = submit_batch(row)
        _say(f"{fault.name}: {len(row.batch.ids)} jobs submitted")
        inj = INJECT[fault.name](row)
        for note in inj.notes:
            _say(f"{fault.name}: {note}")
        final = _finish_batch(row, inj)
        row.daemon = _daemon_counts(row)
    except BaseException:
        for name in ("gpu-daemon", "worker"):
            _say(f"{fault.name}: {name} log (tail):\n{row.stack.log_tail(name, 30)}")
        raise
    finally:
        row.stack.stop()
        row.watcher.stop()
        row.tracker.snapshot()
        row.tracker.stop()
    orphans, leaked = _leftovers(row, settings.deployment, inj.orphans)
    out = measure(row, inj, final, orphans, leaked, time.monotonic() - t_row)
    row.client.close()
    return out


# ---------------------------------------------------------------------------
# The supervisor row: `clipline up`, kill -9 the supervisor, `clipline up` again.
# ---------------------------------------------------------------------------
def _cli(args: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipline.cli", *args],
        env=env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _up(row: Row, env: dict[str, str]) -> dict[str, Any]:
    from clipline.stack import read_state

    done = _cli(["up", "--workers", str(row.ctx.workers), "--timeout", "120"], env, 150)
    state = read_state(row.settings)
    if done.returncode != 0 or state is None:
        raise RuntimeError(f"`clipline up` failed: {done.stdout[-800:]} {done.stderr[-1500:]}")
    row.tracker.add_root(int(state["supervisor_pid"]))
    for pid in state["pids"].values():
        row.tracker.add_root(int(pid))
    return state


def run_supervisor_row(ctx: Context, fault: Fault) -> dict[str, Any]:
    import redis

    from clipline.stack import read_state
    from clipline_bench.chaos_parts import JobWatcher, ProcTracker, wait_gone

    t_row = time.monotonic()
    settings = ctx.settings(fault)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    env.pop("REDIS_URL", None)
    env.update(settings.to_env())
    env["PYTHONUNBUFFERED"] = "1"
    row = Row(
        ctx,
        fault,
        settings,
        JobWatcher(ctx.redis.url, settings.deployment).start(),
        ProcTracker().start(),
        redis.Redis.from_url(ctx.redis.url, socket_connect_timeout=2.0),
    )
    inj = Injected()
    final: dict[str, str] = {}
    try:
        _say(f"{fault.name}: `clipline up` ({settings.deployment})")
        first = _up(row, env)
        row.batch = submit_batch(row)
        _say(f"{fault.name}: {len(row.batch.ids)} jobs submitted")
        if _wait_active(row, ("decoding", "inferring")):
            time.sleep(0.3)
            affected = row.watcher.in_states(ACTIVE_VALUES)
            row.tracker.snapshot()
            old = row.tracker.pids()
            sup = int(first["supervisor_pid"])
            t = time.monotonic()
            os.kill(sup, signal.SIGKILL)
            grace = ctx.lease_s + 10.0
            left = wait_gone(row.tracker, old, grace)
            inj = Injected(t, affected, [f"killed supervisor {sup}"], left)
            if left:
                _say(f"{fault.name}: {len(left)} processes still alive {grace:.0f} s after")
                row.tracker.kill(left)
                wait_gone(row.tracker, left, 5.0)
            _up(row, env)
            _say(f"{fault.name}: `clipline up` again")
        else:
            inj = Injected(notes=["no job reached decoding"])
        final = _finish_batch(row, inj)
    finally:
        if read_state(settings) is not None:
            done = _cli(["down", "--timeout", "60"], env, 90)
            if done.returncode != 0:
                _say(f"{fault.name}: `clipline down` failed: {done.stderr[-800:]}")
        row.watcher.stop()
        row.tracker.snapshot()
        row.tracker.stop()
    orphans, leaked = _leftovers(row, settings.deployment, inj.orphans)
    out = measure(row, inj, final, orphans, leaked, time.monotonic() - t_row)
    row.client.close()
    return out


# ---------------------------------------------------------------------------
# The table, the JSON, the command.
# ---------------------------------------------------------------------------
COLUMNS = (
    ("fault", "fault"),
    ("jobs in", "jobs_in"),
    ("terminal once", "terminal_once"),
    ("lost", "lost"),
    ("dup", "duplicated"),
    ("leaked shm", "leaked_shm"),
    ("orphans", "orphans"),
    ("recovery s", "recovery_s"),
    ("throughput", "throughput_ratio"),
    ("failed", "failed"),
    ("retried", "retried"),
    ("ok", "ok"),
)


def _cell(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if key == "recovery_s":
        if row.get("recovery_kind") is None:
            return "-"
        if v is None:
            return "never" if row.get("unrecovered") else "-"
        return f"{v:.1f}"
    if key == "throughput_ratio":
        return "-" if v is None else f"{v:.2f}x"
    if key == "ok":
        return "yes" if v else "NO"
    return str(v)


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    cells = [[_cell(r, k) for _, k in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(COLUMNS)]
    line = " | ".join(h.ljust(w) for (h, _), w in zip(COLUMNS, widths, strict=True))
    out = [line, "-+-".join("-" * w for w in widths)]
    for c in cells:
        out.append(" | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)))
    cfg = result["config"]
    out.append(
        f"W = {cfg['workers']}, {cfg['jobs']} jobs a batch, job_lease_s = {cfg['job_lease_s']:g}, "
        f"recovery target {cfg['recovery_target_s']:g} s; throughput: unaffected jobs/min "
        f"against the fault-free row ({result['rows'][0]['throughput_jobs_per_min']} jobs/min)"
    )
    for r in rows:
        if r["failures"]:
            out.append(f"  {r['fault']}: {'; '.join(r['failures'])}")
    return "\n".join(out)


def _selected(args: argparse.Namespace) -> list[Fault]:
    by_name = {f.name: f for f in FAULTS}
    if args.faults:
        names = [n.strip() for n in args.faults.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown faults: {', '.join(unknown)}; known: {', '.join(by_name)}")
        return [by_name[n] for n in names]
    return [f for f in FAULTS if f.short or not args.short]


def run(args: argparse.Namespace) -> int:
    from clipline_bench.chaos_parts import AofRedis, CallbackReceiver, SourceServer
    from clipline_bench.e2e_media import build_jobset

    faults = _selected(args)
    jobs = args.jobs or (3 if args.short else 6)
    deadline = args.deadline or (45.0 if args.short else 60.0)
    media_dir = Path(args.media_dir) if args.media_dir else MEDIA_DIR
    media = build_jobset(media_dir, quick=True)
    state_root = Path(tempfile.mkdtemp(prefix="clipline-chaos-"))
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        with (
            AofRedis() as server,
            SourceServer(media_dir) as sources,
            CallbackReceiver() as hooks,
            CallbackReceiver(delay_s=SLOW_CALLBACK_S) as slow_hooks,
        ):
            ctx = Context(
                run_id=uuid.uuid4().hex[:6],
                workers=args.workers,
                jobs=jobs,
                lease_s=args.lease,
                deadline_s=deadline,
                models=args.models,
                redis=server,
                sources=sources,
                callbacks=hooks,
                slow_callbacks=slow_hooks,
                media=media,
                state_root=state_root,
                callback_secret=secrets.token_hex(32),
            )
            for fault in [BASELINE, *faults]:
                runner = run_supervisor_row if fault.name == "supervisor-kill" else run_stack_row
                row = runner(ctx, fault)
                rows.append(row)
                _say(
                    f"{fault.name}: {'ok' if row['ok'] else '; '.join(row['failures'])} "
                    f"({row['wall_s']:.0f} s)"
                )
    finally:
        shutil.rmtree(state_root, ignore_errors=True)
    base = rows[0]["throughput_jobs_per_min"]
    for r in rows:
        tp = r["throughput_jobs_per_min"]
        r["throughput_ratio"] = round(tp / base, 3) if base and r["unaffected_jobs"] else None
    result = {
        "benchmark": "chaos",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": {
            "short": bool(args.short),
            "workers": args.workers,
            "jobs": jobs,
            "job_lease_s": args.lease,
            "recovery_target_s": args.lease + 10.0,
            "deadline_s": deadline,
            "models": ctx.settings(BASELINE).models,
            "faults": [f.name for f in faults],
            "settings": {
                k: getattr(ctx.settings(BASELINE), k)
                for k in (
                    "fetch_retries",
                    "fetch_read_timeout_s",
                    "inference_timeout_s",
                    "max_attempts",
                    "job_soft_time_limit_s",
                    "job_time_limit_s",
                    "visibility_timeout_s",
                    "shm_slots",
                )
            },
            "redis": "own server, appendonly yes, password (restartable on its port)",
        },
        "rows": rows,
        "wall_s": round(time.monotonic() - t0, 1),
        "ok": all(r["ok"] for r in rows),
    }
    out = Path(args.json_path) if args.json_path else DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    with contextlib.suppress(ValueError):
        out = out.resolve().relative_to(REPO_ROOT)
    print(f"JSON: {out}   ({result['wall_s']:.0f} s)")
    return 0 if result["ok"] else 1
