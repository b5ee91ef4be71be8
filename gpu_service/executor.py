"""Running a batch on the device: staging, the models, outputs back to the host, busy time.

An executor does the device half of the engine's ``execute``/``update`` in four calls,
so the engine can run two batches as a pipeline:

``stage(batch, arrays)``  copies the batch's uint8 frames from their arena slots into a
                          device staging buffer ``[B', T, H, W, 3]`` (rows of items with
                          fewer frames are padded by repeating their last frame);
``copied(staged)``        whether that copy has finished, so the slots can be released;
``launch(staged, models)`` runs every model on the staged frames and queues the
                          outputs' copy back to the host;
``complete(launched)``    waits for the batch, records its device time, returns host
                          outputs.

:class:`CudaExecutor`: the arena's data region is page-locked once
(``cudaHostRegister``), so copies are asynchronous DMA straight from the slots on a
dedicated *copy stream*, into a ring of preallocated device buffers. A copy event tells
when the slots may be released (long before the batch's compute finishes). The models
run on a *compute stream* that waits on that event, so batch N+1's copy overlaps batch
N's compute. Outputs go to pinned host memory on the compute stream; a blocking event
marks the batch done (the launch thread sleeps instead of spinning). Device time comes
from CUDA events on the compute stream, mapped onto the host's monotonic clock through
an anchor event that is re-taken every minute.

:class:`CpuExecutor`: the same calls, synchronous: the copy into the (reused) staging
buffer is done when ``stage`` returns, so slots are released before the models run;
device time is the wall time of the forward passes.

Batch buckets: a model with ``batch_buckets`` gets ``B`` padded up to its bucket (the
extra rows hold earlier frames and their outputs are dropped) on CUDA, and on the CPU
for the static-shape backends; a batch whose model raises is bisected so that a bad
item is answered with the error and the others still get results. An error that leaves
the device unusable (a CUDA fault) raises :class:`DeviceFailure`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gpu_service.backends import bucket_for
from gpu_service.batcher import Batch, BatchPolicy
from gpu_service.models.base import Model

log = logging.getLogger("clipline.gpu")

#: backends whose compiled artefacts depend on the batch size (pad to buckets even on CPU)
STATIC_SHAPE_BACKENDS = frozenset({"compile", "cudagraphs", "tensorrt"})
#: how often the CUDA clock anchor is re-taken (GPU and host clocks drift slowly)
ANCHOR_EVERY_S = 60.0


class DeviceFailure(RuntimeError):
    """The device is unusable after an error (e.g. a CUDA fault); the daemon must exit."""


def pads_batch(model: Model, device: torch.device) -> bool:
    """Whether ``model`` gets batches padded up to one of its ``batch_buckets``."""
    if not model.batch_buckets:
        return False
    return device.type == "cuda" or model.backend in STATIC_SHAPE_BACKENDS


def is_fatal(exc: BaseException, device: torch.device) -> bool:
    """True for errors after which the CUDA context cannot be trusted."""
    if device.type != "cuda" or isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    text = str(exc)
    return "CUDA error" in text or "device-side assert" in text or "illegal memory" in text


# ---------------------------------------------------------------------------
# Busy accounting.
# ---------------------------------------------------------------------------
class BusyMeter:
    """How much wall time the device spent executing work.

    Spans are ``time.monotonic()`` intervals during which the device executed a batch
    (CUDA events on the compute stream on a GPU, forward-pass wall time on the CPU);
    they never overlap (a later span is clipped to start after the previous one).
    :meth:`ratio` is the busy fraction of the last ``window_s`` seconds, :meth:`total`
    the cumulative busy seconds (its rate is the busy ratio over any interval).
    """

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._spans: deque[tuple[float, float]] = deque()
        self._total = 0.0
        self._last_end = float("-inf")
        self._open: float | None = None
        self._origin = time.monotonic()

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self._add(start, end)

    def _add(self, start: float, end: float) -> None:
        start = max(start, self._last_end)
        if end <= start:
            return
        self._spans.append((start, end))
        self._total += end - start
        self._last_end = end
        horizon = end - self.window_s
        while self._spans and self._spans[0][1] < horizon:
            self._spans.popleft()

    def begin(self, t: float) -> None:
        """A span starts now (its end is :meth:`end`); counted while it runs."""
        with self._lock:
            self._open = t

    def end(self, t: float) -> None:
        with self._lock:
            start, self._open = self._open, None
            if start is not None:
                self._add(start, t)

    def total(self, now: float | None = None) -> float:
        """Busy seconds since the meter started (or was reset), the running span included."""
        now = time.monotonic() if now is None else now
        with self._lock:
            running = max(0.0, now - max(self._open, self._last_end)) if self._open else 0.0
            return self._total + running

    def ratio(self, now: float | None = None) -> float:
        """Busy fraction of the last ``window_s`` seconds (of less right after start)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            lo = max(now - self.window_s, self._origin)
            wall = now - lo
            if wall <= 0:
                return 0.0
            busy = sum(max(0.0, min(e, now) - max(s, lo)) for s, e in self._spans)
            if self._open is not None:
                busy += max(0.0, now - max(self._open, self._last_end, lo))
            return min(1.0, busy / wall)

    def reset(self, now: float | None = None) -> None:
        """Forget everything (e.g. after the warm-up)."""
        with self._lock:
            self._spans.clear()
            self._total = 0.0
            self._last_end = float("-inf")
            self._open = None
            self._origin = time.monotonic() if now is None else now


# ---------------------------------------------------------------------------
# What moves between the calls.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Segment:
    """Outputs of items ``lo..hi-1`` of a batch (``[hi - lo, T, ...]`` each), or an error."""

    lo: int
    hi: int
    outputs: dict[str, torch.Tensor]
    error: str | None = None


@dataclasses.dataclass
class Staged:
    batch: Batch
    frames: torch.Tensor  # [rows >= B, T, H, W, C] uint8 on the device
    event: Any = None  # CUDA: copy finished
    pool: int = 0


@dataclasses.dataclass
class Launched:
    staged: Staged
    models: list[Model]
    segments: list[Segment]
    released: bool = False
    #: per model, the marker taken right after it ran (float time or CUDA event)
    marks: list[tuple[Model, Any]] = dataclasses.field(default_factory=list)
    start: Any = None
    end: Any = None
    done: Any = None

    @property
    def batch(self) -> Batch:
        return self.staged.batch


@dataclasses.dataclass
class Completed:
    """A finished batch: host outputs per segment and its device time."""

    batch: Batch
    models: list[Model]
    segments: list[Segment]
    device_s: float
    model_s: dict[str, float]
    completed_at: float
    #: monotonic times: when the batch's input copy finished, and its compute span
    copy_end: float = 0.0
    span: tuple[float, float] = (0.0, 0.0)


# ---------------------------------------------------------------------------
# Executors.
# ---------------------------------------------------------------------------
class Executor:
    """Shared parts: staging buffer geometry, padding, the models with bisection."""

    def __init__(
        self,
        device: torch.device,
        models: Sequence[Model],
        policy: BatchPolicy,
        row_bytes: int,
        busy: BusyMeter,
    ) -> None:
        self.device = device
        self.busy = busy
        rows = policy.max_batch
        for mdl in models:
            if pads_batch(mdl, device):
                rows = max(rows, bucket_for(policy.max_batch, mdl.batch_buckets))
        #: rows (items) one staging buffer holds; one row holds one arena slot's bytes
        self.rows = rows
        self.row_bytes = row_bytes
        self.pool_bytes = rows * row_bytes

    # -- staging helpers --------------------------------------------------------
    def _rows_for(self, n: int, models: Sequence[Model]) -> int:
        rows = n
        for mdl in models:
            if pads_batch(mdl, self.device):
                rows = max(rows, bucket_for(n, mdl.batch_buckets))
        return min(max(rows, n), self.rows)

    def _view(self, pool: torch.Tensor, batch: Batch, rows: int) -> torch.Tensor:
        h, w, c = batch.geometry
        per_row = batch.frames * h * w * c
        if per_row > self.row_bytes or len(batch) > self.rows:
            raise ValueError(
                f"a batch of {len(batch)} x {batch.frames} frames of {h}x{w}x{c} does not "
                f"fit the staging buffer ({self.rows} rows of {self.row_bytes} bytes)"
            )
        return pool[: rows * per_row].view(rows, batch.frames, h, w, c)

    @staticmethod
    def _fill(view: torch.Tensor, i: int, src: torch.Tensor, non_blocking: bool) -> None:
        t = int(src.shape[0])
        view[i, :t].copy_(src, non_blocking=non_blocking)
        total = int(view.shape[1])
        if t < total:
            view[i, t:].copy_(view[i, t - 1 : t].expand(total - t, *view.shape[2:]))

    # -- the models -------------------------------------------------------------
    def _run_models(
        self,
        frames: torch.Tensor,
        batch: Batch,
        models: Sequence[Model],
        mark: Callable[[Model], None],
    ) -> list[Segment]:
        """Run every model on rows ``0..n-1``; bisect on errors; return the segments.

        A batch-aware model (``batch_aware``) is told the kind and the items of the rows
        it is about to get (:meth:`Model.bind`) before each call.
        """
        n = len(batch)

        def attempt(lo: int, hi: int, top: bool) -> list[Segment]:
            size = hi - lo
            outs: dict[str, torch.Tensor] = {}
            current = ""
            try:
                for mdl in models:
                    current = mdl.name
                    x = frames[lo:hi]
                    if top and pads_batch(mdl, self.device):
                        padded = bucket_for(size, mdl.batch_buckets)
                        if padded > size and lo + padded <= int(frames.shape[0]):
                            x = frames[lo : lo + padded]
                    if mdl.batch_aware:
                        mdl.bind(batch.kind, batch.items[lo:hi])
                    result = mdl(x)
                    for key, value in result.items():
                        if value.dim() < 2 or int(value.shape[0]) < size:
                            raise ValueError(
                                f"output {key!r} has shape {list(value.shape)}, "
                                f"expected [{size}, T, ...]"
                            )
                        name = mdl.outputs[key] if mdl.outputs else f"{mdl.name}.{key}"
                        outs[name] = value[:size]
                    if top:
                        mark(mdl)
            except Exception as exc:
                if is_fatal(exc, self.device):
                    raise DeviceFailure(f"{current}: {type(exc).__name__}: {exc}") from exc
                if top:
                    log.warning(
                        "batch of %d failed in model %s (%s: %s); isolating the failing items",
                        size,
                        current,
                        type(exc).__name__,
                        exc,
                    )
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                if size == 1:
                    return [Segment(lo, hi, {}, error=f"{current}: {type(exc).__name__}: {exc}")]
                mid = lo + size // 2
                return attempt(lo, mid, False) + attempt(mid, hi, False)
            return [Segment(lo, hi, outs)]

        return attempt(0, n, True)

    # -- the interface ------------------------------------------------------------
    def stage(self, batch: Batch, arrays: Sequence[np.ndarray], models: Sequence[Model]) -> Staged:
        raise NotImplementedError

    def copied(self, staged: Staged) -> bool:
        raise NotImplementedError

    def wait_copied(self, staged: Staged) -> None:
        raise NotImplementedError

    def launch(self, staged: Staged, models: Sequence[Model]) -> Launched:
        raise NotImplementedError

    def complete(self, launched: Launched) -> Completed:
        raise NotImplementedError

    def close(self) -> None:
        return None


class CpuExecutor(Executor):
    """Synchronous execution on the CPU, one reused staging buffer."""

    def __init__(
        self,
        device: torch.device,
        models: Sequence[Model],
        policy: BatchPolicy,
        row_bytes: int,
        busy: BusyMeter,
    ) -> None:
        super().__init__(device, models, policy, row_bytes, busy)
        self.pool = torch.zeros(self.pool_bytes, dtype=torch.uint8)

    def stage(self, batch: Batch, arrays: Sequence[np.ndarray], models: Sequence[Model]) -> Staged:
        view = self._view(self.pool, batch, self._rows_for(len(batch), models))
        host = view.numpy()
        for i, arr in enumerate(arrays):
            # numpy, not Tensor.copy_: one thread, no OpenMP barrier (on a busy machine a
            # parallel copy waits for a descheduled worker thread at every batch).
            t = int(arr.shape[0])
            np.copyto(host[i, :t], arr)
            if t < host.shape[1]:
                host[i, t:] = host[i, t - 1]
        return Staged(batch=batch, frames=view)

    def copied(self, staged: Staged) -> bool:
        return True

    def wait_copied(self, staged: Staged) -> None:
        return None

    def launch(self, staged: Staged, models: Sequence[Model]) -> Launched:
        marks: list[tuple[Model, Any]] = []
        start = time.monotonic()
        self.busy.begin(start)
        try:
            with torch.inference_mode():
                segments = self._run_models(
                    staged.frames,
                    staged.batch,
                    models,
                    lambda mdl: marks.append((mdl, time.monotonic())),
                )
        finally:
            end = time.monotonic()
            self.busy.end(end)
        for seg in segments:
            seg.outputs = {k: v.detach().float() for k, v in seg.outputs.items()}
        return Launched(staged, list(models), segments, marks=marks, start=start, end=end)

    def complete(self, launched: Launched) -> Completed:
        model_s: dict[str, float] = {}
        if len(launched.marks) == len(launched.models):
            prev = launched.start
            for mdl, t in launched.marks:
                model_s[mdl.name] = t - prev
                prev = t
        return Completed(
            batch=launched.batch,
            models=launched.models,
            segments=launched.segments,
            device_s=float(launched.end - launched.start),
            model_s=model_s,
            completed_at=time.monotonic(),
            copy_end=float(launched.start),
            span=(float(launched.start), float(launched.end)),
        )


class CudaExecutor(Executor):
    """Copy stream + compute stream, registered arena, a ring of device staging buffers."""

    def __init__(
        self,
        device: torch.device,
        models: Sequence[Model],
        policy: BatchPolicy,
        row_bytes: int,
        busy: BusyMeter,
        *,
        depth: int = 2,
        host_region: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(device, models, policy, row_bytes, busy)
        with torch.cuda.device(device):
            self.copy_stream = torch.cuda.Stream(device)
            self.compute_stream = torch.cuda.Stream(device)
            self.clock_stream = torch.cuda.Stream(device)
            # One buffer per batch in flight, plus one being filled.
            self.pools = [
                torch.zeros(self.pool_bytes, dtype=torch.uint8, device=device)
                for _ in range(depth + 1)
            ]
        self._pool_free: list[Any] = [None] * len(self.pools)
        self._next_pool = 0
        self._registered: int | None = None
        self.registered = False
        if host_region is not None:
            self._register(*host_region)
        self._anchor_event: Any = None
        self._anchor_wall = 0.0
        self._previous: tuple[Any, float] = (None, 0.0)
        self._anchor()

    # -- page-locking the arena --------------------------------------------------
    def _register(self, addr: int, length: int) -> None:
        """Page-lock the arena's data region once, so copies from slots are async DMA."""
        err = torch.cuda.cudart().cudaHostRegister(addr, length, 0)
        code = int(err.value) if hasattr(err, "value") else int(err)
        if code == 0:
            self._registered = addr
            self.registered = True
            log.info("arena data region page-locked for DMA (%d MiB)", length >> 20)
        else:
            log.warning(
                "cudaHostRegister of the arena failed (error %d): host-to-device copies "
                "will be staged by the driver (slower)",
                code,
            )

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        if self._registered is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = None

    # -- clocks -------------------------------------------------------------------
    def _anchor(self) -> None:
        """Record an event on an idle stream and note the host time it completed."""
        self._previous = (self._anchor_event, self._anchor_wall)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.clock_stream)
        ev.synchronize()
        self._anchor_wall = time.monotonic()
        self._anchor_event = ev

    def _wall(self, ev: Any) -> float:
        """Host monotonic time of a completed timing event (may precede the anchor)."""
        try:
            return self._anchor_wall + float(self._anchor_event.elapsed_time(ev)) / 1000.0
        except RuntimeError:  # an event recorded before the newest anchor, on some drivers
            event, wall = self._previous
            if event is None:
                raise
            return wall + float(event.elapsed_time(ev)) / 1000.0

    # -- the interface ------------------------------------------------------------
    def stage(self, batch: Batch, arrays: Sequence[np.ndarray], models: Sequence[Model]) -> Staged:
        k = self._next_pool
        self._next_pool = (k + 1) % len(self.pools)
        with torch.cuda.stream(self.copy_stream):
            if self._pool_free[k] is not None:
                # Do not overwrite a buffer a queued batch still reads.
                self.copy_stream.wait_event(self._pool_free[k])
            view = self._view(self.pools[k], batch, self._rows_for(len(batch), models))
            for i, arr in enumerate(arrays):
                self._fill(view, i, torch.from_numpy(arr), non_blocking=True)
            event = torch.cuda.Event(enable_timing=True, blocking=True)
            event.record(self.copy_stream)
        return Staged(batch=batch, frames=view, event=event, pool=k)

    def copied(self, staged: Staged) -> bool:
        return bool(staged.event.query())

    def wait_copied(self, staged: Staged) -> None:
        self._sync(staged.event)

    def _sync(self, event: Any) -> None:
        """Wait for ``event``; an asynchronous CUDA error surfacing here is fatal."""
        try:
            event.synchronize()
        except Exception as exc:
            if is_fatal(exc, self.device):
                raise DeviceFailure(f"{type(exc).__name__}: {exc}") from exc
            raise

    def launch(self, staged: Staged, models: Sequence[Model]) -> Launched:
        cs = self.compute_stream
        cs.wait_event(staged.event)
        marks: list[tuple[Model, Any]] = []

        def mark(mdl: Model) -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(cs)
            marks.append((mdl, ev))

        with torch.cuda.stream(cs), torch.inference_mode():
            start = torch.cuda.Event(enable_timing=True)
            start.record(cs)
            segments = self._run_models(staged.frames, staged.batch, models, mark)
            end = torch.cuda.Event(enable_timing=True)
            end.record(cs)
            for seg in segments:
                host: dict[str, torch.Tensor] = {}
                for key, value in seg.outputs.items():
                    buf = torch.empty(value.shape, dtype=torch.float32, pin_memory=True)
                    buf.copy_(value, non_blocking=True)
                    host[key] = buf
                seg.outputs = host
            done = torch.cuda.Event(blocking=True)
            done.record(cs)
        self._pool_free[staged.pool] = done
        return Launched(
            staged, list(models), segments, marks=marks, start=start, end=end, done=done
        )

    def complete(self, launched: Launched) -> Completed:
        self._sync(launched.done)
        now = time.monotonic()
        start, end = launched.start, launched.end
        span = (self._wall(start), self._wall(end))
        copy_end = self._wall(launched.staged.event)
        self.busy.add(*span)
        if now - self._anchor_wall > ANCHOR_EVERY_S:
            self._anchor()
        model_s: dict[str, float] = {}
        if len(launched.marks) == len(launched.models):
            prev = start
            for mdl, ev in launched.marks:
                model_s[mdl.name] = float(prev.elapsed_time(ev)) / 1000.0
                prev = ev
        return Completed(
            batch=launched.batch,
            models=launched.models,
            segments=launched.segments,
            device_s=float(start.elapsed_time(end)) / 1000.0,
            model_s=model_s,
            completed_at=now,
            copy_end=copy_end,
            span=span,
        )


def make_executor(
    device: torch.device,
    models: Sequence[Model],
    policy: BatchPolicy,
    row_bytes: int,
    busy: BusyMeter,
    *,
    depth: int = 2,
    host_region: tuple[int, int] | None = None,
) -> Executor:
    """The executor for ``device`` (``host_region``: the arena's data, page-locked on CUDA)."""
    if device.type == "cuda":
        return CudaExecutor(
            device, models, policy, row_bytes, busy, depth=depth, host_region=host_region
        )
    return CpuExecutor(device, models, policy, row_bytes, busy)
