"""Highlight captions in the GPU daemon: intake, batching and fair scheduling.

A worker that wants a caption for a job pushes one small JSON request
(:class:`gpu_service.protocol.CaptionRequest`: job id, generation, title, description,
priority, expiry) onto a Redis list per deployment,
``constants.caption_requests_key(deployment)``, as soon as the job's sources are
fetched, so the caption is written while the video is still being decoded. The answer
comes back as one more message (``kind`` ``"caption"``) on the job's results list.

Why a Redis list and not the shared-memory arena (e.g. the text riding on the job's
``refs`` chunk descriptor): a request is a few hundred bytes of text that gains
nothing from zero-copy; the arena's descriptors are fixed-size binary records shared
with the C-level slot protocol, and its slots are the scarce resource the frames need;
a caption is independent of the frames (no ordering to keep with them); and the
answers already travel through Redis. A list is one ``RPUSH`` for the worker, needs no
new daemon endpoint, survives a daemon restart (unpopped requests wait for the next
daemon), and lets any daemon of the deployment that has a copywriter serve it.

Only a daemon whose copywriter has real weights pops requests (it advertises
``copywriter:<backend>:1`` in its heartbeat, which is what workers check before
asking); a daemon without weights never takes a request, so no text ever comes from
random weights.

Pieces (threads in brackets):

* :class:`CaptionIntake` [caption-intake]: ``BLPOP`` (1 s) then ``LPOP count`` for
  whatever else is waiting, parses the requests into a bounded in-memory
  :class:`CaptionQueue` (best first: priority class, then request time) and wakes the
  engine loop with a datagram on the arena's wake-up socket. When the queue is full it
  stops popping, so a flood stays in Redis instead of in the daemon's memory.
* :class:`CaptionService` [the engine loop, i.e. the compute path]: the engine asks
  :meth:`CaptionService.due` after each frame step and runs one caption batch (up to
  ``max_batch`` requests, greedy decoding with a bounded token count and a KV cache,
  see :mod:`gpu_service.models.copywriter`) when it is due. Frame work comes first: a
  caption batch runs when no frame batch was due in that step; while frame batches
  keep coming, only once at least ``frame_share`` frame batches *and* ``frame_share``
  times the previous caption batch's duration have passed since it. So under a caption
  flood the frames keep at least ``frame_share / (frame_share + 1)`` of the turns and
  of the device time (a caption batch may be much longer than a frame batch), and
  under a frame flood captions still get their turn: neither starves. A frame batch
  that becomes due while a caption batch runs waits for it (at most one caption
  batch). On CUDA the batch runs on the executor's compute stream, behind the frame
  batch in flight.
* Answers go to :meth:`gpu_service.publisher.ResultPublisher.captions` (the publisher
  thread). A batch whose model raises is split in halves until the failing request is
  alone: only that request is answered with the error (its job still succeeds, without
  a caption). Requests past their expiry are dropped unanswered (their worker has
  stopped waiting).

Stopping: draining stops the intake and answers everything already popped; a hard
stop (second signal) pushes the popped but unanswered requests back to the head of the
list for the next daemon. A killed daemon loses at most the requests it held; their
workers wait a short grace after their frames and finish without a caption.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from clipline_core import metrics as m
from gpu_service.executor import BusyMeter, DeviceFailure, is_fatal
from gpu_service.models.copywriter import caption_prompt
from gpu_service.models.text import TextModel
from gpu_service.protocol import CaptionRequest
from gpu_service.publisher import ResultPublisher

log = logging.getLogger("clipline.gpu")

#: requests decoded together at most (greedy GPT-2: the batch shares every decode step)
MAX_CAPTION_BATCH = 16
#: requests the daemon holds in memory at most (the rest wait in Redis)
MAX_PENDING = 256
#: frame batches that run between two caption batches while frames keep coming
FRAME_SHARE = 2
#: how long the intake blocks in one ``BLPOP`` (also its reaction time to stop)
INTAKE_BLOCK_S = 1.0


class CaptionQueue:
    """Bounded, thread-safe, best-first (priority, request time) pending requests."""

    def __init__(self, capacity: int = MAX_PENDING) -> None:
        self.capacity = max(1, capacity)
        self._heap: list[tuple[int, float, int, CaptionRequest]] = []
        self._count = itertools.count()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

    def space(self) -> int:
        with self._cond:
            return self.capacity - len(self._heap)

    def wait_space(self, timeout_s: float) -> bool:
        """Wait until there is room for one more request; True if there is."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._heap) < self.capacity, timeout_s)

    def put_many(self, requests: Iterable[CaptionRequest]) -> None:
        with self._cond:
            for req in requests:
                entry = (req.priority, req.requested_at, next(self._count), req)
                heapq.heappush(self._heap, entry)

    def take(self, n: int, now: float) -> tuple[list[CaptionRequest], list[CaptionRequest]]:
        """Up to ``n`` live requests, best first, and the expired ones met on the way."""
        live: list[CaptionRequest] = []
        expired: list[CaptionRequest] = []
        with self._cond:
            while self._heap and len(live) < n:
                req = heapq.heappop(self._heap)[3]
                (expired if req.expires_at and req.expires_at <= now else live).append(req)
            self._cond.notify_all()
        return live, expired

    def take_all(self) -> list[CaptionRequest]:
        """Everything pending, best first (for handing back to Redis)."""
        with self._cond:
            out = [heapq.heappop(self._heap)[3] for _ in range(len(self._heap))]
            self._cond.notify_all()
        return out


def socket_waker(path: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(wake, close)``: wake sends one datagram to the engine loop's wake-up socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    target = str(path)

    def wake() -> None:
        with contextlib.suppress(OSError):  # a full socket buffer already wakes the loop
            sock.sendto(b"\x01", target)

    return wake, sock.close


class CaptionIntake:
    """A thread moving caption requests from the Redis list into a :class:`CaptionQueue`."""

    def __init__(
        self,
        client: Any,
        key: str,
        queue: CaptionQueue,
        wake: Callable[[], None],
        *,
        block_s: float = INTAKE_BLOCK_S,
    ) -> None:
        self.client = client
        self.key = key
        self.queue = queue
        self.wake = wake
        self.block_s = block_s
        self.received = 0
        self.invalid = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="caption-intake", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Pop no more requests (the one ``BLPOP`` in progress may still deliver)."""
        self._stop.set()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            room = self.queue.space()
            if room <= 0:
                self.queue.wait_space(0.2)
                continue
            try:
                raws = self._pop(room)
            except Exception as exc:  # Redis hiccup: back off, then try again
                log.warning("caption intake: %s; retrying in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if not raws:
                continue
            requests = []
            for raw in raws:
                try:
                    requests.append(CaptionRequest.loads(raw))
                except ValueError as exc:
                    self.invalid += 1
                    log.warning("dropping an invalid caption request: %s", exc)
            if requests:
                self.received += len(requests)
                self.queue.put_many(requests)
                self.wake()

    def _pop(self, room: int) -> list[bytes]:
        item = self.client.blpop([self.key], timeout=self.block_s)
        if item is None:
            return []
        raws = [item[1]]
        if room > 1:
            more = self.client.lpop(self.key, room - 1)
            if more:
                raws.extend(more)
        return raws


class CaptionService:
    """Runs caption batches on the engine's compute path and hands answers to the publisher."""

    def __init__(
        self,
        model: TextModel,
        publisher: ResultPublisher,
        client: Any,
        key: str,
        wake_path: Path,
        *,
        device: torch.device,
        busy: BusyMeter | None = None,
        stream: Any = None,
        max_batch: int = MAX_CAPTION_BATCH,
        frame_share: int = FRAME_SHARE,
        capacity: int = MAX_PENDING,
    ) -> None:
        self.model = model
        self.publisher = publisher
        self.client = client
        self.key = key
        self.device = device
        self.busy = busy
        self.stream = stream
        self.max_batch = max(1, max_batch)
        self.frame_share = max(1, frame_share)
        self.queue = CaptionQueue(capacity)
        self._wake, self._close_waker = socket_waker(wake_path)
        self.intake = CaptionIntake(client, key, self.queue, self._wake)
        self._frames_mark = 0
        self._last_end = 0.0  # time.monotonic() when the last caption batch finished
        self._last_s = 0.0  # how long it took
        self.batches_done = 0
        self.answered = 0  # requests answered (with a caption, null, or an error)
        self.failed = 0  # requests answered with an error
        self.expired = 0  # requests dropped unanswered after their expiry
        self.requeued = 0  # requests handed back to Redis on a hard stop

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self.intake.start()

    def stop_intake(self) -> None:
        self.intake.stop()

    def idle(self) -> bool:
        """Nothing pending and the intake stopped (drained)."""
        return not self.intake.alive and len(self.queue) == 0

    def close(self) -> None:
        """Stop the intake and hand unanswered requests back to the head of the list."""
        self.intake.stop()
        self.intake.join(self.intake.block_s + 2.0)
        left = self.queue.take_all()
        if left:
            now = time.time()
            try:
                pipe = self.client.pipeline(transaction=False)
                pipe.lpush(self.key, *[r.dumps() for r in reversed(left)])
                ttl = max((r.expires_at for r in left), default=0.0) - now
                if ttl > 0:
                    pipe.expire(self.key, max(1, int(ttl)), nx=True)
                pipe.execute()
                self.requeued += len(left)
                log.info("handed %d unanswered caption requests back to Redis", len(left))
            except Exception:
                log.exception("could not hand %d caption requests back to Redis", len(left))
        self._close_waker()

    def warmup(self) -> float:
        """One caption through the model (kernels, allocator); returns seconds."""
        start = time.monotonic()
        with self._on_stream():
            self.model.generate([caption_prompt("Warm-up product", "A short description.")])
        return time.monotonic() - start

    # -- scheduling -----------------------------------------------------------------
    def pending(self) -> int:
        return len(self.queue)

    def due(self, frames_progressed: bool, frame_batches_done: int) -> bool:
        """Whether a caption batch should run now (see the module docstring)."""
        if not len(self.queue):
            return False
        if not frames_progressed:
            return True
        if frame_batches_done - self._frames_mark < self.frame_share:
            return False
        return time.monotonic() - self._last_end >= self.frame_share * self._last_s

    def run(self, frame_batches_done: int = 0) -> int:
        """Run one caption batch from the queue; returns the requests answered."""
        self._frames_mark = frame_batches_done
        requests, expired = self.queue.take(self.max_batch, time.time())
        if expired:
            self.expired += len(expired)
            log.info("dropped %d expired caption requests", len(expired))
        if not requests:
            return 0
        formed_at = time.time()
        t0 = time.monotonic()
        with self._on_stream():
            answers = self._generate(requests)
        t1 = time.monotonic()
        self._last_end, self._last_s = t1, t1 - t0
        if self.busy is not None:
            self.busy.add(t0, t1)
        self.batches_done += 1
        failed = sum(1 for _, err in answers if err)
        self.failed += failed
        self.answered += len(requests)
        labels = (self.model.name, "eager")
        m.BATCH_SIZE.labels(*labels).observe(len(requests))
        m.INFERENCE_SECONDS.labels(*labels).observe(t1 - t0)
        if len(requests) > failed:
            m.ITEMS_PROCESSED.labels(*labels).inc(len(requests) - failed)
        self.publisher.captions(
            [(req, text, err) for req, (text, err) in zip(requests, answers, strict=True)],
            model=self.model.name,
            trusted=bool(self.model.weights_loaded),
            batch_seq=self.batches_done,
            inference_s=t1 - t0,
            formed_at=formed_at,
        )
        return len(requests)

    # -- compute --------------------------------------------------------------------
    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        if self.stream is not None and self.device.type == "cuda":
            return torch.cuda.stream(self.stream)
        return contextlib.nullcontext()

    def _generate(self, requests: list[CaptionRequest]) -> list[tuple[str | None, str | None]]:
        """``(caption, error)`` per request; a failing request is isolated by bisection."""
        prompts = [caption_prompt(r.title, r.description) for r in requests]
        try:
            out = self.model.generate(prompts)
            if len(out) != len(prompts):
                raise RuntimeError(f"{len(out)} captions for {len(prompts)} prompts")
            return [(text, None) for text in out]
        except DeviceFailure:
            raise
        except Exception as exc:
            if is_fatal(exc, self.device):
                raise DeviceFailure(f"caption batch failed: {exc}") from exc
            if len(requests) == 1:
                log.warning(
                    "caption for job %s failed: %s: %s",
                    requests[0].job_id,
                    type(exc).__name__,
                    exc,
                )
                return [(None, f"caption failed: {type(exc).__name__}: {exc}")]
            half = len(requests) // 2
            return self._generate(requests[:half]) + self._generate(requests[half:])
