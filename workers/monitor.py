"""The Celery worker's main process: metrics for all pool children, and housekeeping.

Metrics. Pool children are separate processes, so their samples are collected with
``prometheus_client``'s multiprocess mode: :func:`setup_multiprocess` (called before
anything imports ``prometheus_client``, at ``celeryd_init``) gives this worker its own
directory ``<PROMETHEUS_MULTIPROC_DIR or state dir>/worker-<host>-<pid>`` (wiped at start,
removed at shutdown, directories of dead workers on this host removed too) and every
child writes its samples there. :func:`serve_metrics` exposes the merged samples on
``Settings.metrics_host``:``Settings.worker_metrics_port``, restricted to the families the
worker's role owns (:data:`clipline_core.metrics.OWNERS`: the job workers', or the
callback worker's), with the role's build info and this process's process collectors.
Gauges are merged by summing over processes (jobs in flight per child add up; the
backlog is written by the main process alone), so no ``pid`` label reaches Prometheus.
A dead child's gauges are dropped; its counters and histograms stay (they are
cumulative).

Housekeeping, every :data:`INTERVAL_S` seconds in the main process
(:class:`Monitor`):

* the backlog: task messages waiting in the broker per priority class
  (``clipline_backlog_jobs{priority}``);
* the lease sweeper: jobs whose worker died come back to the queue, or fail with
  ``timeout`` when their attempt ran past the hard time limit
  (:meth:`clipline_core.store.JobStore.expire_leases`);
* the held-message sweeper: a queued job whose message was held in the memory of a
  worker's main process that died (a retry waiting on its countdown, a message not
  started yet), or that is overdue by more than ``job_lease_s``, is sent again, due
  when it was (:meth:`clipline_core.store.JobStore.expire_held`);
* scratch directories whose owning process died (a SIGKILLed child) are removed;
* clips older than ``artifact_ttl_s`` are deleted from the artifact store
  (:meth:`clipline_core.artifacts.ArtifactStore.expire`, every
  :func:`clipline_core.artifacts.sweep_interval_s`);
* metrics files of dead children are dropped.

Alive key: the main process keeps its alive key (``constants.worker_alive_key``) from a
thread of its own, refreshed every third of :func:`alive_ttl_s` (``job_lease_s``, at
least 2 s), so the held-message sweeper of any worker sees a SIGKILLed main process
within about ``job_lease_s`` and re-sends its messages at its next round: a job whose
worker died comes back within about ``job_lease_s`` + :data:`INTERVAL_S`, whether it
was running (its lease) or waiting (its holder's alive key). Messages a worker received
are recorded by :func:`track_received` (the ``task_received`` hook of
:mod:`workers.tasks`). Pool children die with the main process (Celery sets their
parent-death signal to SIGKILL), so their jobs' leases expire too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clipline_core import constants
from clipline_core.procs import pid_alive
from clipline_core.settings import Settings

log = logging.getLogger("clipline.worker")

INTERVAL_S = 5.0
_DIR_RE = re.compile(r"^worker-(?P<host>.+)-(?P<pid>\d+)$")
_FILE_RE = re.compile(r"^(?P<kind>[a-z]+)_(?:(?P<mode>[a-z]+)_)?(?P<pid>\d+)\.db$")


def alive_ttl_s(settings: Settings) -> float:
    """Time-to-live of a worker main process's alive key (refreshed every third of it)."""
    return max(2.0, settings.job_lease_s)


def resend_grace_s(settings: Settings) -> float:
    """How long past due a held message may be before it is sent again."""
    return max(1.0, settings.job_lease_s)


# The store that records received messages, per main process: (pid, store, identity).
_tracker: tuple[int, Any, str] | None = None
_tracker_lock = threading.Lock()


def _main_store(app: Any) -> tuple[Any, str]:
    global _tracker
    with _tracker_lock:
        if _tracker is None or _tracker[0] != os.getpid():
            import redis

            from clipline_core.store import JobStore, holder_identity

            settings: Settings = app.conf.clipline_settings
            client = redis.Redis.from_url(settings.redis_url or app.conf.broker_url)
            store = JobStore(client, settings.deployment, settings.terminal_ttl_s)
            _tracker = (os.getpid(), store, holder_identity())
            if not Monitor.beating:  # before the housekeeping starts: be alive now
                store.keep_alive(_tracker[2], alive_ttl_s(settings))
        return _tracker[1], _tracker[2]


def track_received(app: Any, job_id: str, due_in_s: float) -> bool:
    """This (main) process received ``job_id``'s message, due in ``due_in_s``: record it."""
    store, identity = _main_store(app)
    return bool(store.hold(job_id, identity, due_in_s))


def metrics_base(settings: Settings) -> Path:
    base = os.environ.get(constants.ENV_PROMETHEUS_MULTIPROC_DIR, "")
    if base and _DIR_RE.match(Path(base).name):
        base = str(Path(base).parent)  # inherited from a parent worker: use its base
    return Path(base) if base else Path(settings.state_dir) / settings.deployment / "metrics"


def setup_multiprocess(settings: Settings) -> Path | None:
    """Give this worker process its own multiprocess metrics directory; return it."""
    if "prometheus_client" in sys.modules and not os.environ.get(
        constants.ENV_PROMETHEUS_MULTIPROC_DIR
    ):
        log.warning(
            "prometheus_client was imported before the worker started: "
            "pool children's metrics will not be exported"
        )
        return None
    base = metrics_base(settings)
    host = socket.gethostname()
    try:
        base.mkdir(parents=True, exist_ok=True)
        for old in base.iterdir():
            match = _DIR_RE.match(old.name)
            if match and match["host"] == host and not pid_alive(int(match["pid"])):
                shutil.rmtree(old, ignore_errors=True)
        path = base / f"worker-{host}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
    except OSError as exc:
        log.warning("cannot create the metrics directory under %s: %s", base, exc)
        return None
    os.environ[constants.ENV_PROMETHEUS_MULTIPROC_DIR] = str(path)
    return path


def teardown_multiprocess(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def drop_dead_gauges(path: Path) -> int:
    """Remove gauge files of processes that no longer run; return how many."""
    removed = 0
    try:
        names = os.listdir(path)
    except OSError:
        return 0
    for name in names:
        match = _FILE_RE.match(name)
        if not match or match["kind"] != "gauge" or pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.remove(path / name)
            removed += 1
    return removed


class _MergedCollector:
    """Multiprocess samples of ``families`` with the ``pid`` label summed away.

    Every process of the worker writes files for every metric object it created,
    whichever role owns it (``clipline_core.metrics`` declares them all); only the
    families this worker's role owns are exported.
    """

    def __init__(self, path: Path, families: frozenset[str]) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._inner = MultiProcessCollector(None, path=str(path))
        self._families = families

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import Metric

        for family in self._inner.collect():
            if family.name not in self._families:
                continue
            if not any("pid" in s.labels for s in family.samples):
                yield family
                continue
            merged: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
                key = (s.name, labels)
                merged[key] = merged.get(key, 0.0) + s.value
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for (name, labels), value in sorted(merged.items()):
                out.add_sample(name, dict(labels), value)
            yield out


def serve_metrics(settings: Settings, path: Path | None, role: str = "workers") -> Any:
    """Serve ``/metrics`` (``role``'s metrics from all processes of this worker: the job
    workers' or the callback worker's), ``/healthz`` and ``/readyz`` on
    ``Settings.metrics_host``:``Settings.worker_metrics_port``."""
    from clipline_core import httpserve
    from clipline_core import metrics as m

    if path is None:  # no multiprocess files: this process's own samples
        registry = m.exposition(role)
    else:
        registry = m.exposition(role, [_MergedCollector(path, m.family_names(role))], own=False)
    return httpserve.serve(registry, settings.worker_metrics_port, settings.metrics_host)


def _scratch_owner_dead(d: Path) -> bool:
    from clipline_core.store import holder_is_dead

    try:
        owner = (d / "owner").read_text().strip()
    except OSError:
        return False
    return holder_is_dead(owner)


def sweep_scratch(settings: Settings) -> int:
    """Remove job scratch directories whose owning process died; return how many."""
    root = settings.scratch_path
    removed = 0
    try:
        entries = list(root.iterdir())
    except OSError:
        return 0
    for d in entries:
        if d.is_dir() and _scratch_owner_dead(d):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


class Monitor:
    """The periodic housekeeping of one worker (runs in its main process).

    Creating one starts the alive-key thread (:meth:`close` stops it).
    """

    #: whether a monitor of this process keeps its alive key
    beating = False

    def __init__(self, app: Any, settings: Settings, metrics_dir: Path | None) -> None:
        import redis

        from clipline_core.store import holder_identity
        from workers import callbacks

        self.app = app
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.redis = redis.Redis.from_url(settings.redis_url or app.conf.broker_url)
        self.store = callbacks.job_store(settings, self.redis, app)
        self.ticks = 0
        self._next_sweep = 0.0
        self._artifacts: Any = None
        #: this process as a holder of messages (``host:pid:start``)
        self.identity = holder_identity()
        self._stop = threading.Event()
        self.beat()
        try:  # the backlog gauge is there from the start, not from the first round
            self.update_backlog()
        except Exception as exc:
            log.warning("backlog not measured: %s", exc)
        self._beater = threading.Thread(target=self._beat_loop, name="alive", daemon=True)
        self._beater.start()
        Monitor.beating = True

    def beat(self) -> None:
        """Refresh this process's alive key."""
        self.store.keep_alive(self.identity, alive_ttl_s(self.settings))

    def _beat_loop(self) -> None:
        period = alive_ttl_s(self.settings) / 3
        while not self._stop.wait(period):
            try:
                self.beat()
            except Exception as exc:  # Redis hiccup: the next beat retries
                log.warning("worker alive key not refreshed: %s", exc)

    def close(self) -> None:
        """Stop the alive key (its messages are re-sent by the next sweep anywhere)."""
        self._stop.set()
        self._beater.join(5.0)
        Monitor.beating = False
        with contextlib.suppress(Exception):
            self.store.drop_alive(self.identity)

    def tick(self) -> None:
        """One round of housekeeping; never raises."""
        self.ticks += 1
        steps = (
            self.update_backlog,
            self.recover,
            self.resend_held,
            self.cleanup,
            self.expire_clips,
        )
        for step in steps:
            try:
                step()
            except Exception:
                log.warning("worker housekeeping step %s failed", step.__name__, exc_info=True)

    def update_backlog(self) -> dict[str, int]:
        """``clipline_backlog_jobs{priority}``: task messages waiting in the broker."""
        from clipline_core import metrics as m
        from workers.submit import queue_depths_redis

        depths = queue_depths_redis(self.redis, self.settings.deployment)
        for cls, n in depths.items():
            m.BACKLOG_JOBS.labels(cls).set(n)
        return depths

    def recover(self) -> list[str]:
        """Requeue jobs whose worker died; fail those past the hard time limit."""
        from clipline_core.errors import ClipError, ErrorCode

        err = ClipError(
            ErrorCode.TIMEOUT,
            f"the job did not finish within the time limit of "
            f"{self.settings.job_time_limit_s:.0f} s",
        )
        done = []
        expired = self.store.expire_leases(
            self.settings.job_time_limit_s, err.to_dict(), holder=self.identity
        )
        for e in expired:
            if e.outcome == "requeued":
                self._send(e.job_id, e.priority)
                log.warning("job %s lost its worker; queued it again", e.job_id)
            else:  # the store counted it and enqueued its callback
                log.warning("job %s ran past its time limit; failed it", e.job_id)
            done.append(e.job_id)
        return done

    def resend_held(self) -> list[str]:
        """Send again the messages of queued jobs whose holder died (or that are overdue)."""
        done = []
        for r in self.store.expire_held(resend_grace_s(self.settings), self.identity):
            self._send(r.job_id, r.priority, r.countdown_s)
            if r.reason == "holder_lost":
                log.warning(
                    "job %s: the worker holding its message (%s) stopped; sent it again%s",
                    r.job_id,
                    r.holder or "none",
                    f" (due in {r.countdown_s:.1f} s)" if r.countdown_s > 0.05 else "",
                )
            else:
                log.warning("job %s: its message is overdue; sent it again", r.job_id)
            done.append(r.job_id)
        return done

    def _send(self, job_id: str, priority: str, countdown_s: float = 0.0) -> None:
        """Send ``job_id``'s task (due in ``countdown_s``), then let go of its message."""
        from clipline_core.constants import PriorityClass

        try:
            cls = PriorityClass(priority)
        except ValueError:
            cls = constants.DEFAULT_PRIORITY
        options: dict[str, Any] = {}
        if countdown_s > 0.05:
            options["countdown"] = countdown_s
        self.app.send_task(
            constants.CELERY_TASK_PROCESS_JOB,
            args=[job_id],
            task_id=job_id,  # every message of a job has the job's id
            queue=constants.queue_name(self.settings.deployment),
            priority=cls.celery_priority,
            **options,
        )
        self.store.unhold(job_id, self.identity)

    def cleanup(self) -> None:
        sweep_scratch(self.settings)
        if self.metrics_dir is not None:
            drop_dead_gauges(self.metrics_dir)

    def expire_clips(self) -> list[str]:
        """Delete clips past ``artifact_ttl_s`` (at most every sweep interval)."""
        import time

        from clipline_core import artifacts

        interval = artifacts.sweep_interval_s(self.settings)
        now = time.monotonic()
        if not interval or now < self._next_sweep:
            return []
        self._next_sweep = now + interval
        if self._artifacts is None:
            self._artifacts = artifacts.open_store(self.settings)
        removed = self._artifacts.expire(self.settings.artifact_ttl_s)
        if removed:
            log.info("deleted %d expired clips from the artifact store", len(removed))
        return removed


def timeout_error(limit_s: float) -> dict[str, str]:
    """The ``error`` of a job that ran past its hard time limit."""
    return {
        "code": "timeout",
        "message": f"the job did not finish within the time limit of {limit_s:.0f} s",
    }
