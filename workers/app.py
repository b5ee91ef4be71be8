r"""The Celery applications of the CPU workers and of the callback worker.

Owns :func:`make_app` (the app for a given :class:`Settings` and role, built when called,
never at import), :func:`worker_argv` and :func:`callback_worker_argv` (the two Celery
worker command lines) and the workers' signal handlers. The tasks (:mod:`workers.tasks`,
:mod:`workers.callbacks`) are ``shared_task``\ s that read their settings from the app
that runs them, so nothing imports this module to reach "the" app. ``celery -A
workers.app`` asks for the module's ``app`` attribute, which is built from the
environment on that first access (``workers.app:callbacks_app`` likewise for the callback
worker). Must not import the tasks, the pipeline or the callbacks (they sit above it).

Two kinds of worker consume a deployment's two queues:

* the job workers (:data:`ROLE_JOBS`, ``--pool prefork``, ``worker_concurrency``
  children) consume :func:`clipline_core.constants.queue_name` and only that;
* the callback worker (:data:`ROLE_CALLBACKS`, ``--pool threads``,
  ``callback_concurrency`` threads: delivery is I/O bound) consumes
  :func:`clipline_core.constants.callbacks_queue_name` and only that. It runs no job
  housekeeping and imports no job task; it serves its metrics on
  ``worker_metrics_port`` and announces itself under
  :func:`clipline_core.constants.callback_worker_heartbeat_key`. The callback task is
  routed to its queue (``task_routes``) whoever sends it. A receiver that answers
  slowly, or never, holds a callback thread for at most its timeout, never a job
  worker's child (:mod:`workers.callbacks`).

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
* ``visibility_timeout`` longer than the longest allowed job and than the longest a
  callback retry waits for its countdown (``callback_backoff_max_s``) plus an attempt
  (Kombu's unacked index is shared by both queues), and a short
  ``unacked_restore_interval`` so messages of a worker that died are restored soon:
  Kombu only scans for them every ``interval * throttle`` seconds (10 x 10 by default),
  so the throttle is 1. Kombu restores a message only once it is older than the
  visibility timeout, so the job's own lease does the fast part: the lease sweeper
  (:mod:`workers.monitor`) re-sends a job whose worker stopped renewing its lease
  within about ``job_lease_s`` + 5 s, and a redelivered task whose lease holder is a dead
  process on this host takes the job over at once. A queued job whose message sits in
  one process's memory (a retry on its countdown, a message received and not started, a
  job just created by the API) is recorded as held by that process, and the same sweeper
  re-sends it once the holder's alive key is gone (:meth:`JobStore.expire_held`).
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
  and ``celery -A workers.app events`` work as is. Metrics of all children are served by
  the main process (:mod:`workers.monitor`).
* Every message of a job has the job's id as its Celery task id (the first send, the
  retries, the housekeeping's re-sends), so a job is found by its id in Flower and
  ``inspect``. Several messages of one id are fine: results are ignored (no result
  backend, ``worker_deduplicate_successful_tasks`` off), Kombu tracks unacknowledged
  messages by delivery tag, not by task id, and the job's state machine decides what a
  message does. (A ``revoke`` of a job id would drop every later message of that job on
  the workers that got it: cancel a job through the store, never with ``revoke``.)
* A job that fails ends its task in Celery's ``FAILURE`` state with its error code
  (:class:`workers.tasks.JobFailed`, raised after the store recorded the failure, one
  log line, no traceback). ``task_acks_on_failure_or_timeout`` (Celery's default, set
  explicitly) acknowledges that message, and nothing retries on it: the failure is
  final.
* ``worker_max_memory_per_child``: a pool child whose peak resident memory passed
  ``worker_max_memory_mb`` (plus the shared-memory arena it writes frames into, whose
  pages count as its own) after a job is replaced by a fresh one, so memory a decoder
  kept never accumulates. No ``worker_max_tasks_per_child``: the memory bound is what
  matters, and a fresh child pays its start-up (imports, the arena, the GPU client)
  again.
* Retries of a job use Celery's exponential backoff (the ``retry_backoff``,
  ``retry_backoff_max`` and ``retry_jitter`` task options, set from the settings
  through ``task_annotations``; see :mod:`workers.tasks`).

``celery -A workers.app inspect active`` (or ``events``, ``flower``) in a shell without
``CLIPLINE_REDIS_URL``: the module's ``app`` then uses the Redis of the local stack
that is up for ``CLIPLINE_DEPLOYMENT`` (its ``stack.json``,
:func:`clipline_core.stackstate.running_stack`), and otherwise the default Redis with a
warning on stderr saying so (:func:`settings_from_env`).
"""

from __future__ import annotations

import dataclasses
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

from clipline_core import constants, stackstate
from clipline_core.settings import Settings

log = logging.getLogger("clipline.worker")

#: the broker of an app whose settings name no Redis
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


#: the job workers (prefork children running ``clipline.process_job``)
ROLE_JOBS = "jobs"
#: the callback worker (threads running ``clipline.deliver_callback``)
ROLE_CALLBACKS = "callbacks"


def visibility_timeout_s(settings: Settings) -> int:
    """Kombu's visibility timeout: above every job's hard limit and every callback hold."""
    callback_hold = settings.callback_backoff_max_s + 3 * settings.callback_retry_timeout_s
    return int(
        max(settings.visibility_timeout_s, settings.job_time_limit_s + 120, callback_hold + 120)
    )


def max_memory_per_child_kib(settings: Settings) -> int | None:
    """Celery's ``worker_max_memory_per_child`` (KiB): ``worker_max_memory_mb`` plus the
    shared-memory arena a child writes frames into; None (no limit) when that is 0."""
    if settings.worker_max_memory_mb <= 0:
        return None
    arena_kib = settings.shm_slots * settings.shm_slot_bytes // 1024
    return settings.worker_max_memory_mb * 1024 + arena_kib


def make_app(settings: Settings, role: str = ROLE_JOBS) -> Celery:
    """The Celery app of a job worker (and of anything that enqueues), or the callback worker's."""
    if role not in (ROLE_JOBS, ROLE_CALLBACKS):
        raise ValueError(f"unknown worker role {role!r}")
    jobs = role == ROLE_JOBS
    app = Celery(
        "clipline",
        broker=settings.redis_url or DEFAULT_REDIS_URL,
        include=["workers.tasks", "workers.callbacks"] if jobs else ["workers.callbacks"],
    )
    queue = constants.queue_name(settings.deployment)
    visibility = visibility_timeout_s(settings)
    app.conf.update(
        task_default_queue=queue,
        task_default_priority=constants.DEFAULT_PRIORITY.celery_priority,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=False,
        task_ignore_result=True,
        task_acks_on_failure_or_timeout=True,
        worker_deduplicate_successful_tasks=False,
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
        task_routes={
            constants.CELERY_TASK_DELIVER_CALLBACK: {
                "queue": constants.callbacks_queue_name(settings.deployment)
            }
        },
        # Job limits (a thread pool has none: a delivery is bounded by its timeouts).
        task_soft_time_limit=(settings.job_soft_time_limit_s or None) if jobs else None,
        task_time_limit=(settings.job_time_limit_s or None) if jobs else None,
        worker_max_memory_per_child=max_memory_per_child_kib(settings) if jobs else None,
        task_annotations={
            constants.CELERY_TASK_PROCESS_JOB: {
                "retry_backoff": settings.retry_backoff_s,
                "retry_backoff_max": settings.retry_backoff_max_s,
                "retry_jitter": settings.retry_jitter,
            }
        },
    )
    app.conf.clipline_settings = settings
    app.conf.clipline_role = role
    app.steps["worker"].add(HousekeepingStep if jobs else CallbackMetricsStep)
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
    # httpx logs every request's full URL at INFO: query strings of callback and
    # presigned URLs may carry secrets (our own log lines redact them).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _metrics_dir = monitor.setup_multiprocess(conf.clipline_settings)


@worker_process_init.connect
def _limit_threads(**_: object) -> None:
    """Pool children decode on one thread each so they never oversubscribe the cores."""
    import cv2

    cv2.setNumThreads(1)


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
            self.http = monitor.serve_metrics(settings, _metrics_dir, constants.MetricRole.WORKERS)
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
            self.http.server_close()
            self.http = None


class CallbackMetricsStep(bootsteps.StartStopStep):
    """The callback worker's ``/metrics``, ``/healthz`` and ``/readyz`` (no housekeeping)."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.http: Any = None

    def start(self, parent: Any) -> None:
        from workers import monitor

        settings: Settings = parent.app.conf.clipline_settings
        if not settings.worker_metrics_port:
            return
        try:
            self.http = monitor.serve_metrics(
                settings, _metrics_dir, constants.MetricRole.CALLBACKS
            )
        except OSError as exc:  # e.g. a job worker on this host serves that port
            log.warning(
                "callback worker: no metrics on port %d: %s", settings.worker_metrics_port, exc
            )

    def stop(self, parent: Any) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None


def _heartbeat(conf: Any) -> tuple[str, int]:
    """The readiness key of this worker and the concurrency it announces."""
    settings: Settings = conf.clipline_settings
    if getattr(conf, "clipline_role", ROLE_JOBS) == ROLE_CALLBACKS:
        key = constants.callback_worker_heartbeat_key(settings.deployment, settings.node_name)
        return key, settings.callback_concurrency
    key = constants.worker_heartbeat_key(settings.deployment, settings.node_name)
    return key, settings.worker_concurrency


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
    key, concurrency = _heartbeat(celery.conf)
    client = redis.Redis.from_url(celery.conf.broker_url)
    client.hset(key, mapping={"pid": os.getpid(), "concurrency": concurrency})
    client.expire(key, 24 * 3600)


@worker_shutdown.connect
def _announce_stop(sender: Any = None, **_: object) -> None:
    import redis

    from workers import monitor

    celery: Any = getattr(sender, "app", None)
    if celery is None or not hasattr(celery.conf, "clipline_settings"):
        return
    key = _heartbeat(celery.conf)[0]
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


def callback_worker_argv(settings: Settings, hostname: str, *extra: str) -> list[str]:
    """The ``celery`` command line of the callback worker (threads, the callbacks queue)."""
    return [
        "-A",
        "workers.app:callbacks_app",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(max(1, settings.callback_concurrency)),
        "--queues",
        constants.callbacks_queue_name(settings.deployment),
        "--hostname",
        hostname,
        *extra,
    ]


_apps_from_env: dict[str, Celery] = {}
_APP_ROLES = {"app": ROLE_JOBS, "callbacks_app": ROLE_CALLBACKS}


def __getattr__(name: str) -> Any:
    """``workers.app.app`` / ``callbacks_app``: apps from the environment, built on first use."""
    role = _APP_ROLES.get(name)
    if role is None:
        raise AttributeError(name)
    if role not in _apps_from_env:
        _apps_from_env[role] = make_app(settings_from_env(), role)
    return _apps_from_env[role]


def settings_from_env() -> Settings:
    """The settings of ``celery -A workers.app ...``: the environment's, with the Redis
    of the local stack that is up for this deployment when the environment names none.

    Without either, the default Redis is used and a warning says so (``inspect`` or
    ``flower`` would otherwise talk, silently, to whatever else runs there).
    """
    settings = Settings.from_env()
    if settings.redis_url:
        return settings
    record = stackstate.running_stack(settings.state_dir, settings.deployment)
    url = str(record.get("redis_url") or "") if record else ""
    where = stackstate.state_file(settings.state_dir, settings.deployment)
    if url:
        log.info("workers.app: using the Redis of the local stack recorded in %s", where)
        return dataclasses.replace(settings, redis_url=url)
    log.warning(
        "workers.app: CLIPLINE_REDIS_URL is not set and no local stack of deployment %r is "
        "up (%s); using %s. Set CLIPLINE_REDIS_URL (and CLIPLINE_DEPLOYMENT) to reach "
        "another stack.",
        settings.deployment,
        where,
        DEFAULT_REDIS_URL,
    )
    return settings
