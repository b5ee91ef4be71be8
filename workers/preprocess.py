"""Preprocess stage: put decoded frames, resized, straight into the GPU daemon's slots.

A job's kept frames are numbered by *ordinal* (0, 1, 2, ... in video order). Ordinal
``j`` lives in chunk ``j // T`` at position ``j % T``, where ``T`` is the daemon's
frames per chunk. A :class:`ChunkedSink` hands out, for an ordinal, the ``[H, W, 3]``
uint8 view of exactly that place in the chunk's buffer; the decoder resizes and
colour-converts the decoded frame into it (:func:`into`) and commits it. A chunk is
published as soon as all of its positions are filled, so the daemon starts on a job's
first chunk while later ones are still being decoded, and several decoder threads can
fill different parts of the video at once (see :mod:`workers.decode`).

:class:`SlotSink` writes into shared-memory slots of the daemon's arena through
:class:`gpu_service.shm.Producer`; :class:`MemorySink` keeps the chunks in memory
(benchmarks, tests). Both publish with the same rules.

Only resized frames exist here: never a full-resolution copy of the whole video. Pixels
stay uint8 RGB in ``[T, H, W, 3]`` layout; normalisation happens on the device.

Generations: everything a job publishes carries a *generation* number (the daemon
echoes it back with each result as ``generation``). :meth:`ChunkedSink.restart` drops all
chunks, takes back the ones the daemon has not started, and moves to a new
generation, so results of an abandoned pass can never be mistaken for the new ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from gpu_service.shm import ChunkKind, Producer, SlotLease

#: Generations per job attempt: ``generation = attempt * GENERATIONS + pass``.
GENERATIONS = 8


def generation(attempt: int, pass_no: int = 0) -> int:
    """The wire generation of decode pass ``pass_no`` of job attempt ``attempt``."""
    return attempt * GENERATIONS + min(pass_no, GENERATIONS - 1)


def content_rect(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """Where a ``src_w x src_h`` picture lands in a ``dst_w x dst_h`` buffer: (x, y, w, h).

    The picture is scaled to fit, aspect kept, and centred (letterbox/pillarbox).
    """
    scale = min(dst_w / max(1, src_w), dst_h / max(1, src_h))
    w = min(dst_w, max(1, round(src_w * scale)))
    h = min(dst_h, max(1, round(src_h * scale)))
    return (dst_w - w) // 2, (dst_h - h) // 2, w, h


def into(frame: np.ndarray, dst: np.ndarray) -> None:
    """Resize a decoded BGR frame into ``dst`` (``[H, W, 3]`` uint8) as RGB, in place.

    The aspect ratio is kept: the picture is centred in ``dst`` (:func:`content_rect`)
    and the bars around it are exact zeros, while the picture's own pixels are at least
    1, so the daemon's models can tell the two apart (a keypoint on a bar's edge is not
    the product's).

    Downscaling halves the picture with an exact 2x2 box filter while it is at least
    twice the target in both directions, then takes one bilinear step of less than 2x:
    the same anti-aliasing as a direct ``INTER_AREA`` resize (mean difference under one
    grey level), at an eighth of its cost (OpenCV's area filter is fast only for exact
    2x). Odd edges lose one row or column before a halving.
    """
    x, y, w, h = content_rect(frame.shape[1], frame.shape[0], dst.shape[1], dst.shape[0])
    src = frame
    while src.shape[0] >= 2 * h and src.shape[1] >= 2 * w:
        rows, cols = src.shape[0] // 2, src.shape[1] // 2
        src = cv2.resize(src[: 2 * rows, : 2 * cols], (cols, rows), interpolation=cv2.INTER_AREA)
    if (w, h) == (dst.shape[1], dst.shape[0]):
        cv2.resize(src, (w, h), dst=dst, interpolation=cv2.INTER_LINEAR)
        cv2.cvtColor(dst, cv2.COLOR_BGR2RGB, dst=dst)
        np.maximum(dst, 1, out=dst)
        return
    picture = cv2.cvtColor(
        cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB
    )
    dst[:y] = 0
    dst[y + h :] = 0
    dst[y : y + h, :x] = 0
    dst[y : y + h, x + w :] = 0
    np.maximum(picture, 1, out=dst[y : y + h, x : x + w])


class _Chunk:
    __slots__ = ("array", "filled", "handle", "published")

    def __init__(self, array: np.ndarray, handle: Any, frames: int) -> None:
        self.array = array
        self.handle = handle
        self.filled = np.zeros(frames, dtype=bool)
        self.published = False


class ChunkedSink:
    """Thread-safe ordinal -> chunk position bookkeeping; subclasses own the storage."""

    def __init__(self, frames: int, height: int, width: int) -> None:
        if frames < 1 or height < 1 or width < 1:
            raise ValueError("frames, height and width must be positive")
        self.frames, self.height, self.width = frames, height, width
        self._cond = threading.Condition()
        self._chunks: dict[int, _Chunk] = {}
        self._reserving: set[int] = set()
        self._published_chunks: set[int] = set()
        self.generation_pass = 0
        self.chunks_published = 0  # frame chunks published in this generation
        self.published = 0  # items published in this generation (frame chunks + refs)

    # -- storage (subclasses) -------------------------------------------------------
    def _reserve(self) -> tuple[np.ndarray, Any]:
        """A ``[T, H, W, 3]`` uint8 buffer for one chunk and a handle to publish it."""
        raise NotImplementedError

    def _publish(self, chunk: int, n: int, handle: Any, array: np.ndarray) -> None:
        raise NotImplementedError

    def _drop(self, handle: Any) -> None:
        """Give an unpublished buffer back."""

    def _withdraw(self) -> None:
        """Take back published items the consumer has not started (on restart)."""

    # -- the sink interface the decoder uses ------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of each frame."""
        return self.height, self.width

    def buffer(self, ordinal: int) -> np.ndarray:
        """The ``[H, W, 3]`` view where kept frame ``ordinal`` must be written."""
        c, pos = divmod(ordinal, self.frames)
        with self._cond:
            while True:
                chunk = self._chunks.get(c)
                if chunk is not None:
                    return chunk.array[pos]
                if c in self._published_chunks:
                    raise RuntimeError(f"chunk {c} was already published")
                if c not in self._reserving:
                    self._reserving.add(c)
                    break
                self._cond.wait()
        # Reserve outside the lock: it may wait for the consumer to free a slot.
        try:
            array, handle = self._reserve()
        except BaseException:
            with self._cond:
                self._reserving.discard(c)
                self._cond.notify_all()
            raise
        with self._cond:
            self._reserving.discard(c)
            self._chunks[c] = _Chunk(array, handle, self.frames)
            self._cond.notify_all()
            return array[pos]

    def commit(self, ordinal: int) -> None:
        """Mark ``ordinal`` written; publish its chunk when the chunk is full."""
        c, pos = divmod(ordinal, self.frames)
        with self._cond:
            chunk = self._chunks[c]
            chunk.filled[pos] = True
            if chunk.filled.all():
                self._publish_locked(c, self.frames)

    def published_from(self, ordinal: int) -> bool:
        """Whether any chunk holding an ordinal >= ``ordinal`` has been published."""
        first = ordinal // self.frames
        with self._cond:
            return any(c >= first for c in self._published_chunks)

    def truncate(self, count: int) -> None:
        """Forget every frame with ordinal >= ``count`` (not published ones: see above)."""
        with self._cond:
            for c, chunk in list(self._chunks.items()):
                lo = c * self.frames
                if lo >= count:
                    self._chunks.pop(c)
                    self._drop(chunk.handle)
                elif lo + self.frames > count:
                    chunk.filled[count - lo :] = False

    def finish(self, count: int) -> None:
        """The video holds ``count`` kept frames: publish the last, partial chunk."""
        last, rest = divmod(count, self.frames)
        with self._cond:
            for c, chunk in list(self._chunks.items()):
                if c > last or (c == last and rest == 0):
                    self._chunks.pop(c)
                    self._drop(chunk.handle)
            chunk_ = self._chunks.get(last)
            if rest and chunk_ is not None:
                if not chunk_.filled[:rest].all():
                    missing = int((~chunk_.filled[:rest]).sum())
                    raise RuntimeError(f"chunk {last} still misses {missing} frame(s)")
                self._publish_locked(last, rest)
            if self._chunks:
                raise RuntimeError(f"chunks {sorted(self._chunks)} were never filled")

    def restart(self) -> None:
        """Drop everything of this generation and start the next one."""
        with self._cond:
            for chunk in self._chunks.values():
                self._drop(chunk.handle)
            self._chunks.clear()
            self._published_chunks.clear()
            self._withdraw()
            self.generation_pass += 1
            self.chunks_published = 0
            self.published = 0

    def abort(self) -> None:
        """Give back every buffer not yet published (the job stops)."""
        with self._cond:
            for chunk in self._chunks.values():
                self._drop(chunk.handle)
            self._chunks.clear()

    def _publish_locked(self, c: int, n: int) -> None:
        chunk = self._chunks.pop(c)
        self._publish(c, n, chunk.handle, chunk.array)
        chunk.published = True
        self._published_chunks.add(c)
        self.chunks_published += 1
        self.published += 1


class MemorySink(ChunkedSink):
    """Keeps published chunks in memory: ``chunks[c]`` is a ``[n, H, W, 3]`` array."""

    def __init__(self, frames: int, height: int, width: int) -> None:
        super().__init__(frames, height, width)
        self.chunks: dict[int, np.ndarray] = {}
        self.restarts = 0

    def _reserve(self) -> tuple[np.ndarray, Any]:
        array = np.empty((self.frames, self.height, self.width, 3), dtype=np.uint8)
        return array, None

    def _publish(self, chunk: int, n: int, handle: Any, array: np.ndarray) -> None:
        self.chunks[chunk] = array[:n]

    def _withdraw(self) -> None:
        self.chunks.clear()
        self.restarts += 1

    def frames_array(self) -> np.ndarray:
        """All published frames in ordinal order, ``[N, H, W, 3]``."""
        if not self.chunks:
            return np.empty((0, self.height, self.width, 3), dtype=np.uint8)
        return np.concatenate([self.chunks[c] for c in sorted(self.chunks)], axis=0)


class SlotSink(ChunkedSink):
    """Writes a job's chunks into the GPU daemon's shared-memory arena.

    ``base_generation`` is :func:`generation` of the job attempt; after a
    :meth:`restart` the next pass publishes under ``base_generation + 1``, and so on.
    """

    def __init__(
        self,
        producer: Producer,
        job_id: str,
        base_generation: int,
        priority: int,
        arrival: float,
    ) -> None:
        frames, height, width = producer.frame_spec
        super().__init__(frames, height, width)
        self.producer = producer
        self.job_id = job_id
        self.base_generation = base_generation
        self.priority = priority
        self.arrival = arrival
        self._refs_fill: Callable[[np.ndarray], int] | None = None

    @property
    def generation(self) -> int:
        """The generation the daemon echoes on this pass's results."""
        return self.base_generation + self.generation_pass

    def _reserve(self) -> tuple[np.ndarray, Any]:
        lease = self.producer.reserve()
        return lease.array((self.frames, self.height, self.width, 3)), lease

    def _publish(self, chunk: int, n: int, handle: Any, array: np.ndarray) -> None:
        lease: SlotLease = handle
        lease.publish(
            job_id=self.job_id,
            shape=(n, self.height, self.width, 3),
            chunk=chunk,
            priority=self.priority,
            arrival=self.arrival,
            generation=self.generation,
            kind=ChunkKind.FRAMES,
        )

    def _drop(self, handle: Any) -> None:
        lease: SlotLease = handle
        lease.abort()

    def _withdraw(self) -> None:
        self.producer.withdraw(self.job_id, self.generation)

    def restart(self) -> None:
        super().restart()
        if self._refs_fill is not None:
            self.publish_refs(self._refs_fill)

    def publish_refs(self, fill: Callable[[np.ndarray], int]) -> None:
        """Reserve a slot, let ``fill`` write up to ``T`` product images, publish them."""
        self._refs_fill = fill
        with self.producer.reserve() as lease:
            arr = lease.array((self.frames, self.height, self.width, 3))
            n = fill(arr)
            lease.publish(
                job_id=self.job_id,
                shape=(n, self.height, self.width, 3),
                chunk=-1,
                priority=self.priority,
                arrival=self.arrival,
                generation=self.generation,
                kind=ChunkKind.REFS,
            )
        with self._cond:
            self.published += 1

    def withdraw_all(self) -> None:
        """Take back this generation's items the daemon has not started (job stops)."""
        self.producer.withdraw(self.job_id, self.generation)
