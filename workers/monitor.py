"""The Celery worker's main process: metrics for all pool children, and housekeeping.

Metrics. Pool children are separate processes, so their samples are collected with
``prometheus_client``'s multiprocess mode: :func:`setup_multiprocess` (called before
anything imports ``prometheus_client``, at ``celeryd_init``) gives this worker its own
directory ``<PROMETHEUS_MULTIPROC_DIR or state dir>/worker-<host>-<pid>`` (wiped at start,
removed at shutdown, directories of dead workers on this host removed too) and every
child writes its samples there. :func:`serve_metrics` exposes the merged samples on
``Settings.worker_metrics_port``. Gauges are merged by summing over processes (jobs in
flight per child add up; queue depth is written by the main process alone), so no
``pid`` label reaches Prometheus. A dead child's gauges are dropped; its counters and
histograms stay (they are cumulative).

Housekeeping, every :data:`INTERVAL_S` seconds in the main process
(:class:`Monitor`):

* queue depth per priority class (``clipline_queue_depth{priority}``);
* the lease sweeper: jobs whose worker died come back to the queue, or fail with
  ``timeout`` when their attempt ran past the hard time limit
  (:meth:`clipline_core.store.JobStore.expire_leases`);
* scratch directories whose owning process died (a SIGKILLed child) are removed;
* metrics files of dead children are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clipline_core import constants
from clipline_core.settings import Settings

log = logging.getLogger("clipline.worker")

INTERVAL_S = 5.0
_DIR_RE = re.compile(r"^worker-(?P<host>.+)-(?P<pid>\d+)$")
_FILE_RE = re.compile(r"^(?P<kind>[a-z]+)_(?:(?P<mode>[a-z]+)_)?(?P<pid>\d+)\.db$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
            if match and match["host"] == host and not _alive(int(match["pid"])):
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
        if not match or match["kind"] != "gauge" or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.remove(path / name)
            removed += 1
    return removed


class _MergedCollector:
    """Multiprocess samples with the ``pid`` label summed away."""

    def __init__(self, path: Path) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._inner = MultiProcessCollector(None, path=str(path))

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import Metric

        for family in self._inner.collect():
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


def serve_metrics(port: int, path: Path | None) -> Any:
    """Serve ``/metrics`` (all processes of this worker), ``/healthz`` and ``/readyz``."""
    from prometheus_client import CollectorRegistry

    from clipline_core import httpserve

    if path is None:
        return httpserve.serve(port)  # this process's own registry
    registry = CollectorRegistry()
    registry.register(_MergedCollector(path))
    return httpserve.serve(port, registry=registry)


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
    """The periodic housekeeping of one worker (runs in its main process)."""

    def __init__(self, app: Any, settings: Settings, metrics_dir: Path | None) -> None:
        import redis

        from workers import callbacks

        self.app = app
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.redis = redis.Redis.from_url(settings.redis_url or app.conf.broker_url)
        self.store = callbacks.job_store(settings, self.redis, app)
        self.ticks = 0

    def tick(self) -> None:
        """One round of housekeeping; never raises."""
        self.ticks += 1
        for step in (self.update_queue_depth, self.recover, self.cleanup):
            try:
                step()
            except Exception:
                log.warning("worker housekeeping step %s failed", step.__name__, exc_info=True)

    def update_queue_depth(self) -> dict[str, int]:
        from clipline_core import metrics as m
        from workers.submit import queue_depths_redis

        depths = queue_depths_redis(self.redis, self.settings.deployment)
        for cls, n in depths.items():
            m.QUEUE_DEPTH.labels(cls).set(n)
        return depths

    def recover(self) -> list[str]:
        """Requeue jobs whose worker died; fail those past the hard time limit."""
        from clipline_core.constants import PriorityClass
        from clipline_core.errors import ClipError, ErrorCode

        err = ClipError(
            ErrorCode.TIMEOUT,
            f"the job did not finish within the time limit of "
            f"{self.settings.job_time_limit_s:.0f} s",
        )
        done = []
        for e in self.store.expire_leases(self.settings.job_time_limit_s, err.to_dict()):
            if e.outcome == "requeued":
                try:
                    cls = PriorityClass(e.priority)
                except ValueError:
                    cls = constants.DEFAULT_PRIORITY
                self.app.send_task(
                    constants.CELERY_TASK_PROCESS_JOB,
                    args=[e.job_id],
                    queue=constants.queue_name(self.settings.deployment),
                    priority=cls.celery_priority,
                )
                log.warning("job %s lost its worker; queued it again", e.job_id)
            else:  # the store counted it and enqueued its callback
                log.warning("job %s ran past its time limit; failed it", e.job_id)
            done.append(e.job_id)
        return done

    def cleanup(self) -> None:
        sweep_scratch(self.settings)
        if self.metrics_dir is not None:
            drop_dead_gauges(self.metrics_dir)


def timeout_error(limit_s: float) -> dict[str, str]:
    """The ``error`` of a job that ran past its hard time limit."""
    return {
        "code": "timeout",
        "message": f"the job did not finish within the time limit of {limit_s:.0f} s",
    }
