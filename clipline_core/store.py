"""Jobs in Redis: atomic state transitions, leases, idempotent creation.

Each job is one Redis hash (``clipline:<deployment>:job:<id>``). Every transition is
one Lua script, so it is atomic: it checks the current state (and, while a worker
runs the job, the worker's lease token) before writing. That is what makes delivery
safe when Celery delivers a task twice: the second delivery either finds a terminal
job (no-op) or a job under a live lease held by someone else (no-op), and only takes
over a job whose lease expired (its worker died).

Leases: a claim records the lease token, its expiry and the holder (host, pid and
process start time), and puts the job in a sorted set of running jobs scored by lease
expiry (:func:`clipline_core.constants.leases_key`). The holder renews the lease from a
background thread. Two things recover a job whose holder died:

* a redelivered task on the same host sees that the holder process no longer exists
  and takes the job over at once (:meth:`JobStore.claim` with ``steal``);
* the workers' lease sweeper (:meth:`JobStore.expire_leases`) finds leases that
  expired, and puts those jobs back to ``queued`` (the caller re-sends their task) or,
  when the attempt has run past the hard time limit, fails them with ``timeout``.

Each transition is announced on the job's pub/sub channel so waiters need not poll.
Terminal jobs expire after ``terminal_ttl_s``.

One owner for a job's life: :meth:`JobStore.create` (with the ``owner`` tenant stored in
the same atomic script), :meth:`JobStore.requeue` and :meth:`JobStore.finish` (also
:meth:`cancel` and the sweeper's time-outs, which go through the same bookkeeping). A
job that ends does so here, and only here are ``clipline_jobs_total{status,code}``
counted and the ``on_terminal`` hook called (the services pass one that enqueues the
completion callback), once per job, by whoever won the atomic transition.

The Lua scripts take every state name from :class:`clipline_core.job.JobState` (the
``$QUEUED``-style placeholders and the ``active`` table are filled in from the enum).
Must not import anything of clipline but the ground floor (constants, job, metrics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from clipline_core import constants, job_metrics
from clipline_core.job import ACTIVE, TERMINAL, Job, JobSpec, JobState

log = logging.getLogger("clipline.store")

#: job-hash field naming the tenant whose API key created the job
OWNER_FIELD = "tenant"
#: the states a job can still leave
NONTERMINAL: frozenset[JobState] = frozenset({JobState.QUEUED, *ACTIVE})
OnTerminal = Callable[[str], object]


def _lua(source: str) -> str:
    """Fill a script's state placeholders from the enum (``$QUEUED`` -> ``$QUEUED``)."""
    active = "{" + ", ".join(f"{s.value}=true" for s in sorted(ACTIVE, key=str)) + "}"
    out = source.replace("$ACTIVE", active)
    for s in JobState:
        out = out.replace(f"${s.name}", f"'{s.value}'")
    if "$" in out:
        raise ValueError(f"unfilled placeholder in a Lua script: {out[out.index('$') :][:20]}")
    return out


# KEYS[1] job hash, KEYS[2] events channel, KEYS[3] leases set
# ARGV: allowed-from (comma list), to-state, lease token ('' = not checked),
#       ttl for terminal ('' = none), job id, then field/value pairs
_TRANSITION = _lua(
    """local active = $ACTIVE
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == cur then allowed = true end end
if not allowed then return {0, cur} end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'lease') ~= ARGV[3] then return {0, cur} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated_at', string.format('%.6f', now))
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[4] ~= '' then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4])) end
if not active[ARGV[2]] then redis.call('ZREM', KEYS[3], ARGV[5]) end
redis.call('PUBLISH', KEYS[2], ARGV[2])
return {1, cur}
"""
)

# Claim a job for processing. KEYS[1] job, KEYS[2] channel, KEYS[3] leases set.
# ARGV: new lease token, lease seconds, max attempts, token of a lease to take over
#       ('' = none), holder identity, job id.
# Returns {status, state, attempt}: status 1 claimed, 0 not claimable, 2 attempts exhausted.
_CLAIM = _lua(
    """local active = $ACTIVE
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, '', 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if cur ~= $QUEUED then
  if not active[cur] then return {0, cur, 0} end
  local until_ = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if until_ > now then
    if ARGV[4] == '' or redis.call('HGET', KEYS[1], 'lease') ~= ARGV[4] then
      return {0, cur, 0}
    end
  end
end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') + 1
if attempt > tonumber(ARGV[3]) then return {2, cur, attempt - 1} end
local until_ = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'state', $FETCHING, 'attempt', attempt, 'lease', ARGV[1],
  'lease_until', string.format('%.6f', until_), 'lease_owner', ARGV[5],
  'attempt_started_at', string.format('%.6f', now), 'updated_at', string.format('%.6f', now))
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', string.format('%.6f', now))
end
redis.call('ZADD', KEYS[3], until_, ARGV[6])
redis.call('PUBLISH', KEYS[2], $FETCHING)
return {1, cur, attempt}
"""
)

# Extend a lease. KEYS[1] job, KEYS[2] leases set. ARGV token, seconds, job id.
# Returns 1 if still ours.
_RENEW = _lua(
    """local active = $ACTIVE
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
if not active[redis.call('HGET', KEYS[1], 'state')] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local until_ = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_until', string.format('%.6f', until_))
redis.call('ZADD', KEYS[2], until_, ARGV[3])
return 1
"""
)

# Recover a job whose lease expired. KEYS[1] job, KEYS[2] channel, KEYS[3] leases set.
# ARGV: job id, hard time limit (s, 0 = none), timeout error JSON, terminal ttl,
#       worker-lost note JSON.
# Returns {1, priority} requeued, {2, ''} failed (timeout), {0, ''} nothing to do.
_EXPIRE = _lua(
    """local active = $ACTIVE
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur or not active[cur] then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {0, ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local until_ = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
if until_ > now then
  redis.call('ZADD', KEYS[3], until_, ARGV[1])
  return {0, ''}
end
redis.call('ZREM', KEYS[3], ARGV[1])
local stamp = string.format('%.6f', now)
local began = tonumber(redis.call('HGET', KEYS[1], 'attempt_started_at') or '0')
local limit = tonumber(ARGV[2])
if limit > 0 and began > 0 and now - began >= limit then
  redis.call('HSET', KEYS[1], 'state', $FAILED, 'error', ARGV[3], 'lease', '',
    'finished_at', stamp, 'updated_at', stamp)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  redis.call('PUBLISH', KEYS[2], $FAILED)
  return {2, ''}
end
redis.call('HSET', KEYS[1], 'state', $QUEUED, 'lease', '', 'lease_until', '0',
  'last_error', ARGV[5], 'updated_at', stamp)
redis.call('PUBLISH', KEYS[2], $QUEUED)
return {1, redis.call('HGET', KEYS[1], 'priority') or ''}
"""
)

# Idempotent create. KEYS[1] idempotency key, KEYS[2] job hash.
# ARGV: job id, body hash, idempotency ttl, then job field/value pairs.
# Returns {1, id} created, {0, id} existing same body, {-1, id} same key other body.
_CREATE = """
if KEYS[1] ~= '' then
  local existing = redis.call('GET', KEYS[1])
  if existing then
    local sep = string.find(existing, ':', 1, true)
    local id = string.sub(existing, 1, sep - 1)
    local body = string.sub(existing, sep + 1)
    if body == ARGV[2] then return {0, id} end
    return {-1, id}
  end
  redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'EX', tonumber(ARGV[3]))
end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return {1, ARGV[1]}
"""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' if unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return ""
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else ""


def holder_identity(pid: int | None = None) -> str:
    """``host:pid:start`` of this process: who holds a lease."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def holder_is_dead(identity: str) -> bool:
    """True only when ``identity`` names a process of this host that no longer runs.

    A holder on another host, or one this host cannot judge, counts as alive: its
    lease then simply has to expire.
    """
    try:
        host, pid_s, start = identity.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # The pid exists: dead only if it now belongs to another process.
    return bool(start) and _start_ticks(pid) not in ("", start)


@dataclasses.dataclass(frozen=True)
class Expired:
    """A job whose lease expired, and what the sweeper did with it."""

    job_id: str
    outcome: str  # "requeued" | "timed_out"
    priority: str = ""


class IdempotencyConflict(Exception):
    """The idempotency key was already used with a different request body."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"idempotency key already used for job {job_id} with another body")
        self.job_id = job_id


class JobStore:
    """Reads and writes jobs of one deployment."""

    def __init__(
        self,
        client: redis.Redis,
        deployment: str,
        terminal_ttl_s: int = 7 * 24 * 3600,
        on_terminal: OnTerminal | None = None,
    ):
        self.r = client
        self.deployment = deployment
        self.terminal_ttl_s = terminal_ttl_s
        #: called with the job id once a job this store ended is terminal (never raises
        #: into the caller); the services pass one that enqueues the completion callback
        self.on_terminal = on_terminal
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._create = client.register_script(_CREATE)
        self._expire = client.register_script(_EXPIRE)
        self.leases_key = constants.leases_key(deployment)

    def key(self, job_id: str) -> str:
        return constants.job_key(self.deployment, job_id)

    def channel(self, job_id: str) -> str:
        return constants.job_events_channel(self.deployment, job_id)

    # -- creation ---------------------------------------------------------------
    def create(
        self,
        spec: JobSpec,
        idempotency_key: str | None = None,
        idempotency_ttl_s: int = 86400,
        *,
        owner: str | None = None,
    ) -> tuple[str, bool]:
        """Store a new queued job; return ``(job_id, created)``.

        ``owner`` is the tenant the job belongs to (stored with the job in the same atomic
        script, field :data:`OWNER_FIELD`); None for jobs of the local tools.

        With an idempotency key, the same key and body return the first job
        (``created`` False); the same key with another body raises
        :class:`IdempotencyConflict`.
        """
        job_id = uuid.uuid4().hex
        body = spec.canonical_json()
        body_hash = hashlib.sha256(body.encode()).hexdigest()
        idem = ""
        if idempotency_key:
            kh = hashlib.sha256(idempotency_key.encode()).hexdigest()
            idem = constants.idempotency_key(self.deployment, kh)
        now = f"{time.time():.6f}"
        fields = {
            "id": job_id,
            "state": JobState.QUEUED.value,
            "spec": body,
            "attempt": "0",
            "created_at": now,
            "updated_at": now,
            "priority": spec.priority.value,
        }
        if owner is not None:
            fields[OWNER_FIELD] = owner
        argv: list[Any] = [job_id, body_hash, idempotency_ttl_s]
        for k, v in fields.items():
            argv += [k, v]
        status, existing = self._create(keys=[idem, self.key(job_id)], args=argv)
        existing = _text(existing)
        if int(status) == -1:
            raise IdempotencyConflict(existing)
        return existing, int(status) == 1

    # -- reads ------------------------------------------------------------------
    def raw(self, job_id: str) -> dict[str, str]:
        data = self.r.hgetall(self.key(job_id))
        return {_text(k): _text(v) for k, v in data.items()}

    def get(self, job_id: str) -> Job | None:
        data = self.raw(job_id)
        if not data:
            return None
        return _to_job(data)

    def state(self, job_id: str) -> JobState | None:
        v = self.r.hget(self.key(job_id), "state")
        return JobState(_text(v)) if v else None

    # -- transitions ---------------------------------------------------------------
    def transition(
        self,
        job_id: str,
        allowed_from: frozenset[JobState] | set[JobState],
        to: JobState,
        *,
        lease: str = "",
        **fields: Any,
    ) -> bool:
        """Atomically move to ``to`` if in ``allowed_from`` (and ``lease`` still ours)."""
        argv: list[Any] = [
            ",".join(s.value for s in allowed_from),
            to.value,
            lease,
            str(self.terminal_ttl_s) if to in TERMINAL else "",
            job_id,
        ]
        if to in TERMINAL:
            fields.setdefault("finished_at", f"{time.time():.6f}")
            fields.setdefault("lease", "")
        elif to not in ACTIVE:
            fields.setdefault("lease", "")
        for k, v in fields.items():
            argv += [k, v if isinstance(v, str) else json.dumps(v)]
        keys = [self.key(job_id), self.channel(job_id), self.leases_key]
        ok, _ = self._transition(keys=keys, args=argv)
        return bool(int(ok))

    def finish(
        self,
        job_id: str,
        to: JobState,
        *,
        allowed_from: frozenset[JobState] | set[JobState] = NONTERMINAL,
        lease: str = "",
        error: dict[str, str] | None = None,
        **fields: Any,
    ) -> bool:
        """End a job: move it to terminal state ``to``, count it, call ``on_terminal``.

        Only the caller whose atomic transition wins does the bookkeeping, so a job is
        counted and its callback enqueued once however many processes race to end it.
        ``error`` is the failure (``{"code", "message"}``) of a failed or cancelled job.
        """
        if to not in TERMINAL:
            raise ValueError(f"{to.value} is not a terminal state")
        fields["error"] = "" if error is None else json.dumps(error)
        if not self.transition(job_id, allowed_from, to, lease=lease, **fields):
            return False
        self._ended(job_id, to, (error or {}).get("code", ""))
        return True

    def requeue(self, job_id: str, lease: str, last_error: dict[str, str]) -> bool:
        """Put a job that is running under ``lease`` back to ``queued`` (to be retried)."""
        return self.transition(
            job_id, ACTIVE, JobState.QUEUED, lease=lease, last_error=json.dumps(last_error)
        )

    def _ended(self, job_id: str, state: JobState, code: str) -> None:
        job_metrics.JOBS.labels(state.value, code).inc()
        if self.on_terminal is None:
            return
        try:
            self.on_terminal(job_id)
        except Exception:
            log.warning("the end-of-job hook failed for job %s", job_id, exc_info=True)

    def advance(self, job_id: str, to: JobState, lease: str, **fields: Any) -> bool:
        """Move an active job (held under ``lease``) to the next active state.

        Ending a job is :meth:`finish`'s (it does the bookkeeping); ``advance`` refuses.
        """
        if to in TERMINAL:
            raise ValueError(f"advance() cannot end a job ({to.value}): use finish()")
        return self.transition(job_id, ACTIVE, to, lease=lease, **fields)

    def claim(
        self,
        job_id: str,
        lease: str,
        lease_s: float,
        max_attempts: int,
        *,
        steal: str = "",
        holder: str | None = None,
    ) -> tuple[int, str, int]:
        """Try to take a job for processing; see ``_CLAIM`` for the status codes.

        ``steal`` is the token of a live lease whose holder is known to be dead: the
        claim then takes the job over instead of leaving it to that holder.
        """
        status, cur, attempt = self._claim(
            keys=[self.key(job_id), self.channel(job_id), self.leases_key],
            args=[lease, lease_s, max_attempts, steal, holder or holder_identity(), job_id],
        )
        cur = _text(cur)
        return int(status), cur, int(attempt)

    def renew(self, job_id: str, lease: str, lease_s: float) -> bool:
        keys = [self.key(job_id), self.leases_key]
        return bool(int(self._renew(keys=keys, args=[lease, lease_s, job_id])))

    def lease_holder(self, job_id: str) -> tuple[str, str]:
        """(lease token, holder identity) of a job ('' when none)."""
        token, owner = self.r.hmget(self.key(job_id), ["lease", "lease_owner"])
        return _text(token or b""), _text(owner or b"")

    def expire_leases(
        self, time_limit_s: float, timeout_error: dict[str, str], limit: int = 100
    ) -> list[Expired]:
        """Recover jobs whose lease expired (see the module doc); return what was done."""
        secs, micros = self.r.time()
        now = float(secs) + float(micros) / 1e6
        due = self.r.zrangebyscore(self.leases_key, "-inf", now, start=0, num=limit)
        note = json.dumps({"code": "worker_lost", "message": "the worker running the job stopped"})
        out: list[Expired] = []
        for raw in due:
            job_id = _text(raw)
            keys = [self.key(job_id), self.channel(job_id), self.leases_key]
            args: list[Any] = [
                job_id,
                time_limit_s,
                json.dumps(timeout_error),
                self.terminal_ttl_s,
                note,
            ]
            status, priority = self._expire(keys=keys, args=args)
            if int(status) == 1:
                out.append(Expired(job_id, "requeued", _text(priority)))
            elif int(status) == 2:
                out.append(Expired(job_id, "timed_out"))
                self._ended(job_id, JobState.FAILED, str(timeout_error.get("code", "")))
        return out

    def running(self) -> int:
        """Jobs holding a lease (running, or whose holder died recently)."""
        return int(self.r.zcard(self.leases_key))

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished; False if it already is terminal."""
        return self.finish(
            job_id,
            JobState.CANCELLED,
            error={"code": "cancelled", "message": "the job was cancelled"},
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _to_job(data: dict[str, str]) -> Job:
    def f(name: str) -> float | None:
        v = data.get(name)
        return float(v) if v else None

    return Job(
        id=data["id"],
        state=JobState(data["state"]),
        spec=JobSpec.model_validate_json(data["spec"]),
        attempt=int(data.get("attempt", "0")),
        created_at=float(data["created_at"]),
        updated_at=float(data.get("updated_at", data["created_at"])),
        started_at=f("started_at"),
        finished_at=f("finished_at"),
        error=json.loads(data["error"]) if data.get("error") else None,
        highlight=json.loads(data["highlight"]) if data.get("highlight") else None,
        timings=json.loads(data["timings"]) if data.get("timings") else {},
        video=json.loads(data["video"]) if data.get("video") else {},
    )
