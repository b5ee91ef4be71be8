"""The mapped arena file: create (daemon) or attach (workers), validate, map, close.

Owns :class:`Arena`, the owner-only file checks, the fresh-file creation and the
at-fork hook that makes forked children drop their parent's mappings and reset their
producers. Builds on :mod:`.layout` and :mod:`.locks`; must not import the producer,
consumer or wake-up socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import mmap
import os
import stat
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipline_core import constants
from clipline_core import metrics as m
from clipline_core.errors import ClipError, ErrorCode
from gpu_service.shm.layout import (
    _CONSUMING,
    _FREE,
    _LOCK_BASE,
    _LOCK_DAEMON,
    _READY,
    _REC,
    _RETIRED_AT,
    _SEQ,
    _STATES_AT,
    _U32,
    _WRITING,
    HEADER_BYTES,
    HEADER_DTYPE,
    RECORD_BYTES,
    ArenaLayout,
    Descriptor,
    SlotState,
    _decode,
    _indices,
)
from gpu_service.shm.locks import _lock, _unlock

log = logging.getLogger("gpu_service.shm")

_ARENAS: weakref.WeakSet[Arena] = weakref.WeakSet()
# Producers register here (they import this module; it never imports them).
_PRODUCERS: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child must not use (or keep alive) its parent's mappings and leases."""
    for arena in list(_ARENAS):
        arena._forget()
    for producer in list(_PRODUCERS):
        producer._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Arena:
    """A mapped arena file. Use :meth:`create` (daemon) or :meth:`attach` (workers)."""

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, owner: bool) -> None:
        self.path = path
        self._fd = fd
        self._mm = mm
        self.owner = owner
        self.pid = os.getpid()
        st = os.fstat(fd)
        self.inode = (st.st_dev, st.st_ino)
        self.header = np.ndarray((), dtype=HEADER_DTYPE, buffer=mm, offset=0)
        n = int(self.header["n_slots"])
        self.layout = ArenaLayout(
            n_slots=n,
            slot_bytes=int(self.header["slot_bytes"]),
            frames_per_chunk=int(self.header["frames_per_chunk"]),
            frame_height=int(self.header["frame_height"]),
            frame_width=int(self.header["frame_width"]),
        )
        self._states = np.ndarray((n,), dtype=np.uint8, buffer=mm, offset=_STATES_AT)
        # Single-byte loads and stores of the states (single-copy atomic everywhere).
        self._sb = memoryview(mm)[_STATES_AT : _STATES_AT + n]
        self._stride = self.layout.slot_stride
        self._data = self.layout.data_offset
        probe = np.frombuffer(mm, dtype=np.uint8, count=1)
        self._address = int(probe.ctypes.data)
        del probe
        self.epoch = bytes(self.header["epoch"])
        self.recovered = 0
        self._leases: set[int] = set()  # slots whose lease this object holds
        self._closed = False
        _ARENAS.add(self)

    # -- lifecycle -----------------------------------------------------------
    @classmethod
    def create(cls, path: Path, layout: ArenaLayout, deployment: str) -> Arena:
        """Create (or take over a stale) arena at ``path`` and hold the daemon lock.

        Raises ``ClipError(gpu_unavailable)`` if a live daemon already owns it, or if the
        file is not ours. A stale arena with the same layout is reused (its in-flight
        slots recovered); one with another layout is replaced by a new file.
        """
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = -1
        for _ in range(10):
            fd = _open_owned(path, create=True)
            try:
                locked = _lock(fd, _LOCK_DAEMON)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                raise ClipError(
                    ErrorCode.GPU_UNAVAILABLE,
                    f"another GPU daemon already serves deployment {deployment!r} ({path})",
                    transient=False,
                )
            if _same_file(path, fd):
                break
            os.close(fd)  # replaced between open and lock: look again
            fd = -1
        if fd < 0:
            raise ClipError(ErrorCode.GPU_UNAVAILABLE, f"arena {path} keeps changing")
        try:
            reuse = _header_matches(fd, layout)
            if not reuse:
                fresh = _fresh_file(path, layout, deployment)
                if os.fstat(fd).st_size >= HEADER_BYTES:  # tell producers still mapping it
                    os.pwrite(fd, _U32.pack(1), _RETIRED_AT)
                os.close(fd)
                fd = fresh
            mm = mmap.mmap(fd, layout.file_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            if os.fstat(fd).st_size == 0 and _same_file(path, fd):
                os.unlink(path)  # the empty placeholder this call created
            os.close(fd)
            raise
        arena = cls(path, fd, mm, owner=True)
        arena.header["daemon_pid"] = os.getpid()
        arena.recovered = arena._recover() if reuse else 0
        return arena

    @classmethod
    def attach(cls, path: Path) -> Arena:
        """Map an existing arena (producers). Never unlinks or resizes it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ClipError(
                ErrorCode.GPU_UNAVAILABLE,
                f"the GPU daemon is not running (no shared-memory arena at {path})",
            ) from None
        except OSError as exc:
            raise ClipError(ErrorCode.GPU_UNAVAILABLE, f"cannot open arena {path}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ClipError(ErrorCode.GPU_UNAVAILABLE, f"{path} is not an arena file")
            raw = os.pread(fd, HEADER_DTYPE.itemsize, 0)
            if len(raw) < HEADER_DTYPE.itemsize:
                raise ClipError(ErrorCode.GPU_UNAVAILABLE, f"arena {path} is not initialised yet")
            hdr = np.frombuffer(raw, dtype=HEADER_DTYPE)[0]
            if bytes(hdr["magic"]) != constants.SHM_MAGIC:
                raise ClipError(ErrorCode.GPU_UNAVAILABLE, f"arena {path} is not initialised yet")
            if int(hdr["retired"]):
                raise ClipError(
                    ErrorCode.GPU_UNAVAILABLE, f"the GPU daemon of arena {path} has stopped"
                )
            if int(hdr["version"]) != constants.SHM_LAYOUT_VERSION:
                raise ClipError(
                    ErrorCode.GPU_UNAVAILABLE,
                    f"arena {path} has layout version {int(hdr['version'])}, this worker "
                    f"speaks {constants.SHM_LAYOUT_VERSION}: deploy workers and daemon together",
                    transient=False,
                )
            need = int(hdr["data_offset"]) + int(hdr["n_slots"]) * int(hdr["slot_bytes"])
            if st.st_size < need:
                raise ClipError(ErrorCode.GPU_UNAVAILABLE, f"arena {path} is truncated")
            mm = mmap.mmap(fd, need, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, owner=False)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, *, unlink: bool = False) -> None:
        """Unmap; the owner may also unlink the file (clean daemon shutdown)."""
        if self._closed:
            return
        if unlink and self.owner and self.pid == os.getpid():
            self._retire()  # attached producers stop using it at their next call
            with contextlib.suppress(FileNotFoundError):
                # Only unlink the file we created, not a successor's.
                if self.is_current():
                    os.unlink(self.path)
        self._forget()

    def _forget(self) -> None:
        """Drop the mapping and the descriptor (their leases go with the last reference)."""
        if self._closed:
            return
        self._closed = True
        self._leases.clear()
        with contextlib.suppress(AttributeError):
            del self.header, self._states
        with contextlib.suppress(AttributeError, ValueError):
            self._sb.release()
        with contextlib.suppress(BufferError, ValueError):
            self._mm.close()  # fails while someone still holds a view; then it stays mapped
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def is_current(self) -> bool:
        """True while ``path`` still names the file this arena maps."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.inode

    # -- slot records ----------------------------------------------------------
    def state(self, slot: int) -> int:
        return self._sb[slot]

    def _set_state(self, slot: int, state: int) -> None:
        self._sb[slot] = state

    def _scan(self) -> bytes:
        """A snapshot of every slot's state byte (a hint: verify under the lease)."""
        return self._sb.tobytes()

    @property
    def retired(self) -> bool:
        """Set by the daemon on the file it stops using (clean exit or replacement)."""
        return bool(_U32.unpack_from(self._mm, _RETIRED_AT)[0])

    def _retire(self) -> None:
        _U32.pack_into(self._mm, _RETIRED_AT, 1)

    def _seq(self, slot: int) -> int:
        return int(_SEQ.unpack_from(self._mm, HEADER_BYTES + slot * RECORD_BYTES + 8)[0])

    def _raw(self, slot: int) -> bytes:
        at = HEADER_BYTES + slot * RECORD_BYTES
        return self._mm[at : at + _REC.size]

    def descriptor(self, slot: int) -> Descriptor | None:
        """The slot's descriptor as currently written (None if it is not a valid one)."""
        return _decode(slot, self._raw(slot))

    # -- leases --------------------------------------------------------------
    def _try_lock(self, slot: int) -> bool:
        if _lock(self._fd, _LOCK_BASE + slot):
            self._leases.add(slot)
            return True
        return False

    def _unlock(self, slot: int) -> None:
        self._leases.discard(slot)
        _unlock(self._fd, _LOCK_BASE + slot)

    def _recover(self) -> int:
        """At daemon start on a reused arena: requeue interrupted work, free dead writes."""
        fixed = 0
        for i in range(self.layout.n_slots):
            if self.state(i) not in (_WRITING, _CONSUMING) or not self._try_lock(i):
                continue
            try:
                state = self.state(i)
                if state == _CONSUMING:
                    at = HEADER_BYTES + i * RECORD_BYTES + 24
                    _U32.pack_into(self._mm, at, _U32.unpack_from(self._mm, at)[0] + 1)
                    self._set_state(i, _READY)
                    fixed += 1
                elif state == _WRITING:
                    self._set_state(i, _FREE)
                    m.SHM_SLOTS_RECLAIMED.inc()
                    fixed += 1
            finally:
                self._unlock(i)
        return fixed

    def reclaim_dead(self) -> int:
        """Free WRITING slots whose producer died; return how many were reclaimed.

        Counted in ``clipline_shm_slots_reclaimed_total`` by the daemon's consumer
        (:meth:`gpu_service.shm.Consumer.reclaim_dead`), not by a producer that reclaims."""
        count = 0
        for i in _indices(self._scan(), _WRITING):
            if i in self._leases or not self._try_lock(i):
                continue  # ours, or the producer is alive
            try:
                if self.state(i) == _WRITING:
                    self._set_state(i, _FREE)
                    count += 1
            finally:
                self._unlock(i)
        return count

    # -- views ---------------------------------------------------------------
    def view(self, slot: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A numpy array over slot ``slot``'s pages (no copy)."""
        if math.prod(shape) * dtype.itemsize > self._stride:
            raise ClipError(
                ErrorCode.TOO_LARGE,
                f"a {dtype} tensor of shape {shape} does not fit a {self._stride}-byte slot",
                transient=False,
            )
        return np.ndarray(
            shape, dtype=dtype, buffer=self._mm, offset=self._data + slot * self._stride
        )

    def base_address(self) -> tuple[int, int]:
        """(address, length) of the page-aligned data region, for one cudaHostRegister."""
        return self._address + self._data, self.layout.n_slots * self._stride

    def slots_in_use(self) -> int:
        return self.layout.n_slots - self._scan().count(_FREE)

    def states(self) -> dict[str, int]:
        counts = np.bincount(self._states.astype(np.int64), minlength=len(SlotState))
        return {s.name.lower(): int(counts[s]) for s in SlotState}


def _open_owned(path: Path, *, create: bool) -> int:
    """Open ``path`` without following links; refuse anything but our own regular file."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, constants.SHM_FILE_MODE)
    except OSError as exc:
        raise ClipError(
            ErrorCode.GPU_UNAVAILABLE, f"cannot open arena {path}: {exc}", transient=False
        ) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise ClipError(
            ErrorCode.GPU_UNAVAILABLE,
            f"{path} exists but is not an arena file of this user (uid {st.st_uid}): "
            "remove it or pick another deployment name",
            transient=False,
        )
    os.fchmod(fd, constants.SHM_FILE_MODE)
    return fd


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _header_matches(fd: int, layout: ArenaLayout) -> bool:
    if os.fstat(fd).st_size != layout.file_bytes:
        return False
    raw = os.pread(fd, HEADER_DTYPE.itemsize, 0)
    if len(raw) < HEADER_DTYPE.itemsize:
        return False
    hdr = np.frombuffer(raw, dtype=HEADER_DTYPE)[0]
    return bool(
        bytes(hdr["magic"]) == constants.SHM_MAGIC
        and int(hdr["version"]) == constants.SHM_LAYOUT_VERSION
        and int(hdr["n_slots"]) == layout.n_slots
        and int(hdr["slot_bytes"]) == layout.slot_stride
        and int(hdr["data_offset"]) == layout.data_offset
        and int(hdr["frames_per_chunk"]) == layout.frames_per_chunk
        and int(hdr["frame_height"]) == layout.frame_height
        and int(hdr["frame_width"]) == layout.frame_width
    )


def _fresh_file(path: Path, layout: ArenaLayout, deployment: str) -> int:
    """A new, initialised, daemon-locked arena file renamed over ``path``; its fd."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(
        tmp,
        os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        constants.SHM_FILE_MODE,
    )
    try:
        os.fchmod(fd, constants.SHM_FILE_MODE)
        _lock(fd, _LOCK_DAEMON)  # nobody else knows this file yet
        try:
            os.posix_fallocate(fd, 0, layout.file_bytes)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise ClipError(
                    ErrorCode.GPU_UNAVAILABLE,
                    f"no room for a {layout.file_bytes}-byte arena in {path.parent}: give the "
                    "shared-memory directory (tmpfs / emptyDir sizeLimit) more space or "
                    "use fewer or smaller slots",
                    transient=False,
                ) from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, layout.file_bytes)
        hdr = np.zeros((), dtype=HEADER_DTYPE)
        hdr["magic"] = constants.SHM_MAGIC
        hdr["version"] = constants.SHM_LAYOUT_VERSION
        hdr["n_slots"] = layout.n_slots
        hdr["slot_bytes"] = layout.slot_stride
        hdr["data_offset"] = layout.data_offset
        hdr["epoch"] = uuid.uuid4().bytes
        hdr["created"] = time.time()
        hdr["daemon_pid"] = os.getpid()
        hdr["frames_per_chunk"] = layout.frames_per_chunk
        hdr["frame_height"] = layout.frame_height
        hdr["frame_width"] = layout.frame_width
        hdr["deployment"] = deployment.encode()[:48]
        os.pwrite(fd, hdr.tobytes(), 0)
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return fd


@contextlib.contextmanager
def attached(arena_path: Path) -> Iterator[Arena]:
    arena = Arena.attach(arena_path)
    try:
        yield arena
    finally:
        arena.close()
