"""Celery tasks of the CPU workers; thin wrappers around :mod:`workers.pipeline`.

``clipline.process_job(job_id)`` runs one job. The job's state in Redis, not the
message, is the source of truth: a duplicate or late delivery finds the job finished
or leased and does nothing. A transient failure with attempts left puts the job back
to ``queued`` and the task retries itself with exponential backoff (1, 2, 4 ... s, at
most 60 s) at the priority it was sent with.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded

from clipline_core import constants
from clipline_core.settings import Settings
from workers.pipeline import JobRunner, Outcome, timeout_error

log = logging.getLogger("clipline.worker")
_runner: JobRunner | None = None


def runner(celery: Any) -> JobRunner:
    """The per-process runner (created lazily in each pool child, after fork)."""
    global _runner
    if _runner is None:
        settings: Settings = celery.conf.clipline_settings
        _runner = JobRunner(settings, redis.Redis.from_url(settings.redis_url), celery)
    return _runner


def retry_countdown(attempt: int) -> float:
    """Seconds before retrying after failed attempt ``attempt`` (1-based)."""
    return min(60.0, 2.0 ** max(0, attempt - 1))


@shared_task(name=constants.CELERY_TASK_PROCESS_JOB, bind=True, max_retries=None)
def process_job(self: Task, job_id: str) -> str:
    r = runner(self.app)
    limits: Any = self.request.timelimit or (None, None)
    soft = float(limits[1]) if limits[1] else None
    try:
        result = r.run(job_id, soft_limit_s=soft)
    except SoftTimeLimitExceeded:  # raised outside the job's own handling
        r._fail_unleased(job_id, timeout_error(soft or r.settings.job_soft_time_limit_s))
        return "failed"
    if result.outcome == Outcome.RETRY:
        priority: Any = (self.request.delivery_info or {}).get("priority")
        raise self.retry(countdown=retry_countdown(result.attempt), priority=priority)
    return result.outcome.value
