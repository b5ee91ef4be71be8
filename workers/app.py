r"""The Celery application of the CPU workers (``celery -A workers.app worker``).

Owns :func:`make_app` (the app for a given :class:`Settings`, built when called, never at
import), :func:`worker_argv` (the one Celery worker command line) and the worker's
signal handlers. The tasks (:mod:`workers.tasks`, :mod:`workers.callbacks`) are
``shared_task``\ s that read their settings from the app that runs them, so nothing
imports this module to reach "the" app. ``celery -A workers.app`` asks for the module's
``app`` attribute, which is built from the environment on that first access. Must not
import the tasks, the pipeline or the callbacks (they sit above it).

Delivery semantics on the Redis transport, and why each setting is what it is:

* Priorities: Kombu's Redis transport emulates priorities with one list per step and
  treats 0 as the highest. By default it has only four steps (0, 3, 6, 9), so
  ``priority_steps`` is set to all ten; the classes map to 0/4/8
  (:class:`clipline_core.constants.PriorityClass`). A task sent without a priority would
  land in the top step, so ``task_default_priority`` is the normal class. Within a
  step the list is FIFO: earlier requests first. Across concurrent pool children the
  order is approximate (each child takes the next message when it is free).
* ``worker_prefetch_multiplier=1`` so a child never hoards jobs others could start.
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only
  after the job ran; a killed pool child's message goes back to the queue at once.
* ``visibility_timeout`` longer than the longest allowed job, and a short
  ``unacked_restore_interval`` so messages of a worker that died are restored soon:
  Kombu only scans for them every ``interval * throttle`` seconds (10 x 10 by default),
  so the throttle is 1. Kombu restores a message only once it is older than the
  visibility timeout, so the job's own lease does the fast part: the lease sweeper
  (:mod:`workers.monitor`) re-sends a job whose worker stopped renewing its lease
  within about ``job_lease_s`` + 5 s, and a redelivered task whose lease holder is a dead
  process on this host takes the job over at once.
* The job's own state machine (:mod:`clipline_core.store`) makes redelivery safe: a second
  delivery of a finished or leased job is a no-op.
* Time limits: the soft limit raises inside the task and the job fails with
  ``timeout`` (scratch removed, slots given back); the hard limit kills the child and
  the main process fails the job with ``timeout`` (``task_failure`` with
  ``TimeLimitExceeded``). ``visibility_timeout`` is kept above the hard limit.
* Pool children decode with one OpenCV thread each and never import torch;
  ``OMP_NUM_THREADS=1`` and ``OMP_WAIT_POLICY=PASSIVE`` are set for any native library
  that would otherwise spin up a thread per core in every child.
* Events are on (``worker_send_task_events``, ``task_send_sent_event``), so Flower
  works as is. Metrics of all children are served by the main process
  (:mod:`workers.monitor`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps
from celery.exceptions import TimeLimitExceeded
from celery.signals import (
    import_modules,
    task_failure,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from clipline_core import constants
from clipline_core.settings import Settings

log = logging.getLogger("clipline.worker")


def make_app(settings: Settings) -> Celery:
    app = Celery(
        "clipline",
        broker=settings.redis_url or "redis://127.0.0.1:6379/0",
        include=["workers.tasks", "workers.callbacks"],
    )
    queue = constants.queue_name(settings.deployment)
    visibility = max(settings.visibility_timeout_s, int(settings.job_time_limit_s) + 120)
    app.conf.update(
        task_default_queue=queue,
        task_default_priority=constants.DEFAULT_PRIORITY.celery_priority,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=False,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "priority_steps": constants.CELERY_PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            "sep": ":",
            "visibility_timeout": visibility,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
        task_soft_time_limit=settings.job_soft_time_limit_s or None,  # 0: no soft limit
        task_time_limit=settings.job_time_limit_s or None,
    )
    app.conf.clipline_settings = settings
    app.steps["worker"].add(HousekeepingStep)
    return app


_metrics_dir: Path | None = None


@import_modules.connect
def _prepare_worker(sender: Any = None, **_: object) -> None:
    """Main worker process, before the tasks are imported and before the pool forks."""
    global _metrics_dir
    conf = getattr(sender, "conf", None)
    if conf is None or not getattr(sender.loader, "worker_initialized", False):
        return  # not a worker starting (the API, a CLI importing the tasks, ...)
    if _metrics_dir is not None or not hasattr(conf, "clipline_settings"):
        return
    from workers import monitor

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # decoder chatter is not news
    _metrics_dir = monitor.setup_multiprocess(conf.clipline_settings)


@worker_process_init.connect
def _limit_threads(**_: object) -> None:
    """Pool children decode on one thread each so they never oversubscribe the cores.

    Each child also creates its ``jobs_total`` series at 0, so the first job of every
    status and code shows in ``rate()`` (the children's counters are summed on export).
    """
    import cv2

    from clipline_core import metrics

    cv2.setNumThreads(1)
    metrics.init_job_series()


class HousekeepingStep(bootsteps.StartStopStep):
    """Runs :class:`workers.monitor.Monitor` in the main process and serves metrics."""

    requires = ("celery.worker.components:Hub",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None
        self.monitor: Any = None
        self.http: Any = None

    def start(self, parent: Any) -> None:
        from workers import monitor

        settings: Settings = parent.app.conf.clipline_settings
        self.monitor = monitor.Monitor(parent.app, settings, _metrics_dir)
        if settings.worker_metrics_port:
            self.http = monitor.serve_metrics(settings.worker_metrics_port, _metrics_dir)
        hub = getattr(parent, "hub", None)
        if hub is not None:
            self.tref = hub.call_repeatedly(monitor.INTERVAL_S, self.monitor.tick)
        else:  # pools without an event loop: a timer thread
            import threading

            stop = threading.Event()

            def loop() -> None:
                while not stop.wait(monitor.INTERVAL_S):
                    self.monitor.tick()

            threading.Thread(target=loop, name="housekeeping", daemon=True).start()
            self.tref = stop

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            (self.tref.set if hasattr(self.tref, "set") else self.tref.cancel)()
            self.tref = None
        if self.http is not None:
            self.http.shutdown()
            self.http = None


@task_failure.connect
def _on_hard_time_limit(
    sender: Any = None, exception: BaseException | None = None, args: Any = None, **_: Any
) -> None:
    """The main process killed a child at the hard time limit: fail its job."""
    if not isinstance(exception, TimeLimitExceeded):
        return
    if getattr(sender, "name", "") != constants.CELERY_TASK_PROCESS_JOB or not args:
        return
    import redis

    from clipline_core.job import JobState
    from workers import callbacks, monitor

    celery = sender.app
    settings: Settings = celery.conf.clipline_settings
    job_id = str(args[0])
    store = callbacks.job_store(settings, redis.Redis.from_url(settings.redis_url), celery)
    limit = float(exception.args[0]) if exception.args else settings.job_time_limit_s
    if store.finish(job_id, JobState.FAILED, error=monitor.timeout_error(limit)):
        log.warning("job %s hit the hard time limit; failed it", job_id)


@worker_ready.connect
def _announce_ready(sender: object = None, **_: object) -> None:
    """Tell the local stack (and operators) that this worker consumes its queue."""
    import redis

    celery: Any = getattr(sender, "app", None)
    if celery is None or not hasattr(celery.conf, "clipline_settings"):
        return
    settings: Settings = celery.conf.clipline_settings
    key = constants.worker_heartbeat_key(settings.deployment, settings.node_name)
    client = redis.Redis.from_url(celery.conf.broker_url)
    client.hset(key, mapping={"pid": os.getpid(), "concurrency": settings.worker_concurrency})
    client.expire(key, 24 * 3600)


@worker_shutdown.connect
def _announce_stop(sender: Any = None, **_: object) -> None:
    import redis

    from workers import monitor

    celery: Any = getattr(sender, "app", None)
    if celery is None or not hasattr(celery.conf, "clipline_settings"):
        return
    settings: Settings = celery.conf.clipline_settings
    key = constants.worker_heartbeat_key(settings.deployment, settings.node_name)
    redis.Redis.from_url(celery.conf.broker_url).delete(key)
    monitor.teardown_multiprocess(_metrics_dir)


def worker_argv(settings: Settings, concurrency: int, hostname: str, *extra: str) -> list[str]:
    """The ``celery`` command line of a worker consuming this deployment's queue."""
    return [
        "-A",
        "workers.app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "--queues",
        constants.queue_name(settings.deployment),
        "--hostname",
        hostname,
        *extra,
    ]


_app_from_env: Celery | None = None


def __getattr__(name: str) -> Any:
    """``workers.app.app``: the app from the environment, built on first access."""
    global _app_from_env
    if name != "app":
        raise AttributeError(name)
    if _app_from_env is None:
        _app_from_env = make_app(Settings.from_env())
    return _app_from_env
