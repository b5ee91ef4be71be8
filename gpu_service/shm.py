"""Node-local shared-memory arena: zero-copy tensor hand-off from CPU workers to the daemon.

Layout of the arena file (``<shm_dir>/clipline-<deployment>.arena``, mode 0600)::

    [ header page | slot table (n_slots x 256 B) | pad to page | slot 0 | slot 1 | ... ]

Each data slot is a page-aligned, fixed-size region. The slot table holds, per slot,
its state and the descriptor of what it carries (shape, dtype, job id, attempt, chunk,
priority class, request arrival time). A slot moves through::

    FREE --reserve--> WRITING --publish--> READY --take--> CONSUMING --release--> FREE

A producer (a worker process) reserves a slot, writes its preprocessing output straight
into a numpy view over the slot, and publishes: only the 256-byte descriptor changes
hands, and a one-byte datagram wakes the daemon. The consumer (the daemon) maps the slot
zero-copy (``torch.from_numpy`` over the same pages) and releases it once the data is
on the device (on CUDA, after the copy stream's event has completed).

Ownership and crash safety. Every slot has a lease: an advisory POSIX record lock
(``lockf``) on a byte of the arena file that the owner holds while the slot is WRITING
(producer) or CONSUMING (daemon). The kernel drops a process's record locks when it
dies, so a slot whose state says "owned" but whose lock can be taken has a dead owner:
WRITING slots are reclaimed as FREE (``clipline_shm_slots_reclaimed_total``); CONSUMING
slots (a daemon died mid-batch) go back to READY, so the data is processed by the next
daemon instead of being dropped. A daemon holds an exclusive lock on byte 0 for its
lifetime: a second daemon for the same deployment refuses to start, and a stale arena
left by a crashed daemon is detected (lock free) and reused when its layout matches, or
replaced when it does not. Producers notice a replaced or removed arena (inode changes)
at their next ``reserve`` and reattach or report ``gpu_unavailable``.

Why not ``multiprocessing.shared_memory``: on Python < 3.13 every process that attaches
a ``SharedMemory`` registers it with its resource tracker, which unlinks the segment when
that process exits (``track=False`` only exists from 3.13), so an exiting worker would
delete the daemon's arena. The arena is therefore a plain file in a tmpfs directory,
opened with ``os.open`` and mapped with ``mmap``; nobody but the daemon ever unlinks it.

Sharing across processes and containers. Any directory on a memory-backed filesystem
works; everyone who maps the same file shares the same pages.

* Containers of one pod: mount an ``emptyDir: {medium: Memory}`` volume at the same path
  (e.g. ``/dev/shm``) in the daemon and worker containers and set ``CLIPLINE_SHM_DIR``.
* Pods on one node (the daemon DaemonSet and the node's worker Deployment): mount the
  same ``hostPath`` directory (e.g. ``/dev/shm/clipline-<name>``, ``DirectoryOrCreate``)
  in both pods, run them with the same uid so the 0600 file is readable by both.

The deployment name is part of every file name, so two deployments on one node never
collide. Files are created 0600 (owner only) regardless of the umask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import mmap
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipline import constants
from clipline import metrics as m
from clipline.errors import ClipError, ErrorCode

PAGE = mmap.PAGESIZE
HEADER_BYTES = 4096
RECORD_BYTES = 256
MAX_DIMS = 6
JOB_ID_BYTES = 48
# Lease locks live far beyond the end of the file so they never overlap data.
_LOCK_DAEMON = 0
_LOCK_BASE = 1 << 40


class SlotState(enum.IntEnum):
    FREE = 0
    WRITING = 1
    READY = 2
    CONSUMING = 3


class ChunkKind(enum.IntEnum):
    """What a slot carries: video frames, or the job's product reference images."""

    FRAMES = 0
    REFS = 1


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
    ]
)

RECORD_DTYPE = np.dtype(
    [
        ("state", "<u4"),
        ("owner", "<i4"),
        ("seq", "<u8"),
        ("kind", "<u4"),
        ("priority", "<i4"),
        ("chunk", "<i4"),
        ("attempt", "<u4"),
        ("arrival", "<f8"),
        ("reserved_at", "<f8"),
        ("published_at", "<f8"),
        ("nbytes", "<u8"),
        ("ndim", "<u4"),
        ("dtype", "<u4"),
        ("shape", "<i8", (MAX_DIMS,)),
        ("job_id", f"S{JOB_ID_BYTES}"),
    ],
    align=True,
)
assert RECORD_DTYPE.itemsize <= RECORD_BYTES


@dataclasses.dataclass(frozen=True)
class ArenaLayout:
    """The arena's geometry and the frame spec producers must write."""

    n_slots: int
    slot_bytes: int
    frames_per_chunk: int = 16
    frame_height: int = 128
    frame_width: int = 128

    def __post_init__(self) -> None:
        if self.n_slots < 1:
            raise ValueError("an arena needs at least one slot")
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


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """What travels from producer to consumer: where the tensor is and what it is."""

    slot: int
    seq: int
    kind: ChunkKind
    job_id: str
    attempt: int
    chunk: int
    priority: int
    arrival: float
    published_at: float
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def order_key(self, now: float, starvation_age_s: float) -> tuple[int, float, int]:
        """(priority class, request arrival, chunk); old descriptors jump to the top class."""
        waited = now - self.published_at
        rank = 0 if starvation_age_s > 0 and waited >= starvation_age_s else self.priority
        return (rank, self.arrival, self.chunk)


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


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
        self.records = np.ndarray(
            (n,), dtype=RECORD_DTYPE, buffer=mm, offset=HEADER_BYTES, strides=(RECORD_BYTES,)
        )
        self.epoch = bytes(self.header["epoch"])
        self.recovered = 0
        self._closed = False

    # -- lifecycle -----------------------------------------------------------
    @classmethod
    def create(cls, path: Path, layout: ArenaLayout, deployment: str) -> Arena:
        """Create (or take over a stale) arena at ``path`` and hold the daemon lock.

        Raises ``ClipError(gpu_unavailable)`` if a live daemon already owns it.
        A stale arena with the same layout is reused (its in-flight slots recovered);
        one with another layout is replaced.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, constants.SHM_FILE_MODE)
        try:
            os.fchmod(fd, constants.SHM_FILE_MODE)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _LOCK_DAEMON)
            except OSError as exc:
                raise ClipError(
                    ErrorCode.GPU_UNAVAILABLE,
                    f"another GPU daemon already serves deployment {deployment!r} ({path})",
                    transient=False,
                ) from exc
            size = os.fstat(fd).st_size
            reuse = size == layout.file_bytes and _header_matches(fd, layout)
            if not reuse:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, layout.file_bytes)
            mm = mmap.mmap(fd, layout.file_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        if not reuse:
            hdr = np.ndarray((), dtype=HEADER_DTYPE, buffer=mm, offset=0)
            hdr["version"] = constants.SHM_LAYOUT_VERSION
            hdr["n_slots"] = layout.n_slots
            hdr["slot_bytes"] = layout.slot_stride
            hdr["data_offset"] = layout.data_offset
            hdr["epoch"] = uuid.uuid4().bytes
            hdr["created"] = time.time()
            hdr["frames_per_chunk"] = layout.frames_per_chunk
            hdr["frame_height"] = layout.frame_height
            hdr["frame_width"] = layout.frame_width
            hdr["deployment"] = deployment.encode()
            hdr["magic"] = constants.SHM_MAGIC  # last: marks the header complete
        arena = cls(path, fd, mm, owner=True)
        arena.header["daemon_pid"] = os.getpid()
        arena.recovered = arena._recover() if reuse else 0
        return arena

    @classmethod
    def attach(cls, path: Path) -> Arena:
        """Map an existing arena (producers). Never unlinks or resizes it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ClipError(
                ErrorCode.GPU_UNAVAILABLE,
                f"the GPU daemon is not running (no shared-memory arena at {path})",
            ) from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise ClipError(ErrorCode.GPU_UNAVAILABLE, f"arena {path} is not initialised yet")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            hdr = np.ndarray((), dtype=HEADER_DTYPE, buffer=mm, offset=0)
            if bytes(hdr["magic"]) != constants.SHM_MAGIC or int(hdr["version"]) != (
                constants.SHM_LAYOUT_VERSION
            ):
                mm.close()
                raise ClipError(ErrorCode.GPU_UNAVAILABLE, f"arena {path} is not initialised yet")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, owner=False)

    def close(self, *, unlink: bool = False) -> None:
        """Unmap; the owner may also unlink the file (clean daemon shutdown)."""
        if self._closed:
            return
        self._closed = True
        if unlink and self.owner:
            with contextlib.suppress(FileNotFoundError):
                # Only unlink the file we created, not a successor's.
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self.inode:
                    os.unlink(self.path)
        del self.header, self.records
        with contextlib.suppress(BufferError):
            self._mm.close()
        os.close(self._fd)

    def is_current(self) -> bool:
        """True while ``path`` still names the file this arena maps."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.inode

    # -- leases --------------------------------------------------------------
    def _try_lock(self, slot: int) -> bool:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _LOCK_BASE + slot)
            return True
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise

    def _unlock(self, slot: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _LOCK_BASE + slot)

    def _owner_dead(self, slot: int) -> bool:
        """True if the slot's recorded owner no longer holds its lease."""
        owner = int(self.records[slot]["owner"])
        if owner == self.pid:
            return False  # our own process: alive by definition
        if self._try_lock(slot):
            self._unlock(slot)
            return True
        return False

    def _recover(self) -> int:
        """At daemon start on a reused arena: requeue interrupted work, free dead writes."""
        fixed = 0
        for i in range(self.layout.n_slots):
            rec = self.records[i]
            state = int(rec["state"])
            if state == SlotState.CONSUMING and self._owner_dead(i):
                rec["state"] = SlotState.READY
                fixed += 1
            elif state == SlotState.WRITING and self._owner_dead(i):
                rec["owner"] = 0
                rec["state"] = SlotState.FREE
                m.SHM_SLOTS_RECLAIMED.inc()
                fixed += 1
        return fixed

    def reclaim_dead(self) -> int:
        """Free WRITING slots whose producer died; return how many were reclaimed."""
        count = 0
        writing = np.flatnonzero(self.records["state"] == SlotState.WRITING)
        for i in writing.tolist():
            if self._owner_dead(i) and int(self.records[i]["state"]) == SlotState.WRITING:
                self.records[i]["owner"] = 0
                self.records[i]["state"] = SlotState.FREE
                count += 1
        if count:
            m.SHM_SLOTS_RECLAIMED.inc(count)
        return count

    # -- views ---------------------------------------------------------------
    def slot_buffer(self, slot: int) -> memoryview:
        start = self.layout.data_offset + slot * self.layout.slot_stride
        return memoryview(self._mm)[start : start + self.layout.slot_stride]

    def view(self, slot: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A numpy array over slot ``slot``'s pages (no copy)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if nbytes > self.layout.slot_stride:
            raise ClipError(
                ErrorCode.TOO_LARGE,
                f"a tensor of {nbytes} bytes does not fit a {self.layout.slot_stride}-byte slot",
                transient=False,
            )
        start = self.layout.data_offset + slot * self.layout.slot_stride
        return np.ndarray(shape, dtype=dtype, buffer=self._mm, offset=start)

    def base_address(self) -> tuple[int, int]:
        """(address, length) of the data region, for cudaHostRegister."""
        buf = np.frombuffer(self._mm, dtype=np.uint8)
        return int(buf.ctypes.data) + self.layout.data_offset, self.layout.n_slots * (
            self.layout.slot_stride
        )

    def slots_in_use(self) -> int:
        return int(np.count_nonzero(self.records["state"] != SlotState.FREE))

    def states(self) -> dict[str, int]:
        counts = np.bincount(self.records["state"].astype(np.int64), minlength=len(SlotState))
        return {s.name.lower(): int(counts[s]) for s in SlotState}


def _header_matches(fd: int, layout: ArenaLayout) -> bool:
    raw = os.pread(fd, HEADER_DTYPE.itemsize, 0)
    if len(raw) < HEADER_DTYPE.itemsize:
        return False
    hdr = np.frombuffer(raw, dtype=HEADER_DTYPE)[0]
    return bool(
        bytes(hdr["magic"]) == constants.SHM_MAGIC
        and int(hdr["version"]) == constants.SHM_LAYOUT_VERSION
        and int(hdr["n_slots"]) == layout.n_slots
        and int(hdr["slot_bytes"]) == layout.slot_stride
        and int(hdr["frames_per_chunk"]) == layout.frames_per_chunk
        and int(hdr["frame_height"]) == layout.frame_height
        and int(hdr["frame_width"]) == layout.frame_width
    )


# ---------------------------------------------------------------------------
# Producer side (workers).
# ---------------------------------------------------------------------------
class SlotLease:
    """A reserved slot. Write into :meth:`array`, then :meth:`publish` (or :meth:`abort`)."""

    def __init__(self, producer: Producer, arena: Arena, slot: int) -> None:
        self._producer = producer
        self.arena = arena
        self.slot = slot
        self.done = False

    def array(self, shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
        """Writable numpy view over the slot, shaped as requested."""
        return self.arena.view(self.slot, shape, np.dtype(dtype))

    def publish(
        self,
        *,
        job_id: str,
        shape: tuple[int, ...],
        dtype: Any = np.uint8,
        chunk: int = 0,
        priority: int = 1,
        arrival: float | None = None,
        attempt: int = 1,
        kind: ChunkKind = ChunkKind.FRAMES,
    ) -> None:
        """Hand the slot's first ``prod(shape)`` elements to the consumer."""
        if self.done:
            raise RuntimeError("slot already published or aborted")
        dt = np.dtype(dtype)
        if dt not in _DTYPE_CODES:
            raise ValueError(f"unsupported dtype {dt}")
        if len(shape) > MAX_DIMS:
            raise ValueError(f"at most {MAX_DIMS} dimensions")
        if int(np.prod(shape)) * dt.itemsize > self.arena.layout.slot_stride:
            raise ValueError("tensor larger than the slot")
        encoded = job_id.encode()
        if len(encoded) > JOB_ID_BYTES:
            raise ValueError("job id too long")
        rec = self.arena.records[self.slot]
        rec["kind"] = int(kind)
        rec["job_id"] = encoded
        rec["attempt"] = attempt
        rec["chunk"] = chunk
        rec["priority"] = priority
        rec["arrival"] = time.time() if arrival is None else arrival
        rec["ndim"] = len(shape)
        padded = list(shape) + [0] * (MAX_DIMS - len(shape))
        rec["shape"] = padded
        rec["dtype"] = _DTYPE_CODES[dt]
        rec["nbytes"] = int(np.prod(shape)) * dt.itemsize
        rec["published_at"] = time.monotonic()
        rec["state"] = SlotState.READY
        self.done = True
        self._producer._finish(self.slot)
        m.HANDOFF_BYTES.inc(int(rec["nbytes"]))
        self._producer.notify()

    def abort(self) -> None:
        """Give the slot back without publishing."""
        if self.done:
            return
        rec = self.arena.records[self.slot]
        rec["owner"] = 0
        rec["state"] = SlotState.FREE
        self.done = True
        self._producer._finish(self.slot)

    def __enter__(self) -> SlotLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class Producer:
    """A worker process's handle on the daemon's arena (attach lazily, fork-safe)."""

    def __init__(
        self, arena_path: Path, socket_path: Path, reserve_timeout_s: float = 30.0
    ) -> None:
        self.arena_path = arena_path
        self.socket_path = socket_path
        self.reserve_timeout_s = reserve_timeout_s
        self._arena: Arena | None = None
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._sock: socket.socket | None = None
        self._next = 0

    @property
    def arena(self) -> Arena:
        return self._ensure_arena()

    def _ensure_arena(self) -> Arena:
        arena = self._arena
        if arena is not None and arena.pid == os.getpid() and arena.is_current():
            return arena
        if arena is not None and arena.pid == os.getpid() and not self._held:
            arena.close()
        self._arena = None
        self._held = set()
        self._sock = None
        self._arena = Arena.attach(self.arena_path)
        return self._arena

    def reserve(self, timeout_s: float | None = None) -> SlotLease:
        """Reserve a free slot, waiting up to ``timeout_s``; raise ``backpressure`` after."""
        timeout = self.reserve_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        deadline = start + timeout
        delay = 0.0002
        reclaimed_at = start
        while True:
            with self._lock:
                arena = self._ensure_arena()
                slot = self._try_reserve(arena)
                if slot is not None:
                    self._held.add(slot)
                    m.SHM_RESERVE_WAIT.observe(time.monotonic() - start)
                    return SlotLease(self, arena, slot)
            now = time.monotonic()
            if now >= deadline:
                m.SHM_RESERVE_WAIT.observe(now - start)
                raise ClipError(
                    ErrorCode.BACKPRESSURE,
                    f"no free shared-memory slot within {timeout:.1f} s "
                    f"({arena.layout.n_slots} slots all busy); will retry",
                )
            if now - reclaimed_at > 0.5:
                reclaimed_at = now
                with self._lock:
                    arena.reclaim_dead()
            time.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, 0.005)

    def _try_reserve(self, arena: Arena) -> int | None:
        n = arena.layout.n_slots
        states = arena.records["state"]
        free = np.flatnonzero(states == SlotState.FREE)
        if free.size == 0:
            return None
        # Rotate the starting point so concurrent producers rarely collide.
        order = np.concatenate([free[free >= self._next], free[free < self._next]])
        for i in order.tolist():
            if i in self._held:
                continue
            if not arena._try_lock(i):
                continue
            rec = arena.records[i]
            if int(rec["state"]) != SlotState.FREE:
                arena._unlock(i)
                continue
            rec["owner"] = os.getpid()
            rec["seq"] = int(rec["seq"]) + 1
            rec["reserved_at"] = time.monotonic()
            rec["state"] = SlotState.WRITING
            self._next = (i + 1) % n
            return i
        return None

    def _finish(self, slot: int) -> None:
        with self._lock:
            self._held.discard(slot)
            arena = self._arena
            if arena is not None:
                arena._unlock(slot)

    def notify(self) -> None:
        """Wake the daemon (best effort: it also polls)."""
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(b"\x01", str(self.socket_path))
        except OSError:
            pass

    def withdraw(self, job_id: str, attempt: int | None = None) -> int:
        """Take back READY slots of ``job_id`` the daemon has not consumed yet."""
        arena = self._ensure_arena()
        encoded = job_id.encode()
        count = 0
        with self._lock:
            ready = np.flatnonzero(
                (arena.records["state"] == SlotState.READY) & (arena.records["job_id"] == encoded)
            )
            for i in ready.tolist():
                if attempt is not None and int(arena.records[i]["attempt"]) != attempt:
                    continue
                if not arena._try_lock(i):
                    continue
                if int(arena.records[i]["state"]) == SlotState.READY:
                    arena.records[i]["state"] = SlotState.FREE
                    count += 1
                arena._unlock(i)
        return count

    @property
    def frame_spec(self) -> tuple[int, int, int]:
        """(frames per chunk, height, width) the daemon asked for."""
        lay = self._ensure_arena().layout
        return lay.frames_per_chunk, lay.frame_height, lay.frame_width

    def close(self) -> None:
        if self._arena is not None and self._arena.pid == os.getpid():
            self._arena.close()
        self._arena = None


# ---------------------------------------------------------------------------
# Consumer side (the daemon).
# ---------------------------------------------------------------------------
class Consumer:
    """The daemon's side: owns the arena file and the wake-up socket."""

    def __init__(
        self,
        arena_path: Path,
        socket_path: Path,
        layout: ArenaLayout,
        deployment: str,
        starvation_age_s: float = 10.0,
    ) -> None:
        self.arena = Arena.create(arena_path, layout, deployment)
        self.socket_path = socket_path
        self.starvation_age_s = starvation_age_s
        self._sock = _bind_socket(socket_path)
        self._pending: dict[int, Descriptor] = {}
        m.SHM_SLOTS_TOTAL.set(self.arena.layout.n_slots)

    def wait(self, timeout_s: float) -> None:
        """Block until a producer signals or ``timeout_s`` passes; drain the signals."""
        if timeout_s > 0:
            self._sock.settimeout(timeout_s)
        else:
            self._sock.setblocking(False)
        try:
            self._sock.recv(64)
        except (TimeoutError, BlockingIOError):
            return
        self._sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._sock.recv(64)

    def ready_count(self) -> int:
        return int(np.count_nonzero(self.arena.records["state"] == SlotState.READY))

    def peek_ready(self) -> list[Descriptor]:
        """Descriptors of all READY slots, best first (not taken)."""
        arena = self.arena
        idx = np.flatnonzero(arena.records["state"] == SlotState.READY)
        now = time.monotonic()
        descs = [_descriptor(arena, i) for i in idx.tolist()]
        descs.sort(key=lambda d: d.order_key(now, self.starvation_age_s))
        return descs

    def take(self, descs: list[Descriptor]) -> list[Descriptor]:
        """Move the given READY descriptors to CONSUMING; return those actually taken."""
        arena = self.arena
        taken: list[Descriptor] = []
        for d in descs:
            rec = arena.records[d.slot]
            if int(rec["state"]) != SlotState.READY or int(rec["seq"]) != d.seq:
                continue
            if not arena._try_lock(d.slot):
                continue
            if int(rec["state"]) != SlotState.READY:
                arena._unlock(d.slot)
                continue
            rec["owner"] = arena.pid
            rec["state"] = SlotState.CONSUMING
            self._pending[d.slot] = d
            taken.append(d)
            m.HANDOFF_SECONDS.observe(max(0.0, time.monotonic() - d.published_at))
        m.SHM_SLOTS_IN_USE.set(arena.slots_in_use())
        return taken

    def take_next(self, max_items: int) -> list[Descriptor]:
        return self.take(self.peek_ready()[:max_items])

    def array(self, d: Descriptor) -> np.ndarray:
        """Zero-copy numpy view of a taken descriptor's tensor."""
        return self.arena.view(d.slot, d.shape, d.dtype)

    def release(self, d: Descriptor) -> None:
        """Return a consumed slot to the free pool (data no longer needed)."""
        arena = self.arena
        if self._pending.pop(d.slot, None) is None:
            return
        rec = arena.records[d.slot]
        rec["owner"] = 0
        rec["state"] = SlotState.FREE
        arena._unlock(d.slot)
        m.SHM_SLOTS_IN_USE.set(arena.slots_in_use())

    def requeue(self, d: Descriptor) -> None:
        """Give a taken descriptor back as READY (e.g. a batch that could not run)."""
        arena = self.arena
        if self._pending.pop(d.slot, None) is None:
            return
        arena.records[d.slot]["state"] = SlotState.READY
        arena._unlock(d.slot)

    def reclaim_dead(self) -> int:
        n = self.arena.reclaim_dead()
        m.SHM_SLOTS_IN_USE.set(self.arena.slots_in_use())
        return n

    def close(self, *, unlink: bool = True) -> None:
        for d in list(self._pending.values()):
            self.requeue(d)
        self._sock.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self.arena.close(unlink=unlink)


def _descriptor(arena: Arena, i: int) -> Descriptor:
    rec = arena.records[i]
    ndim = int(rec["ndim"])
    return Descriptor(
        slot=i,
        seq=int(rec["seq"]),
        kind=ChunkKind(int(rec["kind"])),
        job_id=bytes(rec["job_id"]).decode(),
        attempt=int(rec["attempt"]),
        chunk=int(rec["chunk"]),
        priority=int(rec["priority"]),
        arrival=float(rec["arrival"]),
        published_at=float(rec["published_at"]),
        shape=tuple(int(x) for x in rec["shape"][:ndim]),
        dtype=_DTYPES[int(rec["dtype"])],
    )


def _bind_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            os.unlink(path)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, constants.SHM_FILE_MODE)
    return sock


@contextlib.contextmanager
def attached(arena_path: Path) -> Iterator[Arena]:
    arena = Arena.attach(arena_path)
    try:
        yield arena
    finally:
        arena.close()
