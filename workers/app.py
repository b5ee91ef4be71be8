"""The Celery application of the CPU workers (``celery -A workers.app worker``).

Delivery semantics on the Redis transport, and why each setting is what it is:

* Priorities: Kombu's Redis transport emulates priorities with one list per step and
  treats 0 as the highest. By default it has only four steps (0, 3, 6, 9), so
  ``priority_steps`` is set to all ten; the classes map to 0/4/8
  (:class:`clipline.constants.PriorityClass`). A task sent without a priority would
  land in the top step, so ``task_default_priority`` is the normal class. Within a
  step the list is FIFO: earlier requests first. Across concurrent pool children the
  order is approximate (each child takes the next message when it is free).
* ``worker_prefetch_multiplier=1`` so a child never hoards jobs others could start.
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only
  after the job ran; a killed pool child's message goes back to the queue at once.
* ``visibility_timeout`` longer than the longest allowed job, and a short
  ``unacked_restore_interval`` (hidden Kombu option, default ~100 s) so a job whose
  whole worker died comes back within a minute.
* The job's own state machine (:mod:`workers.store`) makes redelivery safe: a second
  delivery of a finished or leased job is a no-op.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from clipline import constants
from clipline.config import Settings


def make_app(settings: Settings) -> Celery:
    app = Celery(
        "clipline",
        broker=settings.redis_url or "redis://127.0.0.1:6379/0",
        include=["workers.tasks"],
    )
    queue = constants.queue_name(settings.deployment)
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
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": 10,
        },
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_time_limit_s,
    )
    app.conf.clipline_settings = settings
    return app


@worker_process_init.connect
def _limit_threads(**_: object) -> None:
    """Pool children decode on one thread each so they never oversubscribe the cores."""
    import cv2

    cv2.setNumThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@worker_ready.connect
def _announce_ready(sender: object = None, **_: object) -> None:
    """Tell the local stack (and operators) that this worker consumes its queue."""
    import redis

    settings: Settings = app.conf.clipline_settings
    key = constants.worker_heartbeat_key(settings.deployment, settings.node_name)
    client = redis.Redis.from_url(app.conf.broker_url)
    client.hset(key, mapping={"pid": os.getpid(), "concurrency": settings.worker_concurrency})
    client.expire(key, 24 * 3600)
    if settings.worker_metrics_port:
        from clipline import httpserve

        httpserve.serve(settings.worker_metrics_port)


@worker_shutdown.connect
def _announce_stop(**_: object) -> None:
    import redis

    settings: Settings = app.conf.clipline_settings
    key = constants.worker_heartbeat_key(settings.deployment, settings.node_name)
    redis.Redis.from_url(app.conf.broker_url).delete(key)


app = make_app(Settings.from_env())
