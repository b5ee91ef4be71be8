"""API keys (stored hashed, compared in constant time) and the per-key rate limit.

Configuration never holds a key itself, only its SHA-256: ``CLIPLINE_API_KEYS`` is a
comma-separated list and ``CLIPLINE_API_KEY_FILE`` a file with one entry per line
(``#`` starts a comment), each entry ``ID:SHA256HEX[:SCOPES[:TENANT]]``. ``ID`` names
the key in logs and metrics (the key itself is never logged); ``SCOPES`` is a
``+``-separated subset of ``submit``, ``read``, ``cancel`` (all three when omitted or
empty); ``TENANT`` (default: the key's ID) owns the jobs the key creates: keys of one
tenant see each other's jobs and share idempotency keys, other tenants get 404
(:meth:`ApiKey.sees`, the one rule every job route applies). Jobs stored without a
tenant (the local tools' jobs, e.g. ``clipline highlight`` into a running stack) belong
to the tenant :data:`LOCAL_TENANT`, the local stack's own key; no other key sees them. Keys
are random tokens of 256 bits (:func:`new_key`), so a plain SHA-256 is a sound way to
store them.

The rate limit is a GCRA token bucket in Redis (one Lua call per request), so it holds
across API replicas and uvicorn workers: ``rate`` requests per second per key, with
bursts of up to ``burst`` requests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import re
import secrets
from pathlib import Path
from typing import Any

from clipline_core import constants
from clipline_core.settings import Settings

# LOCAL_TENANT: the tenant of jobs stored without one (the local tools') and of the local
# stack's key; the store lists such jobs under it.
from clipline_core.store import LOCAL_TENANT as LOCAL_TENANT

SCOPES: frozenset[str] = frozenset({"submit", "read", "cancel"})
KEY_PREFIX = "clk_"
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


class KeyConfigError(ValueError):
    """An API key entry in the configuration is malformed."""


@dataclasses.dataclass(frozen=True)
class ApiKey:
    id: str
    digest: bytes
    scopes: frozenset[str]
    tenant: str

    def sees(self, owner: str | None) -> bool:
        """Whether a job stored with tenant ``owner`` (None or empty: none) is visible."""
        return (owner or LOCAL_TENANT) == self.tenant


def new_key() -> str:
    """A fresh random API key (give it to the backend; configure only its hash)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def entry(
    key_id: str, key: str, scopes: frozenset[str] | None = None, tenant: str | None = None
) -> str:
    """The configuration entry for ``key`` (what goes into CLIPLINE_API_KEYS)."""
    base = f"{key_id}:{hash_key(key)}"
    listed = "" if scopes is None or scopes == SCOPES else "+".join(sorted(scopes))
    if tenant is not None and tenant != key_id:
        return f"{base}:{listed}:{tenant}"
    return f"{base}:{listed}" if listed else base


def parse_entry(text: str) -> ApiKey:
    parts = text.strip().split(":")
    if len(parts) not in (2, 3, 4):
        raise KeyConfigError("an API key entry is ID:SHA256HEX[:SCOPES[:TENANT]]")
    key_id, digest = parts[0], parts[1].lower()
    if not _ID_RE.match(key_id):
        raise KeyConfigError(f"invalid API key id {key_id!r}")
    if not _HEX_RE.match(digest):
        raise KeyConfigError(f"API key {key_id!r}: the hash must be 64 hex digits (SHA-256)")
    scopes = SCOPES
    if len(parts) >= 3 and parts[2]:
        scopes = frozenset(s for s in parts[2].split("+") if s)
        unknown = scopes - SCOPES
        if unknown or not scopes:
            raise KeyConfigError(
                f"API key {key_id!r}: scopes must be a +-list of {', '.join(sorted(SCOPES))}"
            )
    tenant = parts[3] if len(parts) == 4 else key_id
    if not _ID_RE.match(tenant):
        raise KeyConfigError(f"API key {key_id!r}: invalid tenant {tenant!r}")
    return ApiKey(key_id, bytes.fromhex(digest), scopes, tenant)


def load_keys(settings: Settings) -> list[ApiKey]:
    """Every configured key; raises :class:`KeyConfigError` on a bad entry or duplicate id."""
    entries = [e for e in settings.api_keys.split(",") if e.strip()]
    if settings.api_key_file:
        try:
            text = Path(settings.api_key_file).read_text()
        except OSError as exc:
            raise KeyConfigError(f"cannot read the API key file: {exc}") from exc
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append(line)
    keys = [parse_entry(e) for e in entries]
    ids = [k.id for k in keys]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise KeyConfigError(f"duplicate API key ids: {', '.join(dupes)}")
    return keys


class KeyRing:
    """Looks up a presented bearer token among the configured key hashes."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    def authenticate(self, token: str) -> ApiKey | None:
        """The key ``token`` is, or None. Compares against every entry, in constant time."""
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


# GCRA. KEYS[1] state key. ARGV: emission interval (s), burst (requests).
# Returns {1, '0'} allowed, or {0, seconds to wait}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, string.format('%.6f', tat - now - tolerance)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX',
  math.ceil((new_tat - now) * 1000) + 1000)
return {1, '0'}
"""


class RateLimiter:
    """Per-key request rate limit shared by every API process through Redis."""

    def __init__(self, client: Any, deployment: str, rate: float, burst: int) -> None:
        self.deployment = deployment
        self.rate = rate
        self.burst = burst if burst > 0 else max(1, math.ceil(rate))
        self._script = client.register_script(_GCRA)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, key_id: str) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        if not self.enabled:
            return 0.0
        ok, wait = self._script(
            keys=[constants.rate_limit_key(self.deployment, key_id)],
            args=[1.0 / self.rate, self.burst],
        )
        if int(ok):
            return 0.0
        return max(float(wait.decode() if isinstance(wait, bytes) else wait), 1e-3)
