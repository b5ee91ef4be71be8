"""HMAC-SHA256 signatures of completion callbacks (sign on the worker, verify on a backend).

A callback carries the header ``Clipline-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]``.
``<hex>`` is ``HMAC-SHA256(secret, "<t>." + raw body)`` in lowercase hex; one ``v1``
appears per configured secret so that secrets can be rotated without a gap. A receiver
recomputes the HMAC over the exact bytes it received, compares in constant time, and
rejects timestamps further than a tolerance (default 5 minutes) from its clock, which
bounds replays; the event ``id`` lets it drop duplicates inside that window.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable

DEFAULT_TOLERANCE_S = 300
SCHEME = "v1"


class SignatureError(ValueError):
    """The signature header is missing, malformed, stale or does not match."""


def split_secrets(value: str) -> list[str]:
    """The secrets of a comma-separated setting (blank entries dropped)."""
    return [s.strip() for s in value.split(",") if s.strip()]


def compute(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return mac.hexdigest()


def sign(secrets: Iterable[str], body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for ``body``, signed with every secret."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    parts = [f"t={ts}"] + [f"{SCHEME}={compute(s, ts, body)}" for s in secrets]
    if len(parts) == 1:
        raise ValueError("no callback secret to sign with")
    return ",".join(parts)


def parse(header: str) -> tuple[int, list[str]]:
    """``(timestamp, [v1 signatures])`` of a header value; raises SignatureError."""
    ts: int | None = None
    sigs: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("malformed signature header")
        if key == "t":
            if not value.isdigit():
                raise SignatureError("malformed timestamp in signature header")
            ts = int(value)
        elif key == SCHEME:
            sigs.append(value)
    if ts is None or not sigs:
        raise SignatureError("signature header lacks t= or v1=")
    return ts, sigs


def verify(
    secret: str,
    body: bytes,
    header: str | None,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> int:
    """Check a callback's signature; return its timestamp or raise :class:`SignatureError`."""
    if not header:
        raise SignatureError("missing signature header")
    ts, sigs = parse(header)
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise SignatureError(f"timestamp {ts} is outside the {tolerance_s:.0f} s tolerance")
    expected = compute(secret, ts, body).encode()
    # Compare against every v1 without stopping early.
    matched = False
    for sig in sigs:
        matched |= hmac.compare_digest(expected, sig.encode("utf-8", "replace"))
    if not matched:
        raise SignatureError("signature does not match")
    return ts
