"""The workers' side of the arena: reserve a slot, write into it, publish, abort.

Owns :class:`SlotLease` and :class:`Producer`. Builds on :mod:`.arena`, :mod:`.layout`
and :mod:`.locks`; must not import the consumer.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipline_core import metrics as m
from clipline_core.errors import ClipError, ErrorCode
from gpu_service.shm.arena import _PRODUCERS, Arena
from gpu_service.shm.layout import (
    _DESC,
    _DESC_AT,
    _FREE,
    _LEASE,
    _READY,
    _RECHECK_S,
    _SPECS,
    _WRITING,
    HEADER_BYTES,
    JOB_ID_BYTES,
    RECORD_BYTES,
    ChunkKind,
    _indices,
    _spec,
)

log = logging.getLogger("gpu_service.shm")


# ---------------------------------------------------------------------------
# Producer side (workers).
# ---------------------------------------------------------------------------
class SlotLease:
    """A reserved slot. Write into :meth:`array`, then :meth:`publish` (or :meth:`abort`).

    A lease that is dropped without either keeps its slot until the process exits.
    """

    def __init__(self, producer: Producer, arena: Arena, slot: int) -> None:
        self._producer = producer
        self.arena = arena
        self.slot = slot
        self.done = False

    def array(self, shape: Sequence[int], dtype: Any = np.uint8) -> np.ndarray:
        """Writable numpy view over the slot, shaped as requested."""
        return self.arena.view(self.slot, tuple(shape), np.dtype(dtype))

    def publish(
        self,
        *,
        job_id: str,
        shape: Sequence[int],
        dtype: Any = np.uint8,
        chunk: int = 0,
        priority: int = 1,
        arrival: float | None = None,
        generation: int = 1,
        kind: ChunkKind = ChunkKind.FRAMES,
    ) -> None:
        """Hand the slot's first ``prod(shape)`` elements to the consumer.

        Raises ``gpu_unavailable`` (and gives the slot up) if the arena was removed or
        replaced since the reservation: the daemon would never see this chunk.
        """
        if self.done:
            raise RuntimeError("slot already published or aborted")
        key = (shape if type(shape) is tuple else tuple(shape), dtype)
        try:
            spec = _SPECS.get(key)
        except TypeError:  # an unhashable dtype spec: validate without the cache
            spec = _spec(*key)
        if spec is None:
            spec = _spec(*key)
            if len(_SPECS) < 512:
                _SPECS[key] = spec
        nbytes, fields = spec
        arena = self.arena
        if nbytes > arena._stride:
            raise ValueError("tensor larger than the slot")
        encoded = job_id.encode()
        if len(encoded) > JOB_ID_BYTES:
            raise ValueError("job id too long")
        if arena.closed or arena.retired:
            self.abort()
            raise ClipError(
                ErrorCode.GPU_UNAVAILABLE,
                "the GPU daemon's arena was replaced or removed while this chunk was written",
            )
        _DESC.pack_into(
            arena._mm,
            HEADER_BYTES + self.slot * RECORD_BYTES + _DESC_AT,
            int(kind),
            priority,
            chunk,
            generation,
            time.time() if arrival is None else arrival,
            time.monotonic(),
            *fields,  # nbytes, ndim, dtype code, padded shape
            encoded,
        )
        arena._set_state(self.slot, _READY)
        self.done = True
        self._producer._finish(self)  # unlock: the release edge for the consumer
        self._producer.notify()
        m.HANDOFF_BYTES.inc(nbytes)  # after the wake-up: off the hand-off's path

    def abort(self) -> None:
        """Give the slot back without publishing."""
        if self.done:
            return
        self.done = True
        if not self.arena.closed:
            self.arena._set_state(self.slot, _FREE)
        self._producer._finish(self)

    def __enter__(self) -> SlotLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class Producer:
    """A worker process's handle on the daemon's arena (attaches lazily; fork-safe)."""

    def __init__(
        self, arena_path: Path, socket_path: Path, reserve_timeout_s: float = 30.0
    ) -> None:
        self.arena_path = Path(arena_path)
        self.socket_path = Path(socket_path)
        self.reserve_timeout_s = reserve_timeout_s
        self._arena: Arena | None = None
        self._lock = threading.Lock()
        self._notify_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._next = os.getpid()
        self._checked_at = 0.0
        _PRODUCERS.add(self)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._notify_lock = threading.Lock()
        self._arena = None  # closed by the arena's own fork hook
        self._sock = None
        self._next = os.getpid()

    @property
    def arena(self) -> Arena:
        with self._lock:
            return self._ensure_arena()

    def _ensure_arena(self) -> Arena:
        """The current arena, (re)attaching when it was replaced. Call with the lock held."""
        arena = self._arena
        if arena is not None and not arena.closed and not arena.retired:
            now = time.monotonic()
            if now - self._checked_at < _RECHECK_S:
                return arena
            # Also notice a file removed or replaced behind the daemons' back.
            if arena.is_current():
                self._checked_at = now
                return arena
        if arena is not None and not arena._leases:
            arena.close()
        self._arena = None
        self._arena = Arena.attach(self.arena_path)
        self._checked_at = time.monotonic()
        return self._arena

    def reserve(self, timeout_s: float | None = None) -> SlotLease:
        """Reserve a free slot, waiting up to ``timeout_s``; raise ``backpressure`` after.

        Raises ``gpu_unavailable`` if no daemon has created the arena.
        """
        timeout = self.reserve_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        deadline = start + timeout
        delay = 0.0002
        next_reclaim = start
        while True:
            with self._lock:
                arena = self._ensure_arena()
                slot = self._try_reserve(arena)
                if slot is None and time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + 0.1
                    if arena.reclaim_dead():
                        slot = self._try_reserve(arena)
            now = time.monotonic()
            if slot is not None:
                m.SHM_RESERVE_WAIT.observe(now - start)
                return SlotLease(self, arena, slot)
            if now >= deadline:
                m.SHM_RESERVE_WAIT.observe(now - start)
                raise ClipError(
                    ErrorCode.BACKPRESSURE,
                    f"no free shared-memory slot within {timeout:.1f} s "
                    f"({arena.layout.n_slots} slots all busy); will retry",
                )
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.005)

    def _try_reserve(self, arena: Arena) -> int | None:
        raw = arena._scan()
        n = len(raw)
        # Start where this producer left off, so concurrent producers rarely collide.
        start = self._next % n
        for i in _indices(raw, _FREE, start) + _indices(raw[:start], _FREE):
            if i in arena._leases or not arena._try_lock(i):
                continue
            if arena.state(i) != _FREE:
                arena._unlock(i)
                continue
            base = HEADER_BYTES + i * RECORD_BYTES
            _LEASE.pack_into(arena._mm, base + 4, arena.pid, arena._seq(i) + 1, time.monotonic(), 0)
            arena._set_state(i, _WRITING)
            self._next = i + 1
            return i
        return None

    def _finish(self, lease: SlotLease) -> None:
        with self._lock:
            arena = lease.arena
            if arena.closed:
                return
            arena._unlock(lease.slot)
            if arena is not self._arena and not arena._leases:
                arena.close()  # a replaced arena whose last lease just ended

    def notify(self) -> None:
        """Wake the daemon (best effort: it also polls)."""
        with self._notify_lock:
            for _ in range(2):
                try:
                    if self._sock is None:
                        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                        sock.setblocking(False)
                        self._sock = sock
                        sock.connect(str(self.socket_path))
                    self._sock.send(b"\x01")
                    return
                except BlockingIOError:
                    return  # the daemon's queue is full: it has wake-ups pending
                except OSError:
                    # Not running, or restarted (a new socket at the path): reconnect once.
                    if self._sock is not None:
                        self._sock.close()
                    self._sock = None

    def withdraw(self, job_id: str, generation: int | None = None) -> int:
        """Take back READY slots of ``job_id`` the daemon has not consumed yet.

        Returns how many were withdrawn; 0 when the arena is gone (nothing to take back).
        """
        count = 0
        with self._lock:
            try:
                arena = self._ensure_arena()
            except ClipError:
                return 0
            for i in _indices(arena._scan(), _READY):
                d = arena.descriptor(i)
                if d is None or d.job_id != job_id or generation not in (None, d.generation):
                    continue
                if i in arena._leases or not arena._try_lock(i):
                    continue
                try:
                    d = arena.descriptor(i)  # re-read under the lease
                    if (
                        arena.state(i) == _READY
                        and d is not None
                        and d.job_id == job_id
                        and (generation is None or d.generation == generation)
                    ):
                        arena._set_state(i, _FREE)
                        count += 1
                finally:
                    arena._unlock(i)
        return count

    @property
    def frame_spec(self) -> tuple[int, int, int]:
        """(frames per chunk, height, width) the daemon asked for."""
        lay = self.arena.layout
        return lay.frames_per_chunk, lay.frame_height, lay.frame_width

    def close(self) -> None:
        """Give back any slots still being written and detach."""
        with self._lock:
            arena = self._arena
            self._arena = None
            if arena is not None and not arena.closed:
                for slot in list(arena._leases):
                    if arena.state(slot) == _WRITING:
                        arena._set_state(slot, _FREE)
                    arena._unlock(slot)
                arena.close()
        with self._notify_lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
