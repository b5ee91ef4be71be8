"""Celery tasks of the CPU workers; thin wrappers around :mod:`workers.pipeline`."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from clipline import constants
from clipline.config import Settings
from clipline.errors import ClipError, ErrorCode
from workers.app import app
from workers.pipeline import JobRunner, Outcome

log = logging.getLogger("clipline.worker")
_runner: JobRunner | None = None


def runner() -> JobRunner:
    """The per-process runner (created lazily in each pool child, after fork)."""
    global _runner
    if _runner is None:
        settings: Settings = app.conf.clipline_settings
        _runner = JobRunner(settings, redis.Redis.from_url(settings.redis_url))
    return _runner


@app.task(name=constants.CELERY_TASK_PROCESS_JOB, bind=True, max_retries=None)
def process_job(self: Task, job_id: str) -> str:
    r = runner()
    try:
        result = r.run(job_id)
    except SoftTimeLimitExceeded:
        err = ClipError(ErrorCode.TIMEOUT, "the job exceeded its time limit", transient=False)
        r._fail_unleased(job_id, err)
        return "failed"
    if result.outcome == Outcome.RETRY:
        countdown = min(60.0, 2.0 ** max(0, result.attempt - 1))
        priority: Any = (self.request.delivery_info or {}).get("priority")
        raise self.retry(countdown=countdown, priority=priority)
    return result.outcome.value
