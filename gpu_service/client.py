"""The workers' side of the contract with the GPU daemon.

A worker process holds one :class:`GpuClient` (create it in the process that uses it;
its producer attaches lazily and reattaches by itself after a fork or a daemon
restart). For a job the worker's :class:`workers.preprocess.SlotSink` reserves
shared-memory slots through :attr:`GpuClient.producer` and lets the decoder write frames
straight into them, publishing each full chunk as soon as it is full (so the daemon
starts on a job's first chunk while the rest is still decoding). Product images travel
the same way as one ``refs`` chunk. Results come back on the job's Redis list;
:meth:`GpuClient.collect` waits for exactly the chunks that were published, for this
generation only.

Daemon restarts: every daemon process announces a new ``boot`` id in its heartbeat
(:mod:`gpu_service.daemon`). A worker reads it before publishing a job's first item
(:meth:`GpuClient.daemon_boot`) and, while it waits for results, checks it every
:data:`BOOT_CHECK_S` and before counting each result. A restarted daemon takes over
what is still in the arena (ready items, and those the dead one was reading), but the
results of items the dead one had already read and not yet published are lost. So once
the boot id changes, :meth:`GpuClient.collect` keeps waiting only when the dead daemon
delivered nothing of this pass and every item is in the arena or answered by the new
daemon (within :data:`RESTART_GRACE_S`, for items the new daemon is computing);
otherwise it takes the job's items back and fails the attempt with ``gpu_unavailable``
(retried) within seconds, instead of waiting ``inference_timeout_s`` for results that
will never come. (A dead daemon that delivered part of a job also took its product
images, which the new one does not have.)

Captions: :meth:`GpuClient.request_caption` pushes a small caption request onto the
deployment's Redis list (never the arena; see :mod:`gpu_service.captions`), but only
when the node's daemon advertises a copywriter with real weights in its heartbeat
(:meth:`GpuClient.copywriter_ready`). :meth:`GpuClient.collect` then also waits for
the caption answer, at most ``caption_grace_s`` after the last frame result (the
request was sent before decoding, so it is normally there first). A caption that
fails, or does not come, is logged and the job goes on without one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn

from clipline_core import constants
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings
from gpu_service import protocol
from gpu_service.shm import ChunkKind, Producer, SlotState

log = logging.getLogger("clipline.worker")

#: how long :meth:`GpuClient.collect` waits for a caption once every frame result is in
CAPTION_GRACE_S = 10.0
#: how often :meth:`GpuClient.collect` checks, while waiting, that the daemon was not restarted
BOOT_CHECK_S = 0.5
#: after a restart, how long results of items the new daemon is still computing (neither
#: in the arena nor answered yet) may take to show up before they count as lost
RESTART_GRACE_S = 2.0


class GpuClient:
    def __init__(self, settings: Settings, redis_client: Any) -> None:
        self.settings = settings
        self.redis = redis_client
        self.caption_grace_s = CAPTION_GRACE_S
        self.producer = Producer(
            settings.arena_path, settings.socket_path, settings.shm_reserve_timeout_s
        )

    def frame_spec(self) -> tuple[int, int, int]:
        """(frames per chunk, height, width) the daemon expects."""
        return self.producer.frame_spec

    def close(self) -> None:
        """Give back slots still being written and detach from the arena."""
        self.producer.close()

    # -- daemon restarts -----------------------------------------------------------
    def daemon_boot(self) -> str | None:
        """The ``boot`` id of this node's daemon (None: no heartbeat, or an older daemon)."""
        key = constants.daemon_heartbeat_key(self.settings.deployment, self.settings.daemon_name)
        raw = self.redis.hget(key, "boot")
        if not raw:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def _in_arena(self, job_id: str, generation: int) -> set[int]:
        """Chunks (refs: -1) of this generation still in the arena, ready or being read."""
        try:
            arena = self.producer.arena
        except ClipError:
            return set()
        waiting = (int(SlotState.READY), int(SlotState.CONSUMING))
        out = set()
        for i in range(arena.layout.n_slots):
            if arena.state(i) in waiting:
                d = arena.descriptor(i)
                if d is not None and d.job_id == job_id and d.generation == generation:
                    out.add(-1 if d.kind == ChunkKind.REFS else d.chunk)
        return out

    def _answered(self, key: str, generation: int) -> set[int]:
        """Chunks of this generation whose results wait in the job's results list."""
        out = set()
        for raw in self.redis.lrange(key, 0, -1):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                msg = json.loads(raw)
                if msg.get("kind") != protocol.CAPTION_KIND and msg.get("generation") == generation:
                    out.add(int(msg["chunk"]))
        return out

    def _all_accounted(
        self,
        job_id: str,
        generation: int,
        expected: int,
        got: dict[int, dict[str, Any]],
        in_hand: dict[str, Any] | None,
    ) -> bool:
        """After a restart: is every item of this pass in the arena or answered?"""
        key = constants.results_key(self.settings.deployment, job_id)
        known = self._in_arena(job_id, generation) | self._answered(key, generation) | set(got)
        if in_hand is not None and in_hand.get("generation") == generation:
            with contextlib.suppress(KeyError, ValueError, TypeError):
                known.add(int(in_hand["chunk"]))
        return len(known) >= expected

    def _restart_lost(self, job_id: str, generation: int, expected: int, got: int) -> NoReturn:
        """Take the job's items back and fail the attempt (retried): results were lost."""
        self.producer.withdraw(job_id, generation)
        raise ClipError(
            ErrorCode.GPU_UNAVAILABLE,
            f"the GPU daemon restarted while {expected - got} of {expected} results of "
            "this job were outstanding; the job is retried",
            transient=True,
        )

    # -- captions ----------------------------------------------------------------
    def copywriter_ready(self) -> bool:
        """Whether this node's daemon advertises a copywriter with real weights."""
        key = constants.daemon_heartbeat_key(self.settings.deployment, self.settings.daemon_name)
        raw = self.redis.hget(key, "models")
        if not raw:
            return False
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        _backend, trusted = protocol.parse_models(text).get(constants.CAPTION_MODEL, ("", False))
        return trusted

    def request_caption(
        self, job_id: str, generation: int, title: str, description: str, priority: int
    ) -> bool:
        """Ask the daemon for a caption if it can write one; True if a request was sent.

        Nothing is sent without a title or description, or when the node's daemon has
        no copywriter with real weights (the caption then stays null).
        """
        if not (title.strip() or description.strip()) or not self.copywriter_ready():
            return False
        s = self.settings
        ttl_s = max(s.inference_timeout_s, s.job_time_limit_s, s.job_soft_time_limit_s, 60.0)
        req = protocol.CaptionRequest.make(
            job_id=job_id,
            generation=generation,
            title=title,
            description=description,
            priority=priority,
            now=time.time(),
            ttl_s=ttl_s,
        )
        key = constants.caption_requests_key(s.deployment)
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(key, req.dumps())
        pipe.expire(key, int(ttl_s) + 1)
        pipe.execute()
        return True

    # -- results -------------------------------------------------------------------
    def collect(
        self,
        job_id: str,
        generation: int,
        expected: int,
        timeout_s: float,
        heartbeat: Callable[[], None] | None = None,
        caption_generation: int | None = None,
        boot: str | None = None,
        on_result: Callable[[int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Wait for ``expected`` results of this generation; raise ``gpu_unavailable`` on timeout.

        ``on_result`` is called with the number of this generation's results received so
        far, after each one (progress reporting; it must not raise).

        With ``caption_generation`` (the ``generation`` a caption request was sent with), also
        wait for that caption's answer, at most ``caption_grace_s`` after the last
        result; when it comes (even with an error) it is the last item returned.

        ``boot`` is :meth:`daemon_boot` from before the first item was published (None:
        the first one seen while waiting). When the daemon restarts meanwhile and results
        were lost, this raises ``gpu_unavailable`` within about :data:`BOOT_CHECK_S`
        of the new daemon's first heartbeat (see the module doc).
        """
        key = constants.results_key(self.settings.deployment, job_id)
        deadline = time.monotonic() + timeout_s
        got: dict[int, dict[str, Any]] = {}
        caption: dict[str, Any] | None = None
        caption_until: float | None = None
        checked = 0.0
        restarted_at: float | None = None  # a restart seen, its survivors not yet known
        while len(got) < expected or (caption_generation is not None and caption is None):
            now = time.monotonic()
            if len(got) >= expected:  # only the caption is missing
                if caption_until is None:
                    caption_until = min(deadline, now + self.caption_grace_s)
                if now >= caption_until:
                    log.warning(
                        "job %s: no caption from the GPU daemon within %.1f s of the last "
                        "result; finishing without one",
                        job_id,
                        self.caption_grace_s,
                    )
                    break
                remaining = caption_until - now
            else:
                remaining = deadline - now
            if remaining <= 0:
                self.producer.withdraw(job_id, generation)
                raise ClipError(
                    ErrorCode.GPU_UNAVAILABLE,
                    f"the GPU daemon returned {len(got)} of {expected} results "
                    f"within {timeout_s:.0f} s",
                )
            # Block well under the client's socket timeout (redis-py's default is 5 s),
            # or a quiet wait would surface as a socket error instead of a retry.
            item = self.redis.blpop([key], timeout=max(0.1, min(BOOT_CHECK_S, remaining)))
            if heartbeat is not None:
                heartbeat()
            msg = json.loads(item[1]) if item is not None else None
            now = time.monotonic()
            if msg is not None or now - checked >= BOOT_CHECK_S:
                # Before counting a result: a new daemon's heartbeat precedes its results.
                checked = now
                current = self.daemon_boot()
                if current is not None and boot is None:
                    boot = current
                elif current is not None and current != boot:
                    boot = current
                    if len(got) < expected:
                        restarted_at = now
                        if got:  # the dead daemon delivered part of this pass
                            self._restart_lost(job_id, generation, expected, len(got))
                if restarted_at is not None:
                    if self._all_accounted(job_id, generation, expected, got, msg):
                        log.info("job %s: the GPU daemon restarted; none of its items lost", job_id)
                        restarted_at = None
                    elif now - restarted_at >= RESTART_GRACE_S:
                        self._restart_lost(job_id, generation, expected, len(got))
            if msg is None:
                continue
            if msg.get("kind") == protocol.CAPTION_KIND:
                if caption_generation is None or msg.get("generation") != caption_generation:
                    continue  # not asked for, or for an earlier generation
                if msg.get("error"):
                    log.warning("job %s: the caption failed: %s", job_id, msg["error"])
                caption = msg
                continue
            if msg.get("generation") != generation:
                continue  # a late answer for an earlier generation
            if msg.get("error"):
                raise ClipError(
                    ErrorCode.INTERNAL,
                    f"the GPU daemon failed on this job: {msg['error']}",
                    transient=False,
                )
            got[int(msg["chunk"])] = msg
            if on_result is not None:
                on_result(len(got))
        self.redis.delete(key)
        out = [got[k] for k in sorted(got)]
        if caption is not None:
            out.append(caption)
        return out
