"""Enqueue a job: store it (idempotently) and send its Celery task with its priority.

The submitting process is recorded as holding the job's first message from the atomic
create until the message is in the broker (:meth:`JobStore.create` ``holder``), and keeps
a short-lived alive key meanwhile: if it dies in that window the lease sweeper of any
worker re-sends the job within ``hold_ttl_s`` plus one sweep, so no accepted job is
stranded in ``queued``. Imports only the ground floor and Celery.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from clipline_core import constants
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.job import JobSpec, JobState
from clipline_core.store import JobStore, holder_identity


def submit(
    store: JobStore,
    app: Celery,
    spec: JobSpec,
    idempotency_key: str | None = None,
    *,
    owner: str | None = None,
    hold_ttl_s: float = 30.0,
) -> tuple[str, bool]:
    """Return ``(job_id, created)``; a repeated idempotency key returns the first job.

    ``owner`` is the tenant the job belongs to (None: a job of the local tools).
    """
    holder = f"submit:{holder_identity()}"
    store.keep_alive(holder, hold_ttl_s)
    job_id, created = store.create(spec, idempotency_key, owner=owner, holder=holder)
    if created:
        try:
            app.send_task(
                constants.CELERY_TASK_PROCESS_JOB,
                args=[job_id],
                task_id=job_id,  # the job's id finds its task in Flower and inspect
                queue=constants.queue_name(store.deployment),
                priority=spec.priority.celery_priority,
            )
        except Exception as exc:
            err = ClipError(ErrorCode.INTERNAL, f"could not enqueue the job: {exc}")
            store.finish(
                job_id, JobState.FAILED, allowed_from={JobState.QUEUED}, error=err.to_dict()
            )
            raise
        store.unhold(job_id, holder)
    return job_id, created


def queue_list(deployment: str, cls: constants.PriorityClass) -> str:
    """The Redis list Kombu keeps the class's waiting messages in (``sep`` is ``:``)."""
    queue = constants.queue_name(deployment)
    p = cls.celery_priority
    return queue if p == 0 else f"{queue}:{p}"


def queue_depths_redis(client: Any, deployment: str) -> dict[str, int]:
    """Messages waiting per priority class, read with a plain Redis client."""
    pipe = client.pipeline(transaction=False)
    classes = list(constants.PriorityClass)
    for cls in classes:
        pipe.llen(queue_list(deployment, cls))
    return {cls.value: int(n) for cls, n in zip(classes, pipe.execute(), strict=True)}


def queue_depths(app: Celery, deployment: str) -> dict[str, int]:
    """Messages waiting per priority class (Kombu's Redis priority lists)."""
    with app.connection_for_read() as conn:
        client: Any = conn.channel().client
        return queue_depths_redis(client, deployment)
