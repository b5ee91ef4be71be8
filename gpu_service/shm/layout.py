"""The arena's on-disk layout: header, slot states, slot records, descriptors.

Owns the byte layout every process agrees on (:class:`ArenaLayout`, the record and
descriptor structs, :class:`SlotState`, :class:`ChunkKind`, the dtype codes) and the
decoding of a slot record into a :class:`Descriptor`. Pure data: must not open files,
take locks or import the producer, consumer or daemon.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import mmap
import struct
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger("gpu_service.shm")

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
