"""Jobs in Redis: atomic state transitions, leases, idempotent creation.

Each job is one Redis hash (``clipline:<deployment>:job:<id>``). Every transition is
one Lua script, so it is atomic: it checks the current state (and, while a worker
runs the job, the worker's lease token) before writing. That is what makes delivery
safe when Celery delivers a task twice: the second delivery either finds a terminal
job (no-op) or a job under a live lease held by someone else (no-op), and only takes
over a job whose lease expired (its worker died).

Each transition is announced on the job's pub/sub channel so waiters need not poll.
Terminal jobs expire after ``terminal_ttl_s``.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import redis

from clipline import constants
from workers.job import ACTIVE, TERMINAL, Job, JobSpec, JobState

# KEYS[1] job hash, KEYS[2] events channel
# ARGV: allowed-from (comma list), to-state, lease token ('' = not checked),
#       ttl for terminal ('' = none), then field/value pairs
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == cur then allowed = true end end
if not allowed then return {0, cur} end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'lease') ~= ARGV[3] then return {0, cur} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated_at', string.format('%.6f', now))
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[4] ~= '' then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4])) end
redis.call('PUBLISH', KEYS[2], ARGV[2])
return {1, cur}
"""

# Claim a job for processing. KEYS[1] job, KEYS[2] channel.
# ARGV: new lease token, lease seconds, max attempts.
# Returns {status, state, attempt}: status 1 claimed, 0 not claimable, 2 attempts exhausted.
_CLAIM = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, '', 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if cur ~= 'queued' then
  if cur ~= 'fetching' and cur ~= 'decoding' and cur ~= 'inferring' and cur ~= 'rendering' then
    return {0, cur, 0}
  end
  local until_ = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if until_ > now then return {0, cur, 0} end
end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') + 1
if attempt > tonumber(ARGV[3]) then return {2, cur, attempt - 1} end
redis.call('HSET', KEYS[1], 'state', 'fetching', 'attempt', attempt, 'lease', ARGV[1],
  'lease_until', string.format('%.6f', now + tonumber(ARGV[2])),
  'updated_at', string.format('%.6f', now))
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', string.format('%.6f', now))
end
redis.call('PUBLISH', KEYS[2], 'fetching')
return {1, cur, attempt}
"""

# Extend a lease. KEYS[1] job. ARGV token, seconds. Returns 1 if still ours.
_RENEW = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= 'fetching' and st ~= 'decoding' and st ~= 'inferring' and st ~= 'rendering' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'lease_until', string.format('%.6f', now + tonumber(ARGV[2])))
return 1
"""

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


class IdempotencyConflict(Exception):
    """The idempotency key was already used with a different request body."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"idempotency key already used for job {job_id} with another body")
        self.job_id = job_id


class JobStore:
    """Reads and writes jobs of one deployment."""

    def __init__(self, client: redis.Redis, deployment: str, terminal_ttl_s: int = 7 * 24 * 3600):
        self.r = client
        self.deployment = deployment
        self.terminal_ttl_s = terminal_ttl_s
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._create = client.register_script(_CREATE)

    def key(self, job_id: str) -> str:
        return constants.job_key(self.deployment, job_id)

    def channel(self, job_id: str) -> str:
        return constants.job_events_channel(self.deployment, job_id)

    # -- creation ---------------------------------------------------------------
    def create(
        self, spec: JobSpec, idempotency_key: str | None = None, idempotency_ttl_s: int = 86400
    ) -> tuple[str, bool]:
        """Store a new queued job; return ``(job_id, created)``.

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
        ]
        if to in TERMINAL:
            fields.setdefault("finished_at", f"{time.time():.6f}")
            fields.setdefault("lease", "")
        for k, v in fields.items():
            argv += [k, v if isinstance(v, str) else json.dumps(v)]
        ok, _ = self._transition(keys=[self.key(job_id), self.channel(job_id)], args=argv)
        return bool(int(ok))

    def advance(self, job_id: str, to: JobState, lease: str, **fields: Any) -> bool:
        """Move an active job (held under ``lease``) to the next state."""
        return self.transition(job_id, ACTIVE, to, lease=lease, **fields)

    def claim(
        self, job_id: str, lease: str, lease_s: float, max_attempts: int
    ) -> tuple[int, str, int]:
        """Try to take a job for processing; see ``_CLAIM`` for the status codes."""
        status, cur, attempt = self._claim(
            keys=[self.key(job_id), self.channel(job_id)], args=[lease, lease_s, max_attempts]
        )
        cur = _text(cur)
        return int(status), cur, int(attempt)

    def renew(self, job_id: str, lease: str, lease_s: float) -> bool:
        return bool(int(self._renew(keys=[self.key(job_id)], args=[lease, lease_s])))

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished; False if it already is terminal."""
        nonterminal = {JobState.QUEUED, *ACTIVE}
        return self.transition(
            job_id,
            nonterminal,
            JobState.CANCELLED,
            error=json.dumps({"code": "cancelled", "message": "the job was cancelled"}),
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
