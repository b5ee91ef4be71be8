"""Node-local shared-memory arena: zero-copy tensor hand-off from CPU workers to the daemon.

Layout of the arena file (``<shm_dir>/clipline-<deployment>.arena``, mode 0600)::

    [ header page: header, one state byte per slot | slot table (n_slots x 256 B) | pad
      to page | slot 0 | slot 1 | ... ]

Each data slot is a page-aligned, fixed-size region. The slot table holds, per slot, the
descriptor of what it carries (shape, dtype, job id, generation, chunk, priority class,
request arrival time, publish time); the states sit together in the header page so a
scan of every slot is one ``bytes.find``. A slot moves through::

    FREE --reserve--> WRITING --publish--> READY --take--> CONSUMING --release--> FREE
                         |  abort / producer died            |  requeue / daemon died
                         +--------------> FREE      READY <---+

A producer (a worker process) reserves a slot, writes its preprocessing output straight
into a numpy view over the slot, and publishes: only the descriptor changes hands, and a
one-byte datagram on a unix socket wakes the daemon. The consumer (the daemon) maps the
slot zero-copy (:meth:`Consumer.array`, :meth:`Consumer.tensor`: ``torch.from_numpy``
over the same pages) and releases it once the data is on the device: on CUDA only after
the copy stream's event has completed, because until then the DMA engine is still
reading the slot. The daemon page-locks the whole data region once
at start (``cudaHostRegister(*arena.base_address())``), never per request, so those
copies are asynchronous DMA straight from the slots; it unregisters before closing.

Leases. Every slot has a lease: an exclusive open-file-description lock
(``F_OFD_SETLK``) on one byte of the arena file, far past its end, held while the slot
is WRITING (by the producer) or CONSUMING (by the daemon). The kernel drops a lock when
the last reference to its open file description goes away, so when a process dies
(SIGKILL included) its leases die with it, and "state says owned, but the lock can be
taken" means "the owner is dead": WRITING slots are reclaimed as FREE
(``clipline_shm_slots_reclaimed_total``) by the daemon's periodic :meth:`reclaim_dead`
and by a producer that finds no free slot; CONSUMING slots (a daemon died mid-batch) go
back to READY when the next daemon starts, so the data is processed instead of dropped
(``Descriptor.recoveries`` counts how often, so a poison chunk can be failed instead of
crashing daemons forever). Liveness never relies on pids: the ``owner`` pid in a record
is for diagnostics only (pid namespaces differ between pods). OFD locks, not classic
``lockf`` locks, because classic locks belong to the *process*: a process never
conflicts with itself (a producer and a consumer in one process would see each other's
slots as free) and closing *any* descriptor of the file drops *all* of the process's
locks on it. With OFD locks each :class:`Arena` object is its own lock owner, which makes
threads, several producers per process and in-process tests behave like separate
processes. Linux only (3.15+); elsewhere classic locks are used with those caveats.

The daemon holds an exclusive lock on byte 0 for its lifetime: a second daemon for the
same deployment refuses to start, and an arena left by a crashed daemon is detected
(lock free) and reused when its layout matches (in-flight slots recovered as above) or
replaced when it does not. A replacement is a new file renamed over the old name, never
the old file truncated, so a producer still mapping the old file cannot fault; producers
notice the new inode at their next ``reserve`` and reattach, and a ``publish`` into a
replaced or removed arena raises ``gpu_unavailable`` so the job is retried at once.

Memory ordering. The descriptor and the data must be visible to the consumer before it
acts on a READY state. The protocol does not rely on x86's total store order: the
producer writes data, descriptor and state and *then* drops its lease (an ``fcntl``
call); the consumer reads the state table only as a hint, takes the slot's lease (an
``fcntl`` call) and *then* re-reads the descriptor, and uses that copy. Lock and unlock
serialise on the inode's lock-list spinlock in the kernel, which has release/acquire
semantics on every architecture, so everything the producer wrote before unlocking
happens-before everything the consumer reads after locking (the same argument covers
release -> reserve for the slot's reuse, and the datagram wake-up adds a second such
edge). On x86 the plain stores would already be ordered; on aarch64 this lock edge is
what makes the hand-off correct. A take that races a publish simply fails to lock and
is retried on the wake-up that follows every publish.

Wake-up. The datagram socket was measured against the alternatives (two processes,
one-way, this project's 2-core VM under load): datagram + poll 18-25 us, a pipe (a FIFO
would behave the same) 16 us, eventfd 10-12 us, spinning on the state byte 8 us at the
median but 11 ms at p99 once the cores are shared. Under CPU contention the pipe and the
socket are equal; eventfd cannot be shared between pods without passing descriptors;
spinning burns a core the workers need. So: a datagram socket, which is connectionless
(a restarted daemon just binds a new one; producers reconnect on error), and nothing is
done on the hot path that can wait: metrics are recorded after the wake-up (producer)
or at ``release``/``wait`` (consumer), descriptors are decoded once per publish, views
are reused per slot.

Processes and threads. :class:`Producer` is thread-safe (one lock around its slot
bookkeeping; a lease is used by one thread at a time). :class:`Consumer` belongs to one
thread; its read-only queries (``arena.states()``, ``ready_count``) are safe anywhere.
Fork safety: a forked child never uses its parent's mapping or leases; an at-fork hook
closes every inherited arena in the child (so the child does not keep the parent's
locks alive once the parent dies) and resets every producer, which reattaches lazily on
first use. Celery prefork children therefore each attach their own arena even
if the parent had one. A child that still holds numpy views of an inherited mapping keeps
that mapping (and with it the parent's open file description) until it drops them.

Why not ``multiprocessing.shared_memory``: on Python < 3.13 every process that attaches
a ``SharedMemory`` registers it with its resource tracker, which unlinks the segment when
that process exits (``track=False`` only exists from 3.13), so an exiting worker would
delete the daemon's arena. The arena is therefore a plain file in a tmpfs directory,
opened with ``os.open`` and mapped with ``mmap``; nobody but the daemon ever unlinks it.
Its pages are allocated up front (``posix_fallocate``), so a too-small tmpfs fails the
daemon's start with a clear error instead of a worker's SIGBUS later.

Sharing across processes and containers. Any directory on a memory-backed filesystem
works; everyone who maps the same file shares the same pages, and ``fcntl`` locks and
unix sockets work across mount and pid namespaces of one kernel.

* Containers of one pod: mount an ``emptyDir: {medium: Memory, sizeLimit: ...}`` volume
  at the same path (e.g. ``/dev/shm``, whose container default is only 64 MiB) in the
  daemon and worker containers and set ``CLIPLINE_SHM_DIR`` to it. The memory counts
  against the pod's limit.
* Pods on one node (the daemon DaemonSet and the node's worker Deployment): mount the
  same ``hostPath`` directory, which must be on a tmpfs of the node (e.g.
  ``/dev/shm/clipline-<name>``, ``type: DirectoryOrCreate``), in both pods and run both
  with the same uid (``runAsUser``), since the files are owner-only.

Security. The deployment name is part of every file name, so two deployments on one node
never collide. The arena and the socket are created 0600 regardless of the umask; the
daemon opens the arena with ``O_NOFOLLOW`` and refuses a file owned by another user, so
a file planted in a shared ``/dev/shm`` cannot be used against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import logging
import math
import mmap
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from clipline_core import constants
from clipline_core import metrics as m
from clipline_core.errors import ClipError, ErrorCode

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
HEADER_BYTES = 4096
RECORD_BYTES = 256
MAX_DIMS = 6
JOB_ID_BYTES = 48
# Lease locks live far beyond the end of the file so they never overlap data.
_LOCK_DAEMON = 0
_LOCK_BASE = 1 << 40
# How often a producer also checks that the arena file is still the one at its path.
_RECHECK_S = 1.0


class SlotState(enum.IntEnum):
    FREE = 0
    WRITING = 1
    READY = 2
    CONSUMING = 3


class ChunkKind(enum.IntEnum):
    """What a slot carries: video frames, or the job's product reference images."""

    FRAMES = 0
    REFS = 1


_FREE, _WRITING, _READY, _CONSUMING = (int(s) for s in SlotState)
_KINDS = tuple(ChunkKind)

_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.float32),
    3: np.dtype(np.float16),
    4: np.dtype(np.int64),
    5: np.dtype(np.int32),
}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}

HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("n_slots", "<u4"),
        ("slot_bytes", "<u8"),
        ("data_offset", "<u8"),
        ("epoch", "S16"),
        ("created", "<f8"),
        ("daemon_pid", "<i4"),
        ("frames_per_chunk", "<u4"),
        ("frame_height", "<u4"),
        ("frame_width", "<u4"),
        ("deployment", "S48"),
        ("retired", "<u4"),
    ]
)
# One state byte per slot, contiguous, so scans are ``bytes.find``/``count``.
_STATES_AT = 1024
MAX_SLOTS = HEADER_BYTES - _STATES_AT

# One slot record, little-endian (the first 176 of its 256 bytes are used; the slot's
# state is not here but in the header's state bytes):
#   0 unused u32 | 4 owner i32 | 8 seq u64 | 16 reserved_at f64 | 24 recoveries u32 | 28 pad
#  32 kind u32 | 36 priority i32 | 40 chunk i32 | 44 generation u32 | 48 arrival f64
#  56 published_at f64 | 64 nbytes u64 | 72 ndim u32 | 76 dtype u32 | 80 shape 6 x i64
# 128 job_id 48 bytes
# Offsets 32..176 are the descriptor a producer publishes in one ``pack_into``.
_REC = struct.Struct(f"<IiQdI4xIiiIddQII{MAX_DIMS}q{JOB_ID_BYTES}s")
_DESC = struct.Struct(f"<IiiIddQII{MAX_DIMS}q{JOB_ID_BYTES}s")
_DESC_AT = 32
_LEASE = struct.Struct("<iQdI")  # owner, seq, reserved_at, recoveries (offset 4)
_SEQ = struct.Struct("<Q")
_U32 = struct.Struct("<I")
assert _REC.size == _DESC_AT + _DESC.size == 128 + JOB_ID_BYTES <= RECORD_BYTES

# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_RETIRED_AT: int = HEADER_DTYPE.fields["retired"][1]  # type: ignore[index]
_FLOCK = struct.Struct("@hhqqi4x")
_OFD = sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK") and _FLOCK.size == 32


def _lock(fd: int, offset: int) -> bool:
    """Try to take the exclusive one-byte lease at ``offset``; False if someone holds it."""
    try:
        if _OFD:
            fcntl.fcntl(
                fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
            )
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        return True
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def _unlock(fd: int, offset: int) -> None:
    if _OFD:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)


@dataclasses.dataclass(frozen=True)
class ArenaLayout:
    """The arena's geometry and the frame spec producers must write."""

    n_slots: int
    slot_bytes: int
    frames_per_chunk: int = 16
    frame_height: int = 128
    frame_width: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.n_slots <= MAX_SLOTS:
            raise ValueError(f"an arena needs 1 to {MAX_SLOTS} slots")
        if self.slot_bytes < PAGE:
            raise ValueError(f"slot size must be at least one page ({PAGE} bytes)")

    @property
    def slot_stride(self) -> int:
        return _round_up(self.slot_bytes, PAGE)

    @property
    def data_offset(self) -> int:
        return _round_up(HEADER_BYTES + self.n_slots * RECORD_BYTES, PAGE)

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.n_slots * self.slot_stride


class Descriptor(NamedTuple):
    """What travels from producer to consumer: where the tensor is and what it is.

    Immutable and hashable; a named tuple (not a dataclass) because one is built on
    every hand-off and a tuple is the cheapest object Python can make.
    """

    slot: int
    seq: int
    kind: ChunkKind
    job_id: str
    generation: int
    chunk: int
    priority: int
    arrival: float
    published_at: float
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    # Times a daemon died while holding this item (it was requeued at the next start).
    recoveries: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def order_key(self, now: float, starvation_age_s: float) -> tuple[int, float, int]:
        """(priority class, request arrival, chunk); items waiting longer than
        ``starvation_age_s`` go ahead of every class (oldest request first)."""
        aged = starvation_age_s > 0 and now - self.published_at >= starvation_age_s
        return (-1 if aged else self.priority, self.arrival, self.chunk)


# (shape, dtype as given) -> (nbytes, (nbytes, ndim, dtype code, *padded shape)).
_SPECS: dict[tuple[tuple[Any, ...], Any], tuple[int, tuple[int, ...]]] = {}


def _spec(shape: tuple[Any, ...], dtype: Any) -> tuple[int, tuple[int, ...]]:
    dt = np.dtype(dtype)
    code = _DTYPE_CODES.get(dt)
    if code is None:
        raise ValueError(f"unsupported dtype {dt}")
    dims = [int(x) for x in shape]
    if len(dims) > MAX_DIMS or any(x < 0 for x in dims):
        raise ValueError(f"a shape needs at most {MAX_DIMS} non-negative dimensions")
    nbytes = math.prod(dims) * dt.itemsize
    return nbytes, (nbytes, len(dims), code, *dims, *([0] * (MAX_DIMS - len(dims))))


_new_tuple = tuple.__new__


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _indices(raw: bytes, state: int, start: int = 0) -> list[int]:
    """Positions of ``state`` in a state snapshot, from ``start``."""
    out = []
    i = raw.find(state, start)
    while i >= 0:
        out.append(i)
        i = raw.find(state, i + 1)
    return out


_ARENAS: weakref.WeakSet[Arena] = weakref.WeakSet()
_PRODUCERS: weakref.WeakSet[Producer] = weakref.WeakSet()


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
        """Free WRITING slots whose producer died; return how many were reclaimed."""
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
        if count:
            m.SHM_SLOTS_RECLAIMED.inc(count)
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


def _decode(slot: int, raw: bytes) -> Descriptor | None:
    f = _REC.unpack(raw)
    ndim, code, kind = f[12], f[13], f[5]
    dtype = _DTYPES.get(code)
    if dtype is None or ndim > MAX_DIMS or kind >= len(_KINDS):
        return None
    try:
        job_id = f[20].rstrip(b"\0").decode()
    except UnicodeDecodeError:
        return None
    return _new_tuple(
        Descriptor,
        (
            slot,
            f[2],
            _KINDS[kind],
            job_id,
            f[8],
            f[7],
            f[6],
            f[9],
            f[10],
            tuple(f[14 : 14 + ndim]),
            dtype,
            f[4],
        ),
    )


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


def _bind_socket(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """Bind the wake-up datagram socket (0600), replacing a stale one from a crash.

    Only the daemon holding the arena lock calls this, so a socket already at ``path``
    belongs to a dead daemon.
    """
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ClipError(
            ErrorCode.GPU_UNAVAILABLE, f"cannot bind the wake-up socket {path}: {exc}"
        ) from exc
    finally:
        os.umask(old)
    os.chmod(path, constants.SHM_FILE_MODE)
    sock.setblocking(False)
    st = os.lstat(path)
    return sock, (st.st_dev, st.st_ino)


@contextlib.contextmanager
def attached(arena_path: Path) -> Iterator[Arena]:
    arena = Arena.attach(arena_path)
    try:
        yield arena
    finally:
        arena.close()
