"""Celery tasks of the CPU workers; thin wrappers around :mod:`workers.pipeline`.

``clipline.process_job(job_id)`` runs one job. The job's state in Redis, not the
message, is the source of truth: a duplicate or late delivery finds the job finished
or leased and does nothing. A transient failure with attempts left puts the job back
to ``queued`` and the task retries itself (``self.retry``: same task id, the priority it
was sent with) after Celery's exponential backoff: the task options ``retry_backoff``,
``retry_backoff_max`` and ``retry_jitter`` (set from ``retry_backoff_s``,
``retry_backoff_max_s`` and ``retry_jitter`` by :func:`workers.app.make_app`) read back
from the task, through :func:`celery.utils.time.get_exponential_backoff_interval`
(:func:`task_retry_countdown`). Nothing retries automatically (no ``autoretry_for``).

Celery states, as Flower and ``celery events`` show them: every message of a job has the
job's id as its task id. A job that fails raises :class:`JobFailed` (its error code and
message) after the store recorded the failure, so the task ends in ``FAILURE`` with the
code; it is in the task's ``throws``, so the worker logs one line, no traceback, and the
message is acknowledged (``task_acks_on_failure_or_timeout``), never redelivered. A
delivery that finds its job failed already raises it again, so the id's last state
stays ``FAILURE``. Succeeded and skipped deliveries end in ``SUCCESS`` (result
``succeeded``/``skipped``), a retry in ``RETRY``.

A message that only a worker's memory holds (a retry waiting on its countdown, one
received and not started yet) is recorded in the store as held by that worker's main
process: the retry by :meth:`clipline_core.store.JobStore.requeue`, every received
message by :func:`_track_received` (``task_received``, in the main process). The
workers' housekeeping re-sends it if that process dies (:mod:`workers.monitor`).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import redis
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_received

from clipline_core import constants
from clipline_core.errors import ClipError
from clipline_core.job import JobError, JobState
from clipline_core.settings import Settings
from clipline_core.store import holder_identity
from workers.pipeline import JobRunner, Outcome, retry_countdown, timeout_error

log = logging.getLogger("clipline.worker")
_runner: JobRunner | None = None


def runner(celery: Any) -> JobRunner:
    """The per-process runner (created lazily in each pool child, after fork)."""
    global _runner
    if _runner is None:
        settings: Settings = celery.conf.clipline_settings
        _runner = JobRunner(settings, redis.Redis.from_url(settings.redis_url), celery)
    return _runner


def message_holder() -> str:
    """Identity of the worker process that holds this task's messages: the pool's main
    process (a prefork child's parent), or this process in a pool without children."""
    from billiard.process import current_process

    child = current_process().name != "MainProcess"
    return holder_identity(os.getppid() if child else os.getpid())


class JobFailed(Exception):
    """The job failed (the store has recorded it): ends its task in ``FAILURE``.

    ``args`` are ``(code, message)``, so ``repr`` (what Flower and task events show) is
    ``JobFailed('not_a_video', '…')``; ``str`` is ``code: message``.
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code

    @classmethod
    def of(cls, error: ClipError | JobError | None) -> JobFailed:
        """From the error the job failed with (a :class:`ClipError`, or the stored one)."""
        if isinstance(error, ClipError):
            return cls(error.code.value, error.message)
        if error is None:
            return cls("failed")
        return cls(error.code, error.message)


def task_retry_countdown(task: Task, attempt: int) -> float:
    """The countdown of the retry after failed attempt ``attempt`` (1-based): Celery's
    exponential backoff with this task's ``retry_backoff``, ``retry_backoff_max`` and
    ``retry_jitter`` options (the job's attempts count, so a job re-sent after its worker
    died keeps backing off)."""
    backoff: Any = getattr(task, "retry_backoff", 1)
    factor = 1.0 if backoff is True else float(backoff or 0)
    maximum = float(getattr(task, "retry_backoff_max", 600))
    return retry_countdown(attempt, factor, maximum, bool(getattr(task, "retry_jitter", True)))


@shared_task(
    name=constants.CELERY_TASK_PROCESS_JOB,
    bind=True,
    max_retries=None,
    # Celery's backoff options; make_app's task_annotations set them from the settings.
    retry_backoff=1,
    retry_backoff_max=60,
    retry_jitter=True,
    # An expected end (the job failed, the store has it): a short log line, no traceback.
    throws=(JobFailed,),
)
def process_job(self: Task, job_id: str) -> str:
    r = runner(self.app)
    limits: Any = self.request.timelimit or (None, None)
    soft = float(limits[1]) if limits[1] else None
    try:
        result = r.run(
            job_id,
            soft_limit_s=soft,
            message_holder=message_holder(),
            backoff=lambda attempt: task_retry_countdown(self, attempt),
        )
    except SoftTimeLimitExceeded:  # raised outside the job's own handling
        err = timeout_error(soft or r.settings.job_soft_time_limit_s)
        r._fail_unleased(job_id, err)
        raise JobFailed.of(err) from None
    if result.outcome == Outcome.RETRY:
        priority: Any = (self.request.delivery_info or {}).get("priority")
        raise self.retry(countdown=result.retry_in_s, priority=priority)
    if result.outcome == Outcome.FAILED:
        raise JobFailed.of(result.error)
    if result.outcome == Outcome.SKIPPED:
        job = r.store.get(job_id)
        if job is not None and job.state == JobState.FAILED:
            raise JobFailed.of(job.error)
    return result.outcome.value


@task_received.connect
def _track_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Main process: a job's message arrived; record that this process holds it.

    Runs in the consumer's event loop, before the message is scheduled (an ETA) or
    handed to a pool child, so it is recorded before a child can claim the job. Never
    raises: without the record the job is still recovered, only later.
    """
    if request is None or getattr(request, "name", "") != constants.CELERY_TASK_PROCESS_JOB:
        return
    try:
        from workers import monitor

        args = request.args or ()
        if not args:
            return
        eta = request.eta
        due_in = 0.0
        if isinstance(eta, datetime.datetime):
            now = datetime.datetime.now(eta.tzinfo or datetime.UTC)
            due_in = max(0.0, (eta - now).total_seconds())
        monitor.track_received(request.task.app, str(args[0]), due_in)
    except Exception:
        log.warning("could not record the received message of a job", exc_info=True)
