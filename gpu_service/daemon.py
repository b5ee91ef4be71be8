"""The GPU inference daemon: the one process per GPU that owns the device.

The core is an :class:`Engine` in the ``schedule() -> execute(batch) -> update(outputs)``
style:

``schedule``  looks at the READY descriptors in the shared-memory arena (best first by
              priority class, request arrival, chunk) and forms a dynamic batch: up to
              ``max_batch_size`` items of one kind and frame geometry, released early
              once the oldest item has waited ``max_queue_delay_ms``.
``execute``   moves the batch's uint8 frames to the device and runs every model on it.
              On CUDA the host-to-device copy runs on a dedicated copy stream straight
              from the page-locked arena (registered once with cudaHostRegister) and the
              models run on a compute stream that waits on the copy's event, so the next
              batch's copy overlaps the current batch's compute. On CPU the models read
              the slots in place.
``update``    releases the batch's slots (on CUDA only after the copy event completed)
              and publishes one result per item to Redis, keyed by job and chunk.

:func:`serve` is the thin I/O wrapper: wake-ups from producers, heartbeats to Redis,
the metrics/health endpoint, and signals. SIGTERM flips the engine into draining: it
stops waiting for more work, finishes every item already in the arena, then unlinks
the arena and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from clipline import constants
from clipline import metrics as m
from clipline.config import Settings
from gpu_service import models as registry
from gpu_service.models.base import BuildContext, Model
from gpu_service.shm import ArenaLayout, ChunkKind, Consumer, Descriptor
from gpu_service.wire import encode_array

log = logging.getLogger("clipline.gpu")


# ---------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class ItemResult:
    desc: Descriptor
    outputs: dict[str, np.ndarray]
    trusted: dict[str, bool]
    queue_wait_s: float
    inference_s: float
    error: str | None = None

    def to_message(self, device: str) -> dict[str, Any]:
        return {
            "error": self.error,
            "job_id": self.desc.job_id,
            "attempt": self.desc.attempt,
            "chunk": self.desc.chunk,
            "kind": self.desc.kind.name.lower(),
            "frames": int(self.desc.shape[0]),
            "outputs": {k: encode_array(v) for k, v in self.outputs.items()},
            "trusted": self.trusted,
            "device": device,
            "queue_wait_s": self.queue_wait_s,
            "inference_s": self.inference_s,
        }


class ResultSink(Protocol):
    def publish(self, results: Sequence[ItemResult]) -> None: ...


class RedisResultSink:
    """Pushes each item's result onto the job's results list (one pipeline per batch)."""

    def __init__(self, client: Any, deployment: str, device: str, ttl_s: int) -> None:
        self.client = client
        self.deployment = deployment
        self.device = device
        self.ttl_s = ttl_s

    def publish(self, results: Sequence[ItemResult]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for r in results:
            key = constants.results_key(self.deployment, r.desc.job_id)
            pipe.rpush(key, json.dumps(r.to_message(self.device)))
            pipe.expire(key, self.ttl_s)
        pipe.execute()


# ---------------------------------------------------------------------------
# Device busy accounting.
# ---------------------------------------------------------------------------
class BusyMeter:
    """Fraction of wall time the device executed work over a sliding window."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._spans: deque[tuple[float, float]] = deque()
        self._started = time.monotonic()

    def add(self, start: float, end: float) -> None:
        self._spans.append((start, end))

    def ratio(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        lo = max(now - self.window_s, self._started)
        while self._spans and self._spans[0][1] < lo:
            self._spans.popleft()
        busy = sum(max(0.0, min(e, now) - max(s, lo)) for s, e in self._spans)
        wall = now - lo
        return min(1.0, busy / wall) if wall > 0 else 0.0


# ---------------------------------------------------------------------------
# The engine.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Batch:
    items: list[Descriptor]
    kind: ChunkKind
    frames: int  # padded T
    taken_at: float

    def __len__(self) -> int:
        return len(self.items)


@dataclasses.dataclass
class Executed:
    batch: Batch
    outputs: list[dict[str, np.ndarray]]
    inference_s: float
    copy_done: Callable[[], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


class Engine:
    """Batches descriptors from the arena and runs the models on them."""

    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        models: Sequence[Model],
        sink: ResultSink,
        device: torch.device,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.models = list(models)
        self.sink = sink
        self.device = device
        self.max_batch = max(1, settings.max_batch_size)
        self.max_delay_s = settings.max_queue_delay_ms / 1000.0
        self.busy = BusyMeter()
        self.items_done = 0
        self.batches_done = 0
        self.draining = False
        self._cuda = device.type == "cuda"
        if self._cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.compute_stream = torch.cuda.Stream(device)
            self._register_arena()

    # -- CUDA helpers ----------------------------------------------------------
    def _register_arena(self) -> None:
        """Page-lock the arena once so H2D copies are async DMA from the slots."""
        addr, length = self.consumer.arena.base_address()
        err = torch.cuda.cudart().cudaHostRegister(addr, length, 0)
        code = int(err.value) if hasattr(err, "value") else int(err)
        self._registered = addr if code == 0 else None
        if code != 0:
            log.warning("cudaHostRegister failed (%s): copies will be synchronous", code)

    def _unregister_arena(self) -> None:
        if self._cuda and getattr(self, "_registered", None):
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = None

    # -- schedule ----------------------------------------------------------------
    def schedule(self, *, force: bool = False) -> Batch | None:
        """Form the next batch, or None if it is better to wait for more items."""
        ready = self.consumer.peek_ready()
        if not ready:
            return None
        now = time.monotonic()
        oldest = min(d.published_at for d in ready)
        if not force and len(ready) < self.max_batch and now - oldest < self.max_delay_s:
            return None
        head = ready[0]
        geometry = head.shape[1:]
        chosen = [d for d in ready if d.kind == head.kind and d.shape[1:] == geometry]
        taken = self.consumer.take(chosen[: self.max_batch])
        if not taken:
            return None
        frames = max(d.shape[0] for d in taken)
        return Batch(items=taken, kind=head.kind, frames=frames, taken_at=now)

    def time_to_deadline(self) -> float:
        """Seconds until the oldest READY item's delay bound expires (0 if due)."""
        ready = self.consumer.peek_ready()
        if not ready:
            return self.max_delay_s
        oldest = min(d.published_at for d in ready)
        return max(0.0, oldest + self.max_delay_s - time.monotonic())

    # -- execute -------------------------------------------------------------------
    def _models_for(self, kind: ChunkKind) -> list[Model]:
        if kind == ChunkKind.FRAMES:
            return self.models
        return [mdl for mdl in self.models if not mdl.temporal]

    def _gather(self, batch: Batch) -> tuple[torch.Tensor, Callable[[], None]]:
        """The batch's frames as one uint8 ``[B, T, H, W, C]`` tensor on the device."""
        views = [torch.from_numpy(self.consumer.array(d)) for d in batch.items]
        shape = (len(views), batch.frames, *views[0].shape[1:])
        if not self._cuda:
            if all(v.shape[0] == batch.frames for v in views):
                return torch.stack(views), lambda: None
            out = torch.zeros(shape, dtype=torch.uint8)
            for i, v in enumerate(views):
                out[i, : v.shape[0]] = v
            return out, lambda: None
        with torch.cuda.stream(self.copy_stream):
            out = torch.zeros(shape, dtype=torch.uint8, device=self.device)
            for i, v in enumerate(views):
                out[i, : v.shape[0]].copy_(v, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.compute_stream.wait_event(event)
        out.record_stream(self.compute_stream)
        return out, event.synchronize

    def execute(self, batch: Batch) -> Executed:
        frames, copy_done = self._gather(batch)
        outputs: list[dict[str, np.ndarray]] = [{} for _ in batch.items]
        start = time.monotonic()
        if self._cuda:
            ev0 = torch.cuda.Event(enable_timing=True)
            ev1 = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.compute_stream):
                ev0.record()
                per_model = [(mdl, mdl(frames)) for mdl in self._models_for(batch.kind)]
                ev1.record()
            ev1.synchronize()
            device_s = ev0.elapsed_time(ev1) / 1000.0
            end = time.monotonic()
            self.busy.add(end - device_s, end)
        else:
            with torch.inference_mode():
                per_model = [(mdl, mdl(frames)) for mdl in self._models_for(batch.kind)]
            end = time.monotonic()
            self.busy.add(start, end)
        elapsed = end - start
        for mdl, out in per_model:
            m.INFERENCE_SECONDS.labels(mdl.name, mdl.backend).observe(elapsed)
            m.BATCH_SIZE.labels(mdl.name, mdl.backend).observe(len(batch))
            m.ITEMS_PROCESSED.labels(mdl.name, mdl.backend).inc(len(batch))
            host = {k: v.detach().float().cpu().numpy() for k, v in out.items()}
            for i, d in enumerate(batch.items):
                t = d.shape[0]
                for k, v in host.items():
                    outputs[i][f"{mdl.name}.{k}"] = v[i, :t]
        return Executed(batch=batch, outputs=outputs, inference_s=elapsed, copy_done=copy_done)

    # -- update ----------------------------------------------------------------------
    def update(self, done: Executed) -> list[ItemResult]:
        done.copy_done()
        trusted = {mdl.name: mdl.trusted for mdl in self._models_for(done.batch.kind)}
        results = []
        for d, out in zip(done.batch.items, done.outputs, strict=True):
            self.consumer.release(d)
            wait = max(0.0, done.batch.taken_at - d.published_at)
            m.QUEUE_WAIT.observe(wait)
            results.append(
                ItemResult(
                    desc=d,
                    outputs=out,
                    trusted=trusted,
                    queue_wait_s=wait,
                    inference_s=done.inference_s,
                )
            )
        self.sink.publish(results)
        self.items_done += len(results)
        self.batches_done += 1
        return results

    def step(self, *, force: bool = False) -> int:
        """One schedule/execute/update round; returns the number of items processed."""
        batch = self.schedule(force=force)
        if batch is None:
            return 0
        try:
            executed = self.execute(batch)
        except Exception as exc:
            # A batch that cannot run must not wedge the queue: answer every item
            # with the error so its job fails with a reason, and free the slots.
            log.exception("batch of %d items failed", len(batch))
            if self._cuda:
                torch.cuda.synchronize(self.device)
            failed = []
            for d in batch.items:
                self.consumer.release(d)
                failed.append(ItemResult(d, {}, {}, 0.0, 0.0, error=f"{type(exc).__name__}: {exc}"))
            self.sink.publish(failed)
            return len(failed)
        return len(self.update(executed))

    def close(self) -> None:
        self._unregister_arena()


# ---------------------------------------------------------------------------
# The I/O wrapper.
# ---------------------------------------------------------------------------
def build_models(settings: Settings, device: torch.device) -> list[Model]:
    ctx = BuildContext(settings=settings, device=device)
    names = [n.strip() for n in settings.models.split(",") if n.strip()]
    if "features" not in names:
        names.insert(0, "features")
    return [registry.build(n, ctx) for n in names]


def layout_from(settings: Settings) -> ArenaLayout:
    return ArenaLayout(
        n_slots=settings.shm_slots,
        slot_bytes=settings.shm_slot_bytes,
        frames_per_chunk=settings.frames_per_chunk,
        frame_height=settings.frame_size,
        frame_width=settings.frame_size,
    )


class Daemon:
    """Runs an Engine until told to stop; owns signals, heartbeats and metrics I/O."""

    def __init__(self, settings: Settings, redis_client: Any | None = None) -> None:
        import redis

        self.settings = settings
        self.device = resolve_device(settings.device)
        threads = settings.torch_threads or min(4, os.cpu_count() or 1)
        torch.set_num_threads(threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.redis = redis_client or redis.Redis.from_url(settings.redis_url)
        self.models = build_models(settings, self.device)
        self.consumer = Consumer(
            settings.arena_path,
            settings.socket_path,
            layout_from(settings),
            settings.deployment,
            starvation_age_s=settings.shm_starvation_age_s,
        )
        if self.consumer.arena.recovered:
            log.info(
                "recovered %d in-flight slots from a previous daemon", self.consumer.arena.recovered
            )
        sink = RedisResultSink(
            self.redis, settings.deployment, self.device.type, settings.result_ttl_s
        )
        self.engine = Engine(settings, self.consumer, self.models, sink, self.device)
        self.stop = threading.Event()
        self._hb_key = constants.daemon_heartbeat_key(settings.deployment, settings.node_name)
        self._http: Any = None
        self._nvml: Any = None

    def ready(self) -> bool:
        return not self.stop.is_set()

    def request_drain(self, *_: object) -> None:
        if not self.engine.draining:
            log.info("draining: finishing the work in the arena, then exiting")
        self.engine.draining = True

    def _heartbeat(self) -> None:
        info: dict[Any, Any] = {
            "pid": os.getpid(),
            "device": str(self.device),
            "models": ",".join(f"{x.name}:{x.backend}:{int(x.trusted)}" for x in self.models),
            "arena": str(self.settings.arena_path),
            "host": socket.gethostname(),
            "items": self.engine.items_done,
            "draining": int(self.engine.draining),
        }
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self._hb_key, mapping=info)
        pipe.expire(self._hb_key, 15)
        pipe.execute()

    def _update_gauges(self) -> None:
        node = self.settings.node_name
        m.DEVICE_BUSY.labels(node).set(self.engine.busy.ratio())
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                util = self._nvml[0].nvmlDeviceGetUtilizationRates(self._nvml[1])
                m.GPU_UTILIZATION.labels(node).set(util.gpu / 100.0)

    def _init_nvml(self) -> None:
        if self.device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = (
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            )
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
        except Exception as exc:  # NVML is optional (e.g. missing driver library)
            log.warning(
                "NVML unavailable, %s not exported: %s", constants.Metric.GPU_UTILIZATION_RATIO, exc
            )

    def run(self) -> None:
        from clipline import httpserve

        if self.settings.daemon_metrics_port:
            self._http = httpserve.serve(self.settings.daemon_metrics_port, self.ready)
        self._init_nvml()
        log.info(
            "GPU daemon ready: device=%s models=%s arena=%s (%d slots x %d B)",
            self.device,
            ",".join(
                f"{x.name}[{x.backend}{'' if x.trusted else ', untrusted'}]" for x in self.models
            ),
            self.settings.arena_path,
            self.consumer.arena.layout.n_slots,
            self.consumer.arena.layout.slot_stride,
        )
        last_periodic = 0.0
        engine = self.engine
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now - last_periodic >= 1.0:
                    last_periodic = now
                    self.consumer.reclaim_dead()
                    self._update_gauges()
                    with contextlib.suppress(Exception):
                        self._heartbeat()
                processed = engine.step(force=engine.draining)
                if processed:
                    continue
                if engine.draining:
                    if self.consumer.ready_count() == 0:
                        break
                    continue
                pending = self.consumer.ready_count()
                timeout = engine.time_to_deadline() if pending else 0.25
                self.consumer.wait(timeout)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            self.redis.delete(self._hb_key)
        self.engine.close()
        self.consumer.close(unlink=True)
        if self._http is not None:
            self._http.shutdown()
        log.info("GPU daemon stopped after %d items", self.engine.items_done)


def main(settings: Settings | None = None) -> int:
    settings = settings or Settings.from_env()
    logging.basicConfig(
        level=os.environ.get("CLIPLINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    daemon = Daemon(settings)
    signal.signal(signal.SIGTERM, daemon.request_drain)
    signal.signal(signal.SIGINT, daemon.request_drain)
    daemon.run()
    return 0
