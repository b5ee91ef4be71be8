"""``Prefer: wait=N`` (RFC 7240): hold an answer until the job is terminal or N s passed.

Owns :func:`requested_wait` (the ``wait`` preference of a request's ``Prefer`` headers:
the first one counts, a value that is not a whole number of seconds is ignored, as the
RFC asks of preferences a server cannot honour) and :class:`Waiters`, which grants a
wait of at most ``api_max_wait_s`` seconds to at most ``api_max_waiters`` requests of
the process at once (beyond that the preference is not applied: the answer comes at once,
without ``Preference-Applied``) and does the waiting.

A wait listens on the job's pub/sub channel, where the store announces every transition
(:meth:`clipline_core.store.JobStore.channel`), on a connection of its own made with
``redis.asyncio`` on the event loop: no thread is held and nothing is polled. The job is
read once the subscription is confirmed (so no transition can slip between reading and
listening), then again when a terminal state is announced or the time is up. Should the
subscription fail, the wait ends early and the job is answered as it is. Builds on the
ground floor only; must not import the routes or the factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import redis
import redis.asyncio

from clipline_core.job import TERMINAL, Job

log = logging.getLogger("clipline.api")

_TERMINAL_NAMES = frozenset(s.value.encode() for s in TERMINAL)
_SECONDS_RE = re.compile(r"^[0-9]{1,9}$")
#: how long a subscription may take to be confirmed before the wait goes on without it
_SUBSCRIBE_TIMEOUT_S = 5.0


def requested_wait(values: list[str]) -> int | None:
    """The seconds of the first ``wait`` preference in ``Prefer`` header ``values``.

    None when there is none, or when its value is not delta-seconds (then it is ignored).
    """
    for value in values:
        for preference in value.split(","):
            token, _, _params = preference.partition(";")
            name, eq, raw = token.partition("=")
            if name.strip().lower() != "wait":
                continue
            seconds = raw.strip().strip('"')
            if not eq or not _SECONDS_RE.match(seconds):
                return None
            return int(seconds)
    return None


class Waiters:
    """Grants and runs the waits of one API process (see the module doc)."""

    def __init__(self, redis_url: str, max_wait_s: int, max_waiters: int) -> None:
        self.redis_url = redis_url
        self.max_wait_s = max(0, max_wait_s)
        self.max_waiters = max(0, max_waiters)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self, requested: int | None) -> AsyncIterator[int | None]:
        """The seconds granted to a request that asked for ``requested`` (None: none
        asked, or every slot is taken); the slot is held until the block ends."""
        if requested is None or self.waiting >= self.max_waiters:
            yield None
            return
        self.waiting += 1
        try:
            yield min(requested, self.max_wait_s)
        finally:
            self.waiting -= 1

    async def until_terminal(
        self, channel: str, seconds: float, read: Callable[[], Awaitable[Job]]
    ) -> Job:
        """``read()`` once the job is terminal, or once ``seconds`` passed."""
        if seconds <= 0:
            return await read()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        client = redis.asyncio.Redis.from_url(
            self.redis_url, socket_connect_timeout=2.0, socket_timeout=_SUBSCRIBE_TIMEOUT_S
        )
        pubsub = client.pubsub()
        try:
            try:
                await pubsub.subscribe(channel)
                await pubsub.get_message(timeout=_SUBSCRIBE_TIMEOUT_S)  # the confirmation
            except redis.RedisError as exc:
                log.warning("cannot wait on %s: %s: %s", channel, type(exc).__name__, exc)
                return await read()
            job = await read()
            while not job.terminal:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return await read()  # as it is now
                try:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=remaining
                    )
                except redis.RedisError as exc:
                    log.warning("lost the wait on %s: %s", channel, type(exc).__name__)
                    return await read()
                if message is not None and message.get("data") in _TERMINAL_NAMES:
                    job = await read()
            return job
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()
