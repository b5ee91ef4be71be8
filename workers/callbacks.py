"""Signed completion callbacks: tell a backend over HTTP that its job finished.

When a job reaches a terminal state (succeeded, failed, cancelled) and its request
named a ``callback_url``, :func:`notify` builds the event::

    {"id": "evt_…", "event": "job.succeeded", "created": 1700000000, "job": {…}}

(``job`` is the body of ``GET /v1/jobs/{id}``) and enqueues the Celery task
``clipline.deliver_callback`` with it on the deployment's callbacks queue
(:func:`clipline_core.constants.callbacks_queue_name`). The job's worker only pays for
that enqueue. The callbacks queue is consumed by the callback worker alone
(``clipline callback-worker``: a thread pool of ``callback_concurrency`` threads,
:func:`workers.app.callback_worker_argv`), never by the job workers' pool children, so a
slow or dead receiver never holds a child that could run a job. Within the callback
worker one receiver host has at most ``callback_host_concurrency`` deliveries in flight
(a lease set in Redis shared by every callback worker of the deployment); a delivery
that finds its host busy waits (a short, growing countdown; no attempt is used), so one
slow receiver cannot take every thread from the others.

:func:`deliver` POSTs the exact body bytes with ``Clipline-Signature: t=…,v1=…``
(:mod:`clipline_core.signing`) and ``Clipline-Event-Id``. The callback URL passes the
fetch stage's SSRF rules (:func:`workers.fetch.check_url`) on every attempt, the
connection goes to the checked address, redirects are not followed, and the
receiver's answer body is never read. A 2xx answer is success; anything else
(another status, a timeout, a network error, a DNS failure) is retried with
exponential backoff (``callback_backoff_s`` doubling, ±10 % jitter, capped at
``callback_backoff_max_s``) up to ``callback_max_attempts`` attempts per event. A URL
refused by the SSRF rules, or a worker without a secret, is not retried. (The backoff is
computed here rather than with Celery's ``retry_backoff``: that takes whole seconds and
full jitter, 0 to the delay, which would drop the documented spacing between attempts.
Celery's ``autoretry_for``/``retry_backoff`` does retry a task whose Redis bookkeeping
failed.)

Each event's delivery is one Redis hash (:func:`clipline_core.constants.callback_event_key`,
kept ``terminal_ttl_s``): its final state (``delivered``/``failed``), the attempts made
and how many of them timed out waiting for the answer, and the attempt in flight (a
holder token with a lease). An attempt starts only through one atomic claim of that
hash, so

* a duplicate or redelivered task message for an event that was delivered (or given
  up) sends nothing (``clipline_callbacks_total{outcome="duplicate"}``);
* two copies of one event never POST at the same time (the second waits for the
  first's lease), and attempts are counted per event, not per message;
* an attempt whose answer timed out (``callback_timeout_s``) may still have reached the
  receiver, so every later attempt of that event waits ``callback_retry_timeout_s``:
  a receiver that answers within that gets the event once more at most.

Delivery is therefore at least once, and the event id and body bytes are the same on
every attempt so receivers can drop duplicates. A receiver gets an event more than once
when (a) an attempt's answer did not arrive in time (it timed out, or the receiver
answered 2xx after the wait: one more copy, or more when the receiver is slower than
``callback_retry_timeout_s``); (b) the callback worker died after the receiver answered
2xx and before the ``delivered`` record was written (the message is acknowledged only
after the attempt, ``acks_late``, so it comes back and is sent once more). One window
loses an event instead: a worker killed between a job's terminal transition and the
enqueue (the job itself stays readable through the API).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import threading
import time
import urllib.parse
import uuid
from typing import Any

import httpx
import redis
from celery import Celery, Task, shared_task

from clipline_core import constants, metrics, signing
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.job import Job
from clipline_core.schema import EVENT_FOR_STATE, CallbackEvent, job_view
from clipline_core.settings import Settings
from clipline_core.store import JobStore
from workers import fetch

log = logging.getLogger("clipline.callbacks")

#: ``clipline_callbacks_total{outcome}`` (the callback worker's: :mod:`clipline_core.metrics`)
CALLBACKS = metrics.CALLBACKS_DELIVERED
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
            queue=constants.callbacks_queue_name(settings.deployment),
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
    #: the request was sent and the answer did not come in time (it may have been taken)
    timed_out: bool = False


def redacted(url: str) -> str:
    """Scheme, host and path of a URL (query strings may carry secrets)."""
    p = urllib.parse.urlparse(url)
    return f"{p.scheme}://{p.hostname or ''}{p.path}"


def deliver(
    url: str, body: bytes, event: str, settings: Settings, timeout_s: float | None = None
) -> Delivery:
    """POST one signed event to ``url``; classify the result.

    ``timeout_s`` is how long to wait for the answer (default ``callback_timeout_s``).
    """
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
    wait = settings.callback_timeout_s if timeout_s is None else timeout_s
    timeout = httpx.Timeout(wait, connect=settings.fetch_connect_timeout_s)
    try:
        with (
            fetch.http_client(timeout) as client,
            client.stream(
                "POST", target, content=body, headers=headers, extensions=extensions
            ) as resp,
        ):
            status = resp.status_code
    except httpx.ReadTimeout as exc:
        return Delivery(False, True, None, f"ReadTimeout after {wait:g} s: {exc}", True)
    except httpx.HTTPError as exc:
        return Delivery(False, True, None, f"{type(exc).__name__}: {exc}")
    if 200 <= status < 300:
        return Delivery(True, False, status, "delivered")
    return Delivery(False, True, status, f"the receiver answered HTTP {status}")


def backoff_s(attempt: int, settings: Settings) -> float:
    """Delay before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
    base = settings.callback_backoff_s * 2 ** max(0, attempt - 1)
    return min(settings.callback_backoff_max_s, base) * random.uniform(0.9, 1.1)


# ---------------------------------------------------------------------------
# The per-event delivery record in Redis.
# ---------------------------------------------------------------------------
DELIVERED = "delivered"
FAILED = "failed"
CLAIMED = "claimed"
BUSY = "busy"  # another copy of this event has an attempt in flight
HOST_BUSY = "host_busy"  # the receiver host has callback_host_concurrency in flight

# KEYS: event hash, host lease set. ARGV: token, first lease ms, retry lease ms, host
# limit, ttl s. Returns {outcome, wait ms, attempt, timed-out attempts}.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state')
if state then return {state, 0, 0, 0} end
local held = tonumber(redis.call('HGET', KEYS[1], 'holder_until') or '0')
if held > now then return {'busy', held - now, 0, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {'host_busy', tonumber(first[2]) - now, 0, 0}
end
local timeouts = tonumber(redis.call('HGET', KEYS[1], 'read_timeouts') or '0')
local lease = tonumber(ARGV[2])
if timeouts > 0 then lease = tonumber(ARGV[3]) end
redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
if redis.call('PTTL', KEYS[2]) < lease then redis.call('PEXPIRE', KEYS[2], lease) end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'holder_until', now + lease)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return {'claimed', 0, attempt, timeouts}
"""

# KEYS: event hash, host lease set. ARGV: token, outcome (delivered|failed|retry),
# timed out (0|1), ttl s.
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'holder', 'holder_until')
end
if ARGV[2] == 'delivered' then
  redis.call('HSET', KEYS[1], 'state', 'delivered')
elseif ARGV[2] == 'failed' and not redis.call('HGET', KEYS[1], 'state') then
  redis.call('HSET', KEYS[1], 'state', 'failed')
end
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'read_timeouts', 1) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""


@dataclasses.dataclass(frozen=True)
class Claim:
    """The answer of :meth:`Ledger.claim`."""

    outcome: str  # CLAIMED, DELIVERED, FAILED, BUSY or HOST_BUSY
    token: str = ""
    attempt: int = 0  # this attempt's number for the event (1-based), when claimed
    timeout_s: float = 0.0  # how long this attempt waits for the answer
    wait_s: float = 0.0  # when busy: at most this long until the blocker's lease ends


def receiver_host(url: str) -> str:
    """The host a callback URL points at (the unit of ``callback_host_concurrency``)."""
    return (urllib.parse.urlparse(url).hostname or "").lower()


class Ledger:
    """One deployment's callback delivery records (see the module docstring)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    def lease_s(self, timeout_s: float) -> float:
        """How long an attempt that waits ``timeout_s`` for its answer may hold its claim."""
        return self.settings.fetch_connect_timeout_s + 2 * timeout_s + 5.0

    def _keys(self, event: str, url: str) -> list[str]:
        dep = self.settings.deployment
        return [
            constants.callback_event_key(dep, event),
            constants.callback_host_key(dep, receiver_host(url)),
        ]

    def claim(self, event: str, url: str) -> Claim:
        """Start an attempt of ``event`` unless it is done, in flight, or its host is busy."""
        s = self.settings
        token = uuid.uuid4().hex
        out = self._claim(
            keys=self._keys(event, url),
            args=[
                token,
                int(self.lease_s(s.callback_timeout_s) * 1000),
                int(self.lease_s(s.callback_retry_timeout_s) * 1000),
                max(1, s.callback_host_concurrency),
                s.terminal_ttl_s,
            ],
        )
        outcome = _text(out[0])
        if outcome != CLAIMED:
            return Claim(outcome, wait_s=max(0, int(out[1])) / 1000)
        timed_out_before = int(out[3]) > 0
        timeout = s.callback_retry_timeout_s if timed_out_before else s.callback_timeout_s
        return Claim(CLAIMED, token, int(out[2]), timeout)

    def release(self, event: str, url: str, token: str, outcome: str, timed_out: bool) -> None:
        """End an attempt: ``outcome`` is DELIVERED, FAILED or ``"retry"``."""
        self._release(
            keys=self._keys(event, url),
            args=[token, outcome, "1" if timed_out else "0", self.settings.terminal_ttl_s],
        )

    def record(self, event: str) -> dict[str, str]:
        """The stored record of ``event`` (empty when there is none)."""
        raw = self.redis.hgetall(constants.callback_event_key(self.settings.deployment, event))
        return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


def _redis(url: str) -> redis.Redis:
    """One client (a thread-safe connection pool) per Redis URL in this process."""
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = redis.Redis.from_url(url)
        return client


def defer_s(wait_s: float, deferred: int) -> float:
    """Countdown of a delivery that found its event or host busy (``deferred`` times so far).

    Growing from 0.25 s to at most 30 s, never past the blocker's lease, ±20 % jitter.
    """
    base = min(30.0, 0.25 * 2 ** min(deferred, 8))
    if wait_s > 0:
        base = min(base, wait_s)
    return max(0.05, base * random.uniform(0.8, 1.2))


@shared_task(
    name=constants.CELERY_TASK_DELIVER_CALLBACK,
    bind=True,
    max_retries=None,
    ignore_result=True,
    acks_late=True,
    # Redis errors of the bookkeeping (not of the receiver): Celery's own backoff.
    autoretry_for=(redis.RedisError,),
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
)
def deliver_callback(
    self: Task, job_id: str, url: str, body: str, event: str, deferred: int = 0
) -> str:
    settings: Settings = self.app.conf.clipline_settings
    ledger = Ledger(_redis(settings.redis_url or self.app.conf.broker_url), settings)
    where = redacted(url)
    claim = ledger.claim(event, url)
    if claim.outcome in (DELIVERED, FAILED):
        CALLBACKS.labels("duplicate").inc()
        log.info(
            "callback %s of job %s to %s was %s already; not sent again",
            event,
            job_id,
            where,
            claim.outcome,
        )
        return "duplicate"
    if claim.outcome != CLAIMED:  # BUSY or HOST_BUSY: wait without using an attempt
        delay = defer_s(claim.wait_s, deferred)
        log.debug("callback %s of job %s: %s, again in %.2f s", event, job_id, claim.outcome, delay)
        deferral: Any = self.retry(countdown=delay, kwargs={"deferred": deferred + 1}, priority=0)
        raise deferral
    attempt = claim.attempt
    try:
        result = deliver(url, body.encode(), event, settings, timeout_s=claim.timeout_s)
    except Exception as exc:  # never leave a claim behind
        log.exception("callback %s of job %s: the attempt failed unexpectedly", event, job_id)
        result = Delivery(False, True, None, f"{type(exc).__name__}: {exc}")
    if result.ok:
        ledger.release(event, url, claim.token, DELIVERED, False)
        CALLBACKS.labels("delivered").inc()
        log.info("callback %s of job %s delivered to %s (try %d)", event, job_id, where, attempt)
        return "delivered"
    if not result.retry or attempt >= settings.callback_max_attempts:
        ledger.release(event, url, claim.token, FAILED, result.timed_out)
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
    ledger.release(event, url, claim.token, "retry", result.timed_out)
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
    retry: Any = self.retry(countdown=delay, kwargs={"deferred": 0}, priority=0)
    raise retry
