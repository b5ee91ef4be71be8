"""The daemon's side of the arena: take ready slots, map them zero-copy, release, recover.

Owns :class:`Consumer` (one thread), which also owns the wake-up socket. Builds on
:mod:`.arena`, :mod:`.layout`, :mod:`.locks` and :mod:`.wake`; must not import the
producer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipline_core import metrics as m
from gpu_service.shm.arena import Arena
from gpu_service.shm.layout import (
    _CONSUMING,
    _FREE,
    _READY,
    ArenaLayout,
    Descriptor,
    _decode,
    _indices,
)
from gpu_service.shm.wake import _bind_socket

log = logging.getLogger("gpu_service.shm")


# ---------------------------------------------------------------------------
# Consumer side (the daemon).
# ---------------------------------------------------------------------------
class Consumer:
    """The daemon's side: owns the arena file and the wake-up socket (one thread)."""

    def __init__(
        self,
        arena_path: Path,
        socket_path: Path,
        layout: ArenaLayout,
        deployment: str,
        starvation_age_s: float = 10.0,
        spin_s: float = 0.0,
    ) -> None:
        self.arena = Arena.create(Path(arena_path), layout, deployment)
        self.socket_path = Path(socket_path)
        self.starvation_age_s = starvation_age_s
        #: before sleeping on the wake-up socket, poll the slot states this long
        #: (yielding the core between polls): a sleeping thread on a VM takes ~100 µs
        #: to wake, a polling one sees a publish within a few µs
        self.spin_s = spin_s
        try:
            self._sock, self._sock_inode = _bind_socket(self.socket_path)
        except BaseException:
            self.arena.close()
            raise
        self._poll = select.poll()
        self._poll.register(self._sock.fileno(), select.POLLIN)
        self._pending: dict[int, Descriptor] = {}
        # slot -> (record bytes, descriptor): the daemon peeks often, decode once.
        self._cache: dict[int, tuple[bytes, Descriptor]] = {}
        self._pid = os.getpid()
        self._closed = False
        self._handoffs: list[float] = []  # observed off the hot path, see _flush_metrics
        # slot -> (shape, dtype, view): the last numpy / torch view made of each slot.
        self._arrays: dict[int, tuple[tuple[int, ...], np.dtype[Any], np.ndarray]] = {}
        self._tensors: dict[int, tuple[tuple[int, ...], np.dtype[Any], Any]] = {}
        m.SHM_SLOTS_TOTAL.set(self.arena.layout.n_slots)
        m.SHM_SLOTS_IN_USE.set(self.arena.slots_in_use())

    def wait(self, timeout_s: float) -> bool:
        """Wait until a producer signals or ``timeout_s`` passes; True if signalled.

        Signals already queued are drained without blocking. After blocking, only the
        signal that woke us is read (the next call drains the rest), so the wake-up path
        is one ``poll`` and one ``recv``. Every publish signals after its slot is READY
        and unlocked, so a scan after this returns True sees it.
        """
        self._flush_metrics()
        sock = self._sock
        got = False
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.recv(64)
                got = True
        if got or timeout_s <= 0:
            return got
        if self.spin_s > 0:
            scan = self.arena._scan
            deadline = time.perf_counter() + min(self.spin_s, timeout_s)
            while time.perf_counter() < deadline:
                if _READY in scan():
                    return True  # its datagram is drained by the next call
                os.sched_yield()
        if not self._poll.poll(max(1, math.ceil(timeout_s * 1000))):
            return False
        with contextlib.suppress(BlockingIOError):
            sock.recv(64)
        return True

    def ready_count(self) -> int:
        return self.arena._scan().count(_READY)

    def peek_ready(self) -> list[Descriptor]:
        """Descriptors of all READY slots, best first (not taken)."""
        arena = self.arena
        cache = self._cache
        descs = []
        for i in _indices(arena._scan(), _READY):
            raw = arena._raw(i)
            hit = cache.get(i)
            if hit is not None and hit[0] == raw:
                descs.append(hit[1])
                continue
            d = _decode(i, raw)
            if d is None:
                self._discard_invalid(i)
                continue
            cache[i] = (raw, d)
            descs.append(d)
        if len(descs) > 1:
            now = time.monotonic()
            age = self.starvation_age_s
            descs.sort(key=lambda d: d.order_key(now, age))
        return descs

    def _discard_invalid(self, slot: int) -> None:
        arena = self.arena
        if not arena._try_lock(slot):
            return
        try:
            if arena.state(slot) == _READY and arena.descriptor(slot) is None:
                log.warning("slot %d held an invalid descriptor: freed", slot)
                arena._set_state(slot, _FREE)
        finally:
            arena._unlock(slot)

    def take(self, descs: Sequence[Descriptor]) -> list[Descriptor]:
        """Move the given READY descriptors to CONSUMING; return those actually taken.

        The returned descriptors are re-read under the slot's lease: use them, not the
        ones passed in.
        """
        arena = self.arena
        taken: list[Descriptor] = []
        for d in descs:
            slot = d.slot
            if arena.state(slot) != _READY or not arena._try_lock(slot):
                continue
            raw = arena._raw(slot)  # re-read under the lease: this copy is authoritative
            hit = self._cache.get(slot)
            cur = hit[1] if hit is not None and hit[0] == raw else _decode(slot, raw)
            if cur is None or (cur is not d and cur != d) or arena.state(slot) != _READY:
                arena._unlock(slot)  # changed since it was peeked: look again later
                continue
            arena._set_state(slot, _CONSUMING)
            self._pending[slot] = cur
            taken.append(cur)
            self._handoffs.append(time.monotonic() - cur.published_at)
        return taken

    def take_next(self, max_items: int) -> list[Descriptor]:
        return self.take(self.peek_ready()[:max_items])

    def array(self, d: Descriptor) -> np.ndarray:
        """Zero-copy numpy view of a taken descriptor's tensor (valid until release).

        The view of a slot is reused while its shape and dtype stay the same, so do not
        reshape it in place (``arr.shape = ...``); ``reshape`` and slicing are fine.
        """
        hit = self._arrays.get(d.slot)
        if hit is not None and hit[0] == d.shape and hit[1] is d.dtype:
            return hit[2]
        arr = self.arena.view(d.slot, d.shape, d.dtype)
        self._arrays[d.slot] = (d.shape, d.dtype, arr)
        return arr

    def tensor(self, d: Descriptor) -> Any:
        """``torch.from_numpy(self.array(d))``: a zero-copy CPU tensor over the slot,
        reused like :meth:`array` (do not resize it in place)."""
        hit = self._tensors.get(d.slot)
        if hit is not None and hit[0] == d.shape and hit[1] is d.dtype:
            return hit[2]
        import torch

        t = torch.from_numpy(self.array(d))
        self._tensors[d.slot] = (d.shape, d.dtype, t)
        return t

    def release(self, d: Descriptor) -> None:
        """Return a consumed slot to the free pool. On CUDA call it only after the copy
        of its data has completed (the copy stream's event), never right after queueing."""
        if self._pending.pop(d.slot, None) is None:
            return
        arena = self.arena
        arena._set_state(d.slot, _FREE)
        arena._unlock(d.slot)
        self._flush_metrics()

    def _flush_metrics(self) -> None:
        """Metrics of takes are recorded here (release, wait, reclaim), not in ``take``:
        the consumer's path from wake-up to usable tensor stays as short as possible."""
        handoffs = self._handoffs
        if handoffs:
            self._handoffs = []
            for seconds in handoffs:
                m.HANDOFF_SECONDS.observe(max(0.0, seconds))
        m.SHM_SLOTS_IN_USE.set(self.arena.slots_in_use())

    def requeue(self, d: Descriptor) -> None:
        """Give a taken descriptor back as READY (e.g. a batch that could not run)."""
        if self._pending.pop(d.slot, None) is None:
            return
        self.arena._set_state(d.slot, _READY)
        self.arena._unlock(d.slot)

    def reclaim_dead(self) -> int:
        n = self.arena.reclaim_dead()
        if n:
            m.SHM_SLOTS_RECLAIMED.inc(n)
        self._flush_metrics()
        return n

    def close(self, *, unlink: bool = True) -> None:
        """Requeue what is still taken, close the socket; unlink both files by default.

        In a forked child this only drops the child's copies: the files are the parent's.
        """
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            self._sock.close()
            return
        if not self.arena.closed:
            for d in list(self._pending.values()):
                self.requeue(d)
            self._flush_metrics()
        self._sock.close()
        self._arrays.clear()
        self._tensors.clear()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.socket_path)
                if (st.st_dev, st.st_ino) == self._sock_inode:
                    os.unlink(self.socket_path)
        self.arena.close(unlink=unlink)
