"""The daemon's core loop: ``schedule() -> execute(batch) -> update(launched)``.

``schedule``  reads the READY descriptors of the shared-memory arena (best first),
              lets the :class:`~gpu_service.batcher.Batcher` pick a batch (full, or its
              oldest item reached the delay bound, or draining) and takes its slots.
              Descriptors that cannot run are answered with an error at once.
``execute``   stages the batch's frames on the device (copy stream on CUDA) and launches
              the models that run on its kind: every model on video frames, only the
              non-temporal ones on a job's product reference images.
``update``    releases the batch's slots as soon as its copy has finished, waits for its
              compute, and hands the host outputs to the publisher thread.

:meth:`Engine.run_once` runs these as a two-stage pipeline on CUDA (``depth`` 2):
while batch N computes, batch N+1 is scheduled, copied and queued behind it, and only
then does the loop wait for N, so the device is never idle while work is due. On the
CPU the same loop runs with depth 1 (a forward pass is synchronous there).

Failures: a model that raises on a batch is bisected by the executor, so a bad item is
answered with the error and the rest of the batch with results; a batch that cannot
even be staged is answered with the error. A device failure (a CUDA fault) propagates:
the daemon exits without unlinking the arena, and the next daemon takes the unfinished
items over (:mod:`gpu_service.shm` recovery).

Captions: with a :class:`~gpu_service.captions.CaptionService`, :meth:`Engine.run_once`
runs one caption batch after a frame step when it is due (no frame batch was due in
that step, or enough frame batches and frame time passed since the last caption
batch), on the same thread and device as the frames; see :mod:`gpu_service.captions`.

Draining: with ``draining`` set, batches are formed without waiting for the delay, and
:meth:`drained` is true once nothing is READY, nothing is in flight and no producer is
still writing a slot (producers get ``drain_grace_s`` to finish theirs), and every
caption request already taken from Redis is answered.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gpu_service.batcher import Batch, Batcher, BatchPolicy, geometry
from gpu_service.executor import Completed, DeviceFailure, Executor, Launched
from gpu_service.models.base import Model
from gpu_service.publisher import ResultPublisher
from gpu_service.shm import ChunkKind, Consumer, Descriptor

if TYPE_CHECKING:
    from gpu_service.captions import CaptionService

log = logging.getLogger("clipline.gpu")

#: how long the loop sleeps on the wake-up socket when the arena is empty
IDLE_WAIT_S = 0.25


class Engine:
    """Batches descriptors from the arena, runs them, publishes the results."""

    def __init__(
        self,
        consumer: Consumer,
        models: Sequence[Model],
        executor: Executor,
        publisher: ResultPublisher,
        policy: BatchPolicy,
        *,
        depth: int = 1,
        drain_grace_s: float = 10.0,
        captions: CaptionService | None = None,
    ) -> None:
        if not models:
            raise ValueError("the engine needs at least one model")
        self.consumer = consumer
        self.models = list(models)
        self.executor = executor
        self.publisher = publisher
        self.policy = policy
        self.depth = max(1, depth)
        self.drain_grace_s = drain_grace_s
        self.captions = captions
        self.models_by_kind: dict[ChunkKind, list[Model]] = {
            ChunkKind.FRAMES: list(models),
            ChunkKind.REFS: [mdl for mdl in models if not mdl.temporal],
        }
        self.batcher = Batcher(policy, self.pads_frames)
        self.inflight: deque[Launched] = deque()
        #: the last batches completed (timings, for status and tests)
        self.recent: deque[Completed] = deque(maxlen=64)
        self.seq = 0
        self.items_done = 0
        self.batches_done = 0
        self.rejected = 0
        self.draining = False
        self._drain_since: float | None = None
        self._next_due = policy.max_delay_s

    # -- policy -------------------------------------------------------------------
    def pads_frames(self, kind: ChunkKind) -> bool:
        """Items of ``kind`` with fewer frames may be padded into a batch (no temporal model)."""
        return not any(mdl.temporal for mdl in self.models_by_kind[kind])

    def start_draining(self) -> None:
        if not self.draining:
            self.draining = True
            self._drain_since = time.monotonic()
            if self.captions is not None:
                self.captions.stop_intake()

    # -- schedule -----------------------------------------------------------------
    def schedule(self, *, force: bool = False) -> Batch | None:
        """Take the next batch from the arena, or None if it is better to wait."""
        ready = self.consumer.peek_ready()
        if not ready:
            self._next_due = IDLE_WAIT_S
            return None
        now = time.monotonic()
        selection = self.batcher.select(ready, now, force=force or self.draining)
        if selection is None:
            self._next_due = self.batcher.time_to_due(ready, now)
            return None
        if selection.rejected:
            self._reject(selection.rejected)
        if not selection.items:
            self._next_due = 0.0
            return None
        taken = self.consumer.take(selection.items)
        if not taken:
            self._next_due = 0.0
            return None
        self.seq += 1
        return Batch(
            seq=self.seq,
            kind=taken[0].kind,
            items=taken,
            frames=max(int(d.shape[0]) for d in taken),
            geometry=geometry(taken[0]),
            formed_at=now,
        )

    def _reject(self, items: list[tuple[Descriptor, str]]) -> None:
        why = {d.slot: reason for d, reason in items}
        answered = []
        for d in self.consumer.take([d for d, _ in items]):
            self.consumer.release(d)
            log.warning("rejected chunk %d of job %s: %s", d.chunk, d.job_id, why[d.slot])
            answered.append((d, why[d.slot]))
        self.rejected += len(answered)
        self.publisher.reject(answered, self.seq)

    # -- execute ------------------------------------------------------------------
    def execute(self, batch: Batch) -> Launched | None:
        """Stage and launch ``batch``; None if it could not start (items answered)."""
        models = self.models_by_kind[batch.kind]
        try:
            arrays: list[np.ndarray] = [self.consumer.array(d) for d in batch.items]
            staged = self.executor.stage(batch, arrays, models)
        except Exception as exc:
            log.exception("could not stage a batch of %d items", len(batch))
            self._release(batch)
            self.publisher.reject(
                [(d, f"staging failed: {type(exc).__name__}: {exc}") for d in batch.items],
                batch.seq,
            )
            return None
        released = False
        if self.executor.copied(staged):  # CPU: the copy is done, free the slots now
            self._release(batch)
            released = True
        try:
            launched = self.executor.launch(staged, models)
        except DeviceFailure:
            raise
        except Exception as exc:  # outside the models (e.g. host memory for the outputs)
            log.exception("could not launch a batch of %d items", len(batch))
            if not released:
                self.executor.wait_copied(staged)
                self._release(batch)
            self.publisher.reject(
                [(d, f"launch failed: {type(exc).__name__}: {exc}") for d in batch.items],
                batch.seq,
            )
            return None
        launched.released = released
        return launched

    def _release(self, batch: Batch) -> None:
        for d in batch.items:
            self.consumer.release(d)

    def release_copied(self, *, wait: bool = False) -> None:
        """Free the slots of in-flight batches whose copy to the device has finished."""
        for launched in self.inflight:
            if launched.released:
                continue
            if wait:
                self.executor.wait_copied(launched.staged)
            elif not self.executor.copied(launched.staged):
                continue
            self._release(launched.batch)
            launched.released = True

    # -- update -------------------------------------------------------------------
    def update(self, launched: Launched) -> Completed:
        """Wait for ``launched`` to finish and hand its results to the publisher."""
        if not launched.released:
            self.executor.wait_copied(launched.staged)
            self._release(launched.batch)
            launched.released = True
        done = self.executor.complete(launched)
        self.items_done += len(done.batch)
        self.batches_done += 1
        self.recent.append(done)
        self.publisher.submit(done)
        return done

    # -- the loop -------------------------------------------------------------------
    def run_once(self) -> bool:
        """One pipeline step, then a caption batch if one is due; True if anything ran."""
        progressed = self._frames_once()
        captions = self.captions
        if captions is not None and captions.due(progressed, self.batches_done):
            captions.run(self.batches_done)
            return True
        return progressed

    def _frames_once(self) -> bool:
        """One step of the frame pipeline; True if anything was launched or completed."""
        launched_now = False
        rejected_before = self.rejected
        if len(self.inflight) < self.depth:
            batch = self.schedule()
            if batch is not None:
                launched = self.execute(batch)
                if launched is not None:
                    self.inflight.append(launched)
                launched_now = True
        if self.inflight and (len(self.inflight) >= self.depth or not launched_now):
            # Free the slots of every batch whose copy is done before blocking on the
            # oldest one's compute (the copies finish long before the compute does).
            self.release_copied(wait=True)
            self.update(self.inflight.popleft())
            return True
        return launched_now or self.rejected != rejected_before

    def step(self) -> int:
        """Schedule, run and complete at most one batch synchronously (tests, tools)."""
        batch = self.schedule()
        if batch is None:
            return 0
        launched = self.execute(batch)
        if launched is not None:
            self.update(launched)
        return len(batch)

    def run_until_idle(self, timeout_s: float = 60.0) -> int:
        """Step until the arena holds no ready item; return the items run (tests, tools).

        Unlike stopping at the first :meth:`step` that runs nothing, this waits while
        the batcher holds items back for company (``max_queue_delay_ms``).
        """
        done, deadline = 0, time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            n = self.step()
            done += n
            if n == 0:
                if not self.consumer.peek_ready():
                    break
                self.wait_for_work()
        return done

    def wait_for_work(self) -> None:
        """Sleep on the producers' wake-up socket until work may be due."""
        timeout = self._next_due
        if self.draining:
            timeout = min(timeout, 0.05)
        self.consumer.wait(timeout)

    def drained(self) -> bool:
        """Draining and nothing left: no READY items, nothing in flight, no late writer."""
        if not self.draining or self.inflight:
            return False
        if self.captions is not None and not self.captions.idle():
            return False
        states = self.consumer.arena.states()
        if states["ready"] or states["consuming"]:
            return False
        if states["writing"]:
            since = self._drain_since if self._drain_since is not None else time.monotonic()
            if time.monotonic() - since < self.drain_grace_s:
                return False
            log.warning(
                "drain: %d slots still being written after %.0f s; not waiting for them",
                states["writing"],
                self.drain_grace_s,
            )
        return True

    def finish_inflight(self) -> None:
        """Complete everything launched (used when stopping)."""
        while self.inflight:
            self.release_copied(wait=True)
            self.update(self.inflight.popleft())

    def warmup(self, frames: int, height: int, width: int, sizes: Sequence[int]) -> float:
        """Run synthetic batches of each size through every kind's models; return seconds.

        Allocates the staging buffers, lets ``cudnn.benchmark`` pick its kernels and the
        compiling backends build their code for these batch sizes before real work
        arrives. Nothing is published and the busy meter is reset afterwards.
        """
        start = time.monotonic()
        rng = np.random.default_rng(0)
        chunk = rng.integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
        kinds = [ChunkKind.FRAMES]
        if [m.name for m in self.models_by_kind[ChunkKind.REFS]] != [
            m.name for m in self.models_by_kind[ChunkKind.FRAMES]
        ]:
            kinds.append(ChunkKind.REFS)
        for kind in kinds:
            for size in sizes:
                items = [_synthetic(kind, i, chunk.shape) for i in range(size)]
                batch = Batch(0, kind, items, frames, (height, width, 3), time.monotonic())
                models = self.models_by_kind[kind]
                staged = self.executor.stage(batch, [chunk] * size, models)
                done = self.executor.complete(self.executor.launch(staged, models))
                errors = [s.error for s in done.segments if s.error]
                if errors:
                    raise RuntimeError(f"warm-up batch of {size} failed: {errors[0]}")
        self.executor.busy.reset()
        return time.monotonic() - start

    def close(self) -> None:
        if self.captions is not None:
            self.captions.close()
        self.executor.close()


def _synthetic(kind: ChunkKind, i: int, shape: tuple[int, ...]) -> Descriptor:
    return Descriptor(
        slot=-1,
        seq=0,
        kind=kind,
        job_id="warmup",
        generation=0,
        chunk=i,
        priority=0,
        arrival=0.0,
        published_at=time.monotonic(),
        shape=tuple(shape),
        dtype=np.dtype(np.uint8),
    )
