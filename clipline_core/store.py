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

Held messages: a queued job has no lease, yet its task message may sit in the memory of
one worker process only (a retry waiting on its countdown, a message received and not
started yet): the broker restores it only after its visibility timeout. So the store
records who holds it (``held_by`` in the job, and the job in a sorted set scored by when
the message is due, :func:`clipline_core.constants.held_key`): :meth:`JobStore.requeue`
names the worker whose retry message it is, :meth:`JobStore.hold` the worker that
received a message, :meth:`JobStore.claim` clears it. Every worker's main process keeps a
short-lived alive key (:meth:`JobStore.keep_alive`); the sweeper
(:meth:`JobStore.expire_held`) re-sends the message of a held job whose holder's key is
gone (the process was killed) or that is overdue by more than the grace it is given.
The sweeper that requeues or re-sends records itself as the holder in the same atomic
step and lets go (:meth:`JobStore.unhold`) once the message is in the broker. A message
sent twice is harmless: the second delivery finds the job claimed or finished.

Each transition is announced on the job's pub/sub channel so waiters need not poll.
Terminal jobs expire after ``terminal_ttl_s``.

The tenant index: the create script also adds the job to its tenant's sorted set
(:func:`clipline_core.constants.tenant_jobs_key`, scored by ``created_at``; jobs without a
tenant under :data:`LOCAL_TENANT`), trims it to the newest :data:`INDEX_CAP` entries and
keeps it ``terminal_ttl_s`` plus a day past the latest create. :meth:`JobStore.list_jobs`
pages through it newest first and removes the entries of jobs that expired as it meets
them.

One owner for a job's life: :meth:`JobStore.create` (with the ``owner`` tenant stored in
the same atomic script), :meth:`JobStore.requeue` and :meth:`JobStore.finish` (also
:meth:`cancel` and the sweeper's time-outs, which go through the same bookkeeping). A
job that ends does so here, and only here is it counted (``clipline_jobs_total{status}``,
``clipline_job_failures_total{code}``, ``clipline_job_latency_seconds``: Redis counters,
:mod:`clipline_core.job_metrics`) and the ``on_terminal`` hook called (the services pass
one that enqueues the completion callback), once per job, by whoever won the atomic
transition.

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
#: the tenant of jobs stored without one (the local tools'): they are listed under it
LOCAL_TENANT = "local"
#: a tenant's index keeps its newest jobs up to this many (older ones stay readable by id)
INDEX_CAP = 10_000
#: the most index entries one :meth:`JobStore.list_jobs` call reads (a filtered page may
#: come back short, with a position to go on from)
LIST_SCAN_MAX = 1_000
#: an index outlives the last job created into it by this much past ``terminal_ttl_s``
INDEX_TTL_MARGIN_S = 86_400
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


# KEYS[1] job hash, KEYS[2] events channel, KEYS[3] leases set, KEYS[4] held set
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
if ARGV[2] ~= $QUEUED then
  redis.call('ZREM', KEYS[4], ARGV[5])
  redis.call('HDEL', KEYS[1], 'held_by')
end
redis.call('PUBLISH', KEYS[2], ARGV[2])
return {1, cur}
"""
)

# Claim a job for processing. KEYS[1] job, KEYS[2] channel, KEYS[3] leases set,
# KEYS[4] held set. ARGV: new lease token, lease seconds, max attempts, token of a lease
# to take over ('' = none), holder identity, job id.
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
redis.call('ZREM', KEYS[4], ARGV[6])
redis.call('HDEL', KEYS[1], 'held_by')
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

# Record a running job's progress. KEYS[1] job. ARGV: lease token, progress JSON. Only
# the lease holder of an active job writes (a cancelled or expired job is left alone).
_PROGRESS = _lua(
    """local active = $ACTIVE
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
if not active[redis.call('HGET', KEYS[1], 'state')] then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
return 1
"""
)

# Recover a job whose lease expired. KEYS[1] job, KEYS[2] channel, KEYS[3] leases set,
# KEYS[4] held set. ARGV: job id, hard time limit (s, 0 = none), timeout error JSON,
# terminal ttl, worker-lost note JSON, the sweeper's identity (it holds the job's next
# message until that is sent).
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
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'held_by', ARGV[6])
  redis.call('ZADD', KEYS[4], now, ARGV[1])
end
redis.call('PUBLISH', KEYS[2], $QUEUED)
return {1, redis.call('HGET', KEYS[1], 'priority') or ''}
"""
)

# Put a running job back to queued for a retry. KEYS[1] job, KEYS[2] channel, KEYS[3]
# leases set, KEYS[4] held set. ARGV: lease token, last error JSON, job id, seconds until
# the retry is due, identity of the process holding the retry's message ('' = none).
# Returns 1 if requeued.
_REQUEUE = _lua(
    """local active = $ACTIVE
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur or not active[cur] then return 0 end
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'state', $QUEUED, 'lease', '', 'last_error', ARGV[2],
  'updated_at', string.format('%.6f', now))
redis.call('ZREM', KEYS[3], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'held_by', ARGV[5])
  redis.call('ZADD', KEYS[4], now + math.max(0, tonumber(ARGV[4])), ARGV[3])
end
redis.call('PUBLISH', KEYS[2], $QUEUED)
return 1
"""
)

# A worker process received a job's message (it now holds it in memory). KEYS[1] job,
# KEYS[2] held set. ARGV: job id, holder identity, seconds until the message is due.
# Returns 1 if recorded (only a queued job is).
_HOLD = _lua(
    """if redis.call('HGET', KEYS[1], 'state') ~= $QUEUED then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'held_by', ARGV[2])
redis.call('ZADD', KEYS[2], now + math.max(0, tonumber(ARGV[3])), ARGV[1])
return 1
"""
)

# The message is safely back in the broker: forget the holder if it is still ``ARGV[2]``.
# KEYS[1] job, KEYS[2] held set. ARGV: job id, holder identity.
_UNHOLD = """
if redis.call('HGET', KEYS[1], 'held_by') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'held_by')
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# Take over the message of a held job whose holder is gone, or that is overdue.
# KEYS[1] job, KEYS[2] held set, KEYS[3] the holder's alive key. ARGV: job id, the holder
# seen by the caller, grace seconds past due, the caller's identity (it now holds the
# job's next message). Returns {status, priority, seconds until due}: 1 holder gone,
# 2 overdue, 0 nothing to do (left alone, or dropped from the set: not queued).
_RESEND = _lua(
    """local due = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not due then return {0, '', '0'} end
due = tonumber(due)
if redis.call('HGET', KEYS[1], 'state') ~= $QUEUED then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[1], 'held_by')
  return {0, '', '0'}
end
local holder = redis.call('HGET', KEYS[1], 'held_by') or ''
if holder ~= ARGV[2] then return {0, '', '0'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local status = 0
if holder == '' or redis.call('EXISTS', KEYS[3]) == 0 then status = 1
elseif now > due + tonumber(ARGV[3]) then status = 2 end
if status == 0 then return {0, '', '0'} end
redis.call('HSET', KEYS[1], 'held_by', ARGV[4])
redis.call('ZADD', KEYS[2], math.max(due, now), ARGV[1])
local wait = string.format('%.6f', math.max(0, due - now))
return {status, redis.call('HGET', KEYS[1], 'priority') or '', wait}
"""
)

# Idempotent create. KEYS[1] idempotency key, KEYS[2] job hash, KEYS[3] held set,
# KEYS[4] the tenant's index (sorted set of job ids by created_at). ARGV: job id, body
# hash, idempotency ttl, holder of the job's first message ('' = none), index cap, index
# ttl, then job field/value pairs (created_at among them).
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
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
if ARGV[4] ~= '' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[2], 'held_by', ARGV[4])
  redis.call('ZADD', KEYS[3], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[1])
end
redis.call('ZADD', KEYS[4], tonumber(redis.call('HGET', KEYS[2], 'created_at')), ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(tonumber(ARGV[5]) + 1))
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[6]))
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


@dataclasses.dataclass(frozen=True)
class Resend:
    """A queued job whose message was lost with its holder (or is overdue): send it again."""

    job_id: str
    priority: str
    countdown_s: float  # until the message was due (0: at once)
    reason: str  # "holder_lost" | "overdue"
    holder: str  # who held it


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
        self._progress = client.register_script(_PROGRESS)
        self._create = client.register_script(_CREATE)
        self._expire = client.register_script(_EXPIRE)
        self._requeue = client.register_script(_REQUEUE)
        self._hold = client.register_script(_HOLD)
        self._unhold = client.register_script(_UNHOLD)
        self._resend = client.register_script(_RESEND)
        self.leases_key = constants.leases_key(deployment)
        self.held_key = constants.held_key(deployment)

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
        holder: str | None = None,
    ) -> tuple[str, bool]:
        """Store a new queued job; return ``(job_id, created)``.

        ``owner`` is the tenant the job belongs to (stored with the job in the same atomic
        script, field :data:`OWNER_FIELD`); None for jobs of the local tools. ``holder``
        is the submitting process, recorded as holding the job's first message until it
        calls :meth:`unhold` once the message is in the broker: a submitter that dies in
        between (its alive key expires) leaves the job to the sweeper, not stranded.

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
            job_metrics.COUNTED_FIELD: "1",
        }
        if owner is not None:
            fields[OWNER_FIELD] = owner
        index_ttl = self.terminal_ttl_s + INDEX_TTL_MARGIN_S
        argv: list[Any] = [
            job_id,
            body_hash,
            idempotency_ttl_s,
            holder or "",
            INDEX_CAP,
            index_ttl,
        ]
        for k, v in fields.items():
            argv += [k, v]
        keys = [idem, self.key(job_id), self.held_key, self.index_key(owner)]
        status, existing = self._create(keys=keys, args=argv)
        existing = _text(existing)
        if int(status) == -1:
            raise IdempotencyConflict(existing)
        if int(status) == 1:
            self._count(job_metrics.record_created, self.r, self.deployment)
        return existing, int(status) == 1

    # -- the tenant index ---------------------------------------------------------
    def index_key(self, tenant: str | None) -> str:
        """The sorted set listing ``tenant``'s jobs (None: the local tools')."""
        return constants.tenant_jobs_key(self.deployment, tenant or LOCAL_TENANT)

    def list_jobs(
        self,
        tenant: str | None,
        *,
        limit: int = 20,
        after: tuple[float, str] | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        states: frozenset[JobState] | None = None,
        scan_max: int = LIST_SCAN_MAX,
    ) -> tuple[list[dict[str, str]], tuple[float, str] | None]:
        """A page of ``tenant``'s stored jobs, newest first: ``(raw jobs, position)``.

        ``after`` is the position (``created_at``, id) of the last job of the previous
        page; jobs created strictly between ``created_after`` and ``created_before``, in
        ``states`` (None: any), at most ``limit`` of them. The returned position is where
        the next page starts, None when nothing is left. At most ``scan_max`` index
        entries are read: a page of a filtered listing may come back short (even empty)
        with a position. Entries whose job expired are removed from the index here.
        """
        key = self.index_key(tenant)
        pos = after
        if pos is not None and created_before is not None and created_before <= pos[0]:
            pos = None  # the bound lies above the position: start from the bound
        out: list[dict[str, str]] = []
        scanned = 0
        while scanned < scan_max:
            want = min(max(limit + 1, 50), scan_max - scanned)
            members = self._index_after(key, pos, created_after, created_before, want)
            pipe = self.r.pipeline(transaction=False)
            for job_id, _ in members:
                pipe.hgetall(self.key(job_id))
            gone: list[str] = []
            full = False
            for (job_id, score), data in zip(members, pipe.execute(), strict=True):
                if len(out) == limit:
                    full = True  # another entry follows the page
                    break
                scanned += 1
                pos = (score, job_id)
                raw = {_text(k): _text(v) for k, v in data.items()}
                if "state" not in raw:
                    gone.append(job_id)
                elif states is None or raw["state"] in states:
                    out.append(raw)
            if gone:
                self.r.zrem(key, *gone)
            if full:
                return out, pos
            if len(members) < want:
                return out, None  # the index ends here
        return out, pos

    def _index_after(
        self,
        key: str,
        pos: tuple[float, str] | None,
        created_after: float | None,
        created_before: float | None,
        count: int,
    ) -> list[tuple[str, float]]:
        """Up to ``count`` index entries ``(id, created_at)`` after ``pos``, newest first.

        Entries created at the same instant are ordered by id (descending), so a position
        is unambiguous whatever else is added or removed meanwhile.
        """
        low = f"({created_after!r}" if created_after is not None else "-inf"
        out: list[tuple[str, float]] = []
        if pos is None:
            high = f"({created_before!r}" if created_before is not None else "+inf"
        else:
            score, job_id = pos
            if created_after is not None and score <= created_after:
                return []
            ties: Any = self.r.zrangebyscore(key, repr(score), repr(score), withscores=True)
            same = sorted((_text(m) for m, _ in ties if _text(m) < job_id), reverse=True)
            out = [(m, score) for m in same[:count]]
            high = f"({score!r}"
        if len(out) < count:
            rest: Any = self.r.zrevrangebyscore(
                key, high, low, start=0, num=count - len(out), withscores=True
            )
            out += [(_text(m), float(sc)) for m, sc in rest]
        return out

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
        ttl_s: int | None = None,
        **fields: Any,
    ) -> bool:
        """Atomically move to ``to`` if in ``allowed_from`` (and ``lease`` still ours).

        A terminal job expires after ``ttl_s`` (None: ``terminal_ttl_s``).
        """
        ttl = self.terminal_ttl_s if ttl_s is None or ttl_s <= 0 else ttl_s
        argv: list[Any] = [
            ",".join(s.value for s in allowed_from),
            to.value,
            lease,
            str(ttl) if to in TERMINAL else "",
            job_id,
        ]
        if to in TERMINAL:
            fields.setdefault("finished_at", f"{time.time():.6f}")
            fields.setdefault("lease", "")
        elif to not in ACTIVE:
            fields.setdefault("lease", "")
        for k, v in fields.items():
            argv += [k, v if isinstance(v, str) else json.dumps(v)]
        keys = [self.key(job_id), self.channel(job_id), self.leases_key, self.held_key]
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
        ttl_s: int | None = None,
        **fields: Any,
    ) -> bool:
        """End a job: move it to terminal state ``to``, count it, call ``on_terminal``.

        Only the caller whose atomic transition wins does the bookkeeping, so a job is
        counted and its callback enqueued once however many processes race to end it.
        ``error`` is the failure (``{"code", "message"}``) of a failed or cancelled job;
        ``ttl_s`` how long the ended job is kept (None: ``terminal_ttl_s``; a job whose
        clip expires sooner goes with it).
        """
        if to not in TERMINAL:
            raise ValueError(f"{to.value} is not a terminal state")
        fields["error"] = "" if error is None else json.dumps(error)
        if not self.transition(job_id, allowed_from, to, lease=lease, ttl_s=ttl_s, **fields):
            return False
        self._ended(job_id, to, (error or {}).get("code", ""))
        return True

    def requeue(
        self,
        job_id: str,
        lease: str,
        last_error: dict[str, str],
        *,
        retry_in_s: float = 0.0,
        holder: str = "",
    ) -> bool:
        """Put a job that is running under ``lease`` back to ``queued`` (to be retried).

        ``holder`` is the worker process that holds the retry's message (due in
        ``retry_in_s``); it is recorded in the same atomic step (see :meth:`hold`).
        """
        keys = [self.key(job_id), self.channel(job_id), self.leases_key, self.held_key]
        args: list[Any] = [lease, json.dumps(last_error), job_id, retry_in_s, holder]
        return bool(int(self._requeue(keys=keys, args=args)))

    # -- held messages ---------------------------------------------------------------
    def hold(self, job_id: str, holder: str, due_in_s: float = 0.0) -> bool:
        """Record that ``holder`` (a worker's main process) holds the queued job's message,
        due in ``due_in_s``; False (nothing recorded) unless the job is queued."""
        keys = [self.key(job_id), self.held_key]
        return bool(int(self._hold(keys=keys, args=[job_id, holder, max(0.0, due_in_s)])))

    def unhold(self, job_id: str, holder: str) -> bool:
        """``holder`` handed the job's message back to the broker: forget it (if still its)."""
        return bool(
            int(self._unhold(keys=[self.key(job_id), self.held_key], args=[job_id, holder]))
        )

    def held_by(self, job_id: str) -> str:
        """The process recorded as holding the queued job's message ('' when none)."""
        return _text(self.r.hget(self.key(job_id), "held_by") or b"")

    def alive_key(self, holder: str) -> str:
        return constants.worker_alive_key(self.deployment, holder)

    def keep_alive(self, holder: str, ttl_s: float) -> None:
        """Refresh ``holder``'s alive key (call well within ``ttl_s``, from its own process)."""
        self.r.set(self.alive_key(holder), "1", px=max(1, int(ttl_s * 1000)))

    def drop_alive(self, holder: str) -> None:
        self.r.delete(self.alive_key(holder))

    def expire_held(self, grace_s: float, holder: str, limit: int = 1000) -> list[Resend]:
        """Take over held messages that were lost; the caller re-sends each, then calls
        :meth:`unhold` with ``holder`` (its own identity).

        A queued job's message is lost when the process that held it is gone (its alive
        key expired: it was killed) or it is overdue by more than ``grace_s`` (it should
        have started by now). Taking one over records ``holder`` as its new holder in the
        same atomic step, so a sweeper that dies before re-sending is itself swept.
        """
        raw: Any = self.r.zrange(self.held_key, 0, limit - 1, withscores=True)
        members: list[tuple[Any, float]] = list(raw)
        if not members:
            return []
        secs, micros = self.r.time()
        now = float(secs) + float(micros) / 1e6
        ids = [_text(m) for m, _ in members]
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.key(job_id), "held_by")
        holders = [_text(h or b"") for h in pipe.execute()]
        pipe = self.r.pipeline(transaction=False)
        for h in holders:
            pipe.exists(self.alive_key(h))
        alive = [bool(x) and bool(h) for x, h in zip(pipe.execute(), holders, strict=True)]
        out: list[Resend] = []
        for job_id, (_, due), was, live in zip(ids, members, holders, alive, strict=True):
            if live and now <= float(due) + grace_s:
                continue
            keys = [self.key(job_id), self.held_key, self.alive_key(was)]
            status, priority, wait = self._resend(keys=keys, args=[job_id, was, grace_s, holder])
            if int(status):
                reason = "holder_lost" if int(status) == 1 else "overdue"
                out.append(Resend(job_id, _text(priority), float(_text(wait)), reason, was))
        return out

    @staticmethod
    def _count(record: Callable[..., None], *args: Any) -> None:
        """Job metrics bookkeeping (Redis); a failure is logged, never raised."""
        try:
            record(*args)
        except redis.RedisError as exc:
            log.warning("job metrics not recorded: %s", exc)

    def _ended(self, job_id: str, state: JobState, code: str) -> None:
        self._count(job_metrics.record_end, self.r, self.deployment, job_id, state.value, code)
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
            keys=[self.key(job_id), self.channel(job_id), self.leases_key, self.held_key],
            args=[lease, lease_s, max_attempts, steal, holder or holder_identity(), job_id],
        )
        cur = _text(cur)
        return int(status), cur, int(attempt)

    def renew(self, job_id: str, lease: str, lease_s: float) -> bool:
        keys = [self.key(job_id), self.leases_key]
        return bool(int(self._renew(keys=keys, args=[lease, lease_s, job_id])))

    def set_progress(self, job_id: str, lease: str, progress: dict[str, Any]) -> bool:
        """Write a running job's ``progress`` (:class:`clipline_core.job.JobProgress`).

        Only while ``lease`` holds the job and it is active; False otherwise.
        """
        body = json.dumps(progress, separators=(",", ":"))
        return bool(int(self._progress(keys=[self.key(job_id)], args=[lease, body])))

    def lease_holder(self, job_id: str) -> tuple[str, str]:
        """(lease token, holder identity) of a job ('' when none)."""
        token, owner = self.r.hmget(self.key(job_id), ["lease", "lease_owner"])
        return _text(token or b""), _text(owner or b"")

    def expire_leases(
        self,
        time_limit_s: float,
        timeout_error: dict[str, str],
        limit: int = 100,
        *,
        holder: str = "",
    ) -> list[Expired]:
        """Recover jobs whose lease expired (see the module doc); return what was done.

        A requeued job is recorded as held by ``holder`` (the caller, who re-sends its
        task and then calls :meth:`unhold`), so it is not lost if the caller dies first.
        """
        secs, micros = self.r.time()
        now = float(secs) + float(micros) / 1e6
        due = self.r.zrangebyscore(self.leases_key, "-inf", now, start=0, num=limit)
        note = json.dumps({"code": "worker_lost", "message": "the worker running the job stopped"})
        out: list[Expired] = []
        for raw in due:
            job_id = _text(raw)
            keys = [self.key(job_id), self.channel(job_id), self.leases_key, self.held_key]
            args: list[Any] = [
                job_id,
                time_limit_s,
                json.dumps(timeout_error),
                self.terminal_ttl_s,
                note,
                holder,
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
        progress=json.loads(data["progress"]) if data.get("progress") else None,
    )
