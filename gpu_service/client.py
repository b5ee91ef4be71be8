"""The workers' side of the contract with the GPU daemon.

A worker process holds one :class:`GpuClient` (create it in the process that uses it;
its producer attaches lazily and reattaches by itself after a fork or a daemon
restart). For a job it opens a :class:`ChunkWriter`, which reserves shared-memory
slots and lets the decoder write frames straight into them, publishing each full chunk
of ``frames_per_chunk`` frames as soon as it is full (so the daemon starts on a job's
first chunk while the rest is still decoding). Product images travel the same way as
one ``refs`` chunk. Results come back on the job's Redis list;
:meth:`GpuClient.collect` waits for exactly the chunks that were published, for this
attempt only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from clipline import constants
from clipline.config import Settings
from clipline.errors import ClipError, ErrorCode
from gpu_service.shm import ChunkKind, Producer, SlotLease


class GpuClient:
    def __init__(self, settings: Settings, redis_client: Any) -> None:
        self.settings = settings
        self.redis = redis_client
        self.producer = Producer(
            settings.arena_path, settings.socket_path, settings.shm_reserve_timeout_s
        )

    def frame_spec(self) -> tuple[int, int, int]:
        """(frames per chunk, height, width) the daemon expects."""
        return self.producer.frame_spec

    def close(self) -> None:
        """Give back slots still being written and detach from the arena."""
        self.producer.close()

    def writer(self, job_id: str, attempt: int, priority: int, arrival: float) -> ChunkWriter:
        return ChunkWriter(self, job_id, attempt, priority, arrival)

    def collect(
        self,
        job_id: str,
        attempt: int,
        expected: int,
        timeout_s: float,
        heartbeat: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Wait for ``expected`` results of this attempt; raise ``gpu_unavailable`` on timeout."""
        key = constants.results_key(self.settings.deployment, job_id)
        deadline = time.monotonic() + timeout_s
        got: dict[int, dict[str, Any]] = {}
        while len(got) < expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.producer.withdraw(job_id, attempt)
                raise ClipError(
                    ErrorCode.GPU_UNAVAILABLE,
                    f"the GPU daemon returned {len(got)} of {expected} results "
                    f"within {timeout_s:.0f} s",
                )
            item = self.redis.blpop([key], timeout=max(1, min(5, int(remaining + 0.999))))
            if heartbeat is not None:
                heartbeat()
            if item is None:
                continue
            msg = json.loads(item[1])
            if msg.get("attempt") != attempt:
                continue  # a late answer for an earlier attempt
            if msg.get("error"):
                raise ClipError(
                    ErrorCode.INTERNAL,
                    f"the GPU daemon failed on this job: {msg['error']}",
                    transient=False,
                )
            got[int(msg["chunk"])] = msg
        self.redis.delete(key)
        return [got[k] for k in sorted(got)]


class ChunkWriter:
    """A :class:`workers.decode.FrameSink` that fills and publishes shared-memory chunks."""

    def __init__(
        self, client: GpuClient, job_id: str, attempt: int, priority: int, arrival: float
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.attempt = attempt
        self.priority = priority
        self.arrival = arrival
        self.frames, self.height, self.width = client.frame_spec()
        self._lease: SlotLease | None = None
        self._array: np.ndarray | None = None
        self._fill = 0
        self.chunks = 0  # frame chunks published
        self.published = 0  # all items published (frames + refs)

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    # FrameSink -------------------------------------------------------------
    def frame_buffer(self) -> np.ndarray:
        if self._lease is None:
            self._lease = self.client.producer.reserve()
            self._array = self._lease.array((self.frames, self.height, self.width, 3))
            self._fill = 0
        assert self._array is not None
        return self._array[self._fill]

    def commit(self, timestamp_s: float) -> None:
        self._fill += 1
        if self._fill == self.frames:
            self._publish_frames()

    def _publish_frames(self) -> None:
        lease = self._lease
        if lease is None or self._fill == 0:
            return
        fill = self._fill
        self._lease = None
        self._array = None
        self._fill = 0
        try:
            lease.publish(
                job_id=self.job_id,
                shape=(fill, self.height, self.width, 3),
                chunk=self.chunks,
                priority=self.priority,
                arrival=self.arrival,
                attempt=self.attempt,
                kind=ChunkKind.FRAMES,
            )
        finally:
            lease.abort()  # no-op once published; frees the slot if publishing failed
        self.chunks += 1
        self.published += 1

    def flush(self) -> None:
        """Publish the last, partly filled chunk."""
        self._publish_frames()

    # References --------------------------------------------------------------
    def publish_refs(self, fill: Callable[[np.ndarray], int]) -> None:
        """Reserve a slot, let ``fill`` write up to ``frames`` images, publish them."""
        with self.client.producer.reserve() as lease:
            arr = lease.array((self.frames, self.height, self.width, 3))
            n = fill(arr)
            lease.publish(
                job_id=self.job_id,
                shape=(n, self.height, self.width, 3),
                chunk=-1,
                priority=self.priority,
                arrival=self.arrival,
                attempt=self.attempt,
                kind=ChunkKind.REFS,
            )
        self.published += 1

    def abort(self) -> None:
        if self._lease is not None:
            self._lease.abort()
            self._lease = None
            self._array = None
