"""Signed completion callbacks: tell a backend over HTTP that its job finished.

When a job reaches a terminal state (succeeded, failed, cancelled) and its request
named a ``callback_url``, :func:`notify` builds the event::

    {"id": "evt_…", "event": "job.succeeded", "created": 1700000000, "job": {…}}

(``job`` is the body of ``GET /v1/jobs/{id}``) and enqueues the Celery task
``clipline.deliver_callback`` with it. The job's worker only pays for that enqueue; the
HTTP POST happens in whichever pool child takes the task (the job queue's top priority,
so callbacks do not wait behind a backlog of jobs).

:func:`deliver` POSTs the exact body bytes with ``Clipline-Signature: t=…,v1=…``
(:mod:`clipline_core.signing`) and ``Clipline-Event-Id``. The callback URL passes the
fetch stage's SSRF rules (:func:`workers.fetch.check_url`) on every attempt, the
connection goes to the checked address, redirects are not followed, and the
receiver's answer body is never read. A 2xx answer is success; anything else
(another status, a timeout, a network error, a DNS failure) is retried with
exponential backoff (``callback_backoff_s`` doubling, ±10 % jitter, capped at
``callback_backoff_max_s``) up to ``callback_max_attempts``. A URL refused by the SSRF
rules, or a worker without a secret, is not retried.

Delivery is at least once: the task message is acknowledged only after an attempt
ends (``acks_late``), a retry is a new message, and the event id and body are the same
on every attempt so receivers can drop duplicates. One window is not covered: a worker
killed between a job's terminal transition and the enqueue loses that event (the job
itself stays readable through the API).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import time
import urllib.parse
from typing import Any

import httpx
from celery import Celery, Task, shared_task
from prometheus_client import Counter

from clipline_core import constants, signing
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.job import Job
from clipline_core.schema import EVENT_FOR_STATE, CallbackEvent, job_view
from clipline_core.settings import Settings
from clipline_core.store import JobStore
from workers import fetch

log = logging.getLogger("clipline.callbacks")

CALLBACKS = Counter(
    constants.Metric.CALLBACKS_TOTAL,
    "Completion-callback delivery attempts by outcome (delivered, retried, failed)",
    [constants.LABEL_OUTCOME],
)
USER_AGENT = f"{constants.PROJECT}-callbacks/1"


def event_id(deployment: str, job_id: str, event: str) -> str:
    """Stable id of a job's terminal event (the same for every delivery attempt)."""
    digest = hashlib.sha256(f"{deployment}:{job_id}:{event}".encode()).hexdigest()
    return "evt_" + digest[:32]


def make_event(job: Job, deployment: str, created: float | None = None) -> CallbackEvent:
    name = EVENT_FOR_STATE[job.state]
    return CallbackEvent(
        id=event_id(deployment, job.id, name),
        event=name,
        created=int(time.time() if created is None else created),
        job=job_view(job),
    )


def notify(settings: Settings, store: JobStore, job_id: str, celery: Celery) -> bool:
    """Enqueue the callback of a job that just became terminal; never raises.

    Returns True when a delivery was enqueued (the job has a callback URL).
    """
    try:
        job = store.get(job_id)
        if job is None or job.state not in EVENT_FOR_STATE or not job.spec.callback_url:
            return False
        event = make_event(job, settings.deployment)
        celery.send_task(
            constants.CELERY_TASK_DELIVER_CALLBACK,
            args=[job.id, job.spec.callback_url, event.model_dump_json(), event.id],
            queue=constants.queue_name(settings.deployment),
            priority=0,
        )
        return True
    except Exception:
        log.exception("could not enqueue the completion callback of job %s", job_id)
        return False


def job_store(settings: Settings, redis_client: Any, celery: Celery) -> JobStore:
    """The deployment's job store, whose end-of-job hook enqueues completion callbacks.

    Every service that may end a job (workers, their housekeeping, the API) uses this,
    so a job's callback is enqueued by :meth:`JobStore.finish` and nowhere else.
    """
    store = JobStore(redis_client, settings.deployment, settings.terminal_ttl_s)
    store.on_terminal = lambda job_id: notify(settings, store, job_id, celery)
    return store


@dataclasses.dataclass(frozen=True)
class Delivery:
    """The outcome of one delivery attempt."""

    ok: bool
    retry: bool
    status: int | None
    reason: str


def redacted(url: str) -> str:
    """Scheme, host and path of a URL (query strings may carry secrets)."""
    p = urllib.parse.urlparse(url)
    return f"{p.scheme}://{p.hostname or ''}{p.path}"


def deliver(url: str, body: bytes, event: str, settings: Settings) -> Delivery:
    """POST one signed event to ``url``; classify the result."""
    secrets = signing.split_secrets(settings.callback_secret)
    if not secrets:
        return Delivery(False, False, None, "no callback secret is configured (CALLBACK_SECRET)")
    try:
        address = fetch.check_url(url, settings)
    except ClipError as err:
        permanent = err.code in (ErrorCode.FORBIDDEN_SOURCE, ErrorCode.INVALID_REQUEST)
        return Delivery(False, not permanent, None, err.message)
    parsed = urllib.parse.urlparse(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host + (f":{parsed.port}" if parsed.port else "")
    target = urllib.parse.urlunparse(parsed._replace(netloc=netloc))
    headers = {
        "Host": parsed.netloc.rsplit("@", 1)[-1],
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        constants.HEADER_EVENT_ID: event,
        constants.HEADER_SIGNATURE: signing.sign(secrets, body),
    }
    extensions = {"sni_hostname": parsed.hostname} if parsed.scheme == "https" else {}
    timeout = httpx.Timeout(settings.callback_timeout_s, connect=settings.fetch_connect_timeout_s)
    try:
        with (
            fetch.http_client(timeout) as client,
            client.stream(
                "POST", target, content=body, headers=headers, extensions=extensions
            ) as resp,
        ):
            status = resp.status_code
    except httpx.HTTPError as exc:
        return Delivery(False, True, None, f"{type(exc).__name__}: {exc}")
    if 200 <= status < 300:
        return Delivery(True, False, status, "delivered")
    return Delivery(False, True, status, f"the receiver answered HTTP {status}")


def backoff_s(attempt: int, settings: Settings) -> float:
    """Delay before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
    base = settings.callback_backoff_s * 2 ** max(0, attempt - 1)
    return min(settings.callback_backoff_max_s, base) * random.uniform(0.9, 1.1)


@shared_task(
    name=constants.CELERY_TASK_DELIVER_CALLBACK,
    bind=True,
    max_retries=None,
    ignore_result=True,
    acks_late=True,
)
def deliver_callback(self: Task, job_id: str, url: str, body: str, event: str) -> str:
    settings: Settings = self.app.conf.clipline_settings
    attempt = int(self.request.retries) + 1
    result = deliver(url, body.encode(), event, settings)
    where = redacted(url)
    if result.ok:
        CALLBACKS.labels("delivered").inc()
        log.info("callback %s of job %s delivered to %s (try %d)", event, job_id, where, attempt)
        return "delivered"
    if not result.retry or attempt >= settings.callback_max_attempts:
        CALLBACKS.labels("failed").inc()
        log.warning(
            "callback %s of job %s to %s given up after attempt %d: %s",
            event,
            job_id,
            where,
            attempt,
            result.reason,
        )
        return "failed"
    CALLBACKS.labels("retried").inc()
    delay = backoff_s(attempt, settings)
    log.info(
        "callback %s of job %s to %s failed (attempt %d: %s); retrying in %.1f s",
        event,
        job_id,
        where,
        attempt,
        result.reason,
        delay,
    )
    retry: Any = self.retry(countdown=delay, priority=0)
    raise retry
