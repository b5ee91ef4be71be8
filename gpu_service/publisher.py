"""Publishing the daemon's results from a thread of its own, so the device never waits on Redis.

The engine hands each finished batch (host tensors, already off the device) to
:class:`ResultPublisher`. Its thread cuts every item's outputs to the item's own frame
count, encodes the message (:mod:`gpu_service.protocol`), pushes all messages of the batches
waiting at that moment through one Redis pipeline (``RPUSH`` + ``EXPIRE`` per job list),
and records the per-batch metrics. The launch thread only enqueues a reference. Caption
answers (:mod:`gpu_service.captions`) take the same way, one message per request.

The queue is bounded: if Redis stalls for longer than ``max_pending`` batches take, the
engine blocks on :meth:`ResultPublisher.submit` (backpressure, the arena fills, producers
wait) instead of piling results up in memory. A failed push is retried with backoff for
``retry_for_s`` seconds; after that the messages are dropped with an error log (the
workers time out on those chunks and retry the job).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from clipline_core import constants
from clipline_core import metrics as m
from gpu_service import protocol
from gpu_service.executor import Completed
from gpu_service.shm import Descriptor

log = logging.getLogger("clipline.gpu")


class ResultSink(Protocol):
    def publish(self, messages: Sequence[tuple[str, str]]) -> None:
        """Deliver ``(job_id, json_text)`` pairs (raise to have them retried)."""


class RedisResultSink:
    """Pushes each message onto its job's results list, one pipeline per call."""

    def __init__(self, client: Any, deployment: str, ttl_s: int) -> None:
        self.client = client
        self.deployment = deployment
        self.ttl_s = ttl_s

    def publish(self, messages: Sequence[tuple[str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for job_id, text in messages:
            key = constants.results_key(self.deployment, job_id)
            pipe.rpush(key, text)
            pipe.expire(key, self.ttl_s)
        pipe.execute()


class _Rejected:
    """Items answered with an error without running (invalid, or their batch could not start)."""

    def __init__(self, items: Sequence[tuple[Descriptor, str]], seq: int, at: float) -> None:
        self.items = list(items)
        self.seq = seq
        self.at = at


class _Captions:
    """Answers of one caption batch: ``(request, caption, error)`` each."""

    def __init__(
        self,
        answers: Sequence[tuple[protocol.CaptionRequest, str | None, str | None]],
        *,
        model: str,
        trusted: bool,
        batch_seq: int,
        inference_s: float,
        formed_at: float,
    ) -> None:
        self.answers = list(answers)
        self.model = model
        self.trusted = trusted
        self.batch_seq = batch_seq
        self.inference_s = inference_s
        self.formed_at = formed_at


_Entry = Completed | _Rejected | _Captions


class ResultPublisher:
    """A thread that encodes and publishes finished batches in order."""

    def __init__(
        self,
        sink: ResultSink,
        device: str,
        *,
        max_pending: int = 16,
        retry_for_s: float = 60.0,
    ) -> None:
        self.sink = sink
        self.device = device
        self.retry_for_s = retry_for_s
        self._queue: queue.Queue[_Entry | None] = queue.Queue(max_pending)
        self._cond = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self.published = 0  # messages delivered
        self.errors = 0  # messages that carried an error
        self.dropped = 0  # messages given up on

    # -- producer side (the engine) ---------------------------------------------
    def start(self) -> ResultPublisher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="result-publisher", daemon=True)
            self._thread.start()
        return self

    def submit(self, completed: Completed) -> None:
        self._put(completed)

    def reject(self, items: Sequence[tuple[Descriptor, str]], seq: int = 0) -> None:
        if items:
            self._put(_Rejected(items, seq, time.monotonic()))

    def captions(
        self,
        answers: Sequence[tuple[protocol.CaptionRequest, str | None, str | None]],
        *,
        model: str,
        trusted: bool,
        batch_seq: int,
        inference_s: float,
        formed_at: float,
    ) -> None:
        """Publish one caption batch's answers (``formed_at``: epoch seconds)."""
        if answers:
            self._put(
                _Captions(
                    answers,
                    model=model,
                    trusted=trusted,
                    batch_seq=batch_seq,
                    inference_s=inference_s,
                    formed_at=formed_at,
                )
            )

    def _put(self, entry: _Entry) -> None:
        with self._cond:
            self._pending += 1
        self._queue.put(entry)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything submitted so far is published (or dropped)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Publish what is queued, then stop the thread."""
        if self._thread is None:
            return
        self.flush(timeout_s)
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._thread = None

    # -- the thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            entries = [entry]
            stop = False
            while len(entries) < 64:  # coalesce what is already waiting into one pipeline
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                entries.append(more)
            messages: list[tuple[str, str]] = []
            for e in entries:
                try:
                    messages.extend(self._encode(e))
                except Exception:  # never lose the thread over one bad batch
                    log.exception("could not encode the results of a batch")
            self._deliver(messages)
            with self._cond:
                self._pending -= len(entries)
                self._cond.notify_all()
            if stop:
                return

    def _deliver(self, messages: list[tuple[str, str]]) -> None:
        if not messages:
            return
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.05
        while True:
            try:
                self.sink.publish(messages)
                self.published += len(messages)
                return
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    self.dropped += len(messages)
                    log.error("dropping %d results after Redis errors: %s", len(messages), exc)
                    return
                log.warning("publishing %d results failed (%s); retrying", len(messages), exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _encode(self, entry: _Entry) -> list[tuple[str, str]]:
        if isinstance(entry, _Rejected):
            return self._encode_rejected(entry)
        if isinstance(entry, _Captions):
            return self._encode_captions(entry)
        return self._encode_completed(entry)

    def _encode_captions(self, entry: _Captions) -> list[tuple[str, str]]:
        now = time.time()
        out = []
        for req, caption, error in entry.answers:
            msg = protocol.caption_message(
                request=req,
                caption=caption,
                model=entry.model,
                trusted=entry.trusted,
                device=self.device,
                queue_wait_s=max(0.0, entry.formed_at - req.requested_at),
                inference_s=entry.inference_s,
                latency_s=max(0.0, now - req.requested_at),
                batch=len(entry.answers),
                batch_seq=entry.batch_seq,
                error=error,
            )
            out.append((req.job_id, protocol.dumps(msg)))
            if error:
                self.errors += 1
        return out

    def _encode_rejected(self, entry: _Rejected) -> list[tuple[str, str]]:
        out = []
        for d, reason in entry.items:
            msg = protocol.result_message(
                job_id=d.job_id,
                generation=d.generation,
                chunk=d.chunk,
                kind=d.kind.name.lower(),
                frames=int(d.shape[0]) if d.shape else 0,
                outputs={},
                trusted={},
                backends={},
                device=self.device,
                queue_wait_s=max(0.0, entry.at - d.published_at),
                inference_s=0.0,
                latency_s=max(0.0, time.monotonic() - d.published_at),
                batch=0,
                batch_seq=entry.seq,
                error=reason,
            )
            out.append((d.job_id, protocol.dumps(msg)))
            self.errors += 1
        return out

    def _encode_completed(self, done: Completed) -> list[tuple[str, str]]:
        batch = done.batch
        trusted = {mdl.name: bool(mdl.trusted) for mdl in done.models}
        backends = {mdl.name: mdl.backend for mdl in done.models}
        now = time.monotonic()
        out = []
        ok = 0
        for seg in done.segments:
            host = {k: v.numpy() for k, v in seg.outputs.items()}
            for i in range(seg.lo, seg.hi):
                d = batch.items[i]
                t = int(d.shape[0])
                wait = max(0.0, batch.formed_at - d.published_at)
                m.ARENA_WAIT.observe(wait)
                msg = protocol.result_message(
                    job_id=d.job_id,
                    generation=d.generation,
                    chunk=d.chunk,
                    kind=d.kind.name.lower(),
                    frames=t,
                    outputs={} if seg.error else {k: v[i - seg.lo, :t] for k, v in host.items()},
                    trusted=trusted,
                    backends=backends,
                    device=self.device,
                    queue_wait_s=wait,
                    inference_s=done.device_s,
                    latency_s=max(0.0, now - d.published_at),
                    batch=len(batch),
                    batch_seq=batch.seq,
                    error=seg.error,
                )
                out.append((d.job_id, protocol.dumps(msg)))
                if seg.error:
                    self.errors += 1
                else:
                    ok += 1
        for mdl in done.models:
            labels = (mdl.name, mdl.backend)
            m.BATCH_SIZE.labels(*labels).observe(len(batch))
            m.INFERENCE_SECONDS.labels(*labels).observe(done.model_s.get(mdl.name, done.device_s))
            if ok:
                m.ITEMS_PROCESSED.labels(*labels).inc(ok)
        return out
