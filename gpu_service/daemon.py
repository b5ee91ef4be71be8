"""The GPU inference daemon: the one process per GPU that owns the device.

The work is done by :class:`gpu_service.engine.Engine` (``schedule() -> execute(batch)
-> update(launched)``, see there), with :mod:`gpu_service.batcher` (dynamic batching),
:mod:`gpu_service.executor` (copy/compute streams, busy time) and
:mod:`gpu_service.publisher` (results to Redis from a thread of its own). This module is
the thin I/O wrapper around them:

* start-up: bound ``torch`` threads, ``cudnn.benchmark`` on CUDA, build the configured
  models (``Settings.models``; ``features`` always runs; text models such as
  ``copywriter`` are built apart, see below) with the configured backend
  (``Settings.backend``, per model ``Settings.model_backends`` = ``name=backend,...``
  when the deployment defines it; each model's backend falls back along the chain and
  logs what it chose), create the shared-memory arena, warm the models up (every batch
  bucket on CUDA), then announce readiness;
* captions: when ``copywriter`` is among ``Settings.models`` and has real weights, a
  :class:`~gpu_service.captions.CaptionService` pops caption requests from Redis (its
  own intake thread) and the engine runs them between frame batches
  (:mod:`gpu_service.captions`); without weights the model is listed as untrusted in
  the heartbeat and no request is taken;
* the main thread runs the engine loop; a housekeeping thread refreshes the Redis
  heartbeat (``constants.daemon_heartbeat_key``: device, models and their backends,
  counters, cumulative busy seconds, and ``boot``, an id new in every daemon process by
  which workers waiting for results notice a restart, see
  :meth:`gpu_service.client.GpuClient.collect`) and the gauges
  (``clipline_device_busy_ratio``, and ``clipline_gpu_utilization_ratio`` from NVML on
  CUDA) every second; the metrics
  endpoint (``/metrics``: the GPU daemon's own metrics only, see
  :mod:`clipline_core.metrics`; ``/readyz``, ``/healthz``) runs on
  ``Settings.metrics_host``:``Settings.daemon_metrics_port``;
* SIGTERM (or SIGINT) starts draining: no more waiting for fuller batches, every item
  in the arena (and every slot a producer is still writing, for a grace period) is
  processed and published, then the arena is unlinked and the process exits 0. A second
  signal stops after the batches in flight, leaving unprocessed items in the arena for
  the next daemon. A device failure exits 1 and also leaves the arena for the next
  daemon, which takes the unfinished items over.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import cv2
import torch

from clipline_core import constants
from clipline_core import metrics as m
from clipline_core.settings import Settings
from gpu_service import models as registry
from gpu_service.backends import BACKENDS, buckets_up_to
from gpu_service.batcher import BatchPolicy
from gpu_service.captions import CaptionService
from gpu_service.engine import Engine
from gpu_service.executor import BusyMeter, DeviceFailure, make_executor
from gpu_service.models.base import BuildContext, Model
from gpu_service.models.text import TextModel
from gpu_service.publisher import RedisResultSink, ResultPublisher
from gpu_service.shm import ArenaLayout, Consumer

log = logging.getLogger("clipline.gpu")

#: heartbeat refresh period and time-to-live (seconds)
HEARTBEAT_EVERY_S = 1.0
HEARTBEAT_TTL_S = 15
#: the loop counts as stuck (not ready) after this long without a turn
LOOP_STALL_S = 120.0
# A loop that has not turned for this long is stuck: fail liveness so it is restarted.
LIVE_STALL_S = 300.0
#: batches in flight on CUDA (copy of N+1 overlaps compute of N)
CUDA_PIPELINE_DEPTH = 2


# ---------------------------------------------------------------------------
# Start-up helpers.
# ---------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` as a torch device (CUDA with its index)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(f"device {name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def configure_torch(settings: Settings, device: torch.device) -> int:
    """Bound torch's CPU threads; enable cuDNN autotuning on CUDA. Returns the thread count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    # The intra-op threads must sleep when idle (OMP_WAIT_POLICY=PASSIVE, set by the
    # entrypoints before torch loads): spinning threads steal the cores co-located
    # workers decode on (measured on 2 cores: 2 spinning threads next to 2 workers
    # halved throughput; sleeping ones raised it 1.16x over a single thread).
    threads = settings.torch_threads or min(4, cores)
    torch.set_num_threads(threads)
    # The localizer's host detector spreads a batch's frames over ``threads`` threads of
    # its own; OpenCV's pool inside each call would only oversubscribe those cores
    # (measured on 2 cores: 8.9 against 10.3 ms per frame).
    cv2.setNumThreads(1)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        # Batches are padded to a few bucket sizes, so autotuning sees few shapes.
        torch.backends.cudnn.benchmark = True
    return threads


def model_backends(settings: Settings) -> dict[str, str]:
    """Per-model backend overrides from ``model_backends`` (``name=backend,...``)."""
    raw = settings.model_backends
    out: dict[str, str] = {}
    for part in raw.split(","):
        if not part.strip():
            continue
        name, sep, backend = part.partition("=")
        name, backend = name.strip(), backend.strip()
        if not sep or not name or backend not in BACKENDS:
            raise ValueError(
                f"invalid model_backends entry {part.strip()!r}: use name=backend with "
                f"backend one of {', '.join(BACKENDS)}"
            )
        out[name] = backend
    return out


def model_names(settings: Settings) -> list[str]:
    names = [n.strip() for n in settings.models.split(",") if n.strip()]
    # The selection needs one of its scorers' models: the localizer, else the features.
    if "features" not in names and "localizer" not in names:
        names.insert(0, "features")
    return list(dict.fromkeys(names))


def redis_job_texts(client: Any, deployment: str) -> Callable[[str], tuple[str, str]]:
    """A job id -> ``(title, description)`` lookup in the job's spec (``("", "")`` on any
    error: a missing job, a spec that does not parse, Redis down)."""

    def job_texts(job_id: str) -> tuple[str, str]:
        try:
            raw = client.hget(constants.job_key(deployment, job_id), "spec")
            spec = json.loads(raw) if raw else {}
            title, description = spec.get("title") or "", spec.get("description") or ""
            if isinstance(title, str) and isinstance(description, str):
                return title, description
        except Exception:
            log.debug("no texts for job %s", job_id, exc_info=True)
        return "", ""

    return job_texts


def _build_one(
    name: str,
    settings: Settings,
    device: torch.device,
    job_texts: Callable[[str], tuple[str, str]] | None = None,
) -> Model:
    if name not in registry.available():
        # Models register themselves on import; load gpu_service.models.<name> if needed.
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(f"gpu_service.models.{name}")
    ctx = BuildContext(settings=settings, device=device, job_texts=job_texts)
    return registry.build(name, ctx)


def text_model_names(settings: Settings) -> list[str]:
    """The configured names that are text models (``copywriter``), in order."""
    text = set(registry.available_text())
    return [n for n in model_names(settings) if n in text]


def build_text_models(settings: Settings, device: torch.device) -> list[TextModel]:
    """Build the configured text models (eager; real weights only from ``weights_dir``)."""
    built: list[TextModel] = []
    for name in text_model_names(settings):
        model = registry.build_text(name, BuildContext(settings=settings, device=device))
        log.info(
            "text model %s: %s",
            model.name,
            "trusted" if model.weights_loaded else "untrusted (no weights): never used",
        )
        built.append(model)
    return built


def build_models(
    settings: Settings,
    device: torch.device,
    job_texts: Callable[[str], tuple[str, str]] | None = None,
) -> list[Model]:
    """Build every configured model with its backend (falling back to eager if it fails).

    ``job_texts`` (job id -> title, description) is handed to the models that need it.
    """
    overrides = model_backends(settings)
    text = set(text_model_names(settings))
    names = [n for n in model_names(settings) if n not in text]
    for unknown in sorted(set(overrides) - set(names)):
        log.warning("model_backends names %r, which is not in models=%s", unknown, names)
    built: list[Model] = []
    for name in names:
        requested = overrides.get(name, settings.backend)
        own = settings if requested == settings.backend else settings.replace(backend=requested)
        try:
            model = _build_one(name, own, device, job_texts)
        except KeyError:
            raise
        except Exception:
            if requested == "eager":
                raise
            log.exception("model %s failed to build with backend %s; using eager", name, requested)
            model = _build_one(name, settings.replace(backend="eager"), device, job_texts)
        log.info(
            "model %s: backend %s (requested %s), %s, %s",
            model.name,
            model.backend,
            requested,
            model.precision,
            "trusted" if model.trusted else "untrusted (no weights)",
        )
        built.append(model)
    return built


def layout_from(settings: Settings) -> ArenaLayout:
    """The arena for ``settings``; a slot must hold one chunk of frames (a clear error)."""
    chunk = settings.frames_per_chunk * settings.frame_size * settings.frame_size * 3
    if chunk > settings.shm_slot_bytes:
        raise ValueError(
            f"a chunk of {settings.frames_per_chunk} frames of {settings.frame_size}x"
            f"{settings.frame_size} RGB needs {chunk} bytes but a slot has "
            f"{settings.shm_slot_bytes} (CLIPLINE_SHM_SLOT_BYTES); raise it or lower "
            "CLIPLINE_FRAMES_PER_CHUNK / CLIPLINE_FRAME_SIZE"
        )
    return ArenaLayout(
        n_slots=settings.shm_slots,
        slot_bytes=settings.shm_slot_bytes,
        frames_per_chunk=settings.frames_per_chunk,
        frame_height=settings.frame_size,
        frame_width=settings.frame_size,
    )


def policy_from(settings: Settings) -> BatchPolicy:
    return BatchPolicy(
        max_batch=max(1, settings.max_batch_size),
        max_delay_s=max(0.0, settings.max_queue_delay_ms) / 1000.0,
    )


# ---------------------------------------------------------------------------
# The daemon.
# ---------------------------------------------------------------------------
class Daemon:
    """Owns the device, the arena, the engine and the daemon's I/O."""

    def __init__(
        self,
        settings: Settings,
        redis_client: Any | None = None,
        models: list[Model] | None = None,
        text_models: list[TextModel] | None = None,
    ) -> None:
        import redis

        self.settings = settings
        self.device = resolve_device(settings.device)
        self.threads = configure_torch(settings, self.device)
        self.redis = redis_client or redis.Redis.from_url(settings.redis_url)
        self._hb_key = constants.daemon_heartbeat_key(settings.deployment, settings.daemon_name)
        #: this daemon process's id in the heartbeat (a restarted daemon has a new one)
        self.boot = uuid.uuid4().hex
        self._stop = threading.Event()
        self._ready = False
        self._tick = time.monotonic()
        self._http: Any = None
        self._nvml: Any = None
        self._housekeeper: threading.Thread | None = None
        self.exit_code = 0
        self._fatal = False
        if settings.daemon_metrics_port:
            from clipline_core import httpserve

            self._http = httpserve.serve(
                m.exposition(m.GPU_DAEMON),
                settings.daemon_metrics_port,
                settings.metrics_host,
                ready=self.ready,
                live=self.live,
            )
        self.models = (
            models
            if models is not None
            else build_models(
                settings, self.device, redis_job_texts(self.redis, settings.deployment)
            )
        )
        self.text_models = (
            text_models if text_models is not None else build_text_models(settings, self.device)
        )
        self.policy = policy_from(settings)
        self.consumer = Consumer(
            settings.arena_path,
            settings.socket_path,
            layout_from(settings),
            settings.deployment,
            starvation_age_s=settings.shm_starvation_age_s,
            spin_s=settings.shm_spin_us / 1e6,
        )
        try:
            if self.consumer.arena.recovered:
                log.info(
                    "took over %d in-flight slots from a previous daemon",
                    self.consumer.arena.recovered,
                )
            self.busy = BusyMeter()
            depth = CUDA_PIPELINE_DEPTH if self.device.type == "cuda" else 1
            self.executor = make_executor(
                self.device,
                self.models,
                self.policy,
                self.consumer.arena.layout.slot_stride,
                self.busy,
                depth=depth,
                host_region=self.consumer.arena.base_address(),
            )
            self.publisher = ResultPublisher(
                RedisResultSink(self.redis, settings.deployment, settings.result_ttl_s),
                self.device.type,
            )
            self.captions = self._caption_service()
            self.engine = Engine(
                self.consumer,
                self.models,
                self.executor,
                self.publisher,
                self.policy,
                depth=depth,
                captions=self.captions,
            )
        except BaseException:
            self.consumer.close(unlink=True)
            raise
        self.warmup_s = 0.0

    def _caption_service(self) -> CaptionService | None:
        """The caption service when a copywriter with real weights is configured."""
        writer = next((t for t in self.text_models if t.name == constants.CAPTION_MODEL), None)
        if writer is None:
            return None
        if not writer.weights_loaded:
            log.warning(
                "%s has no weights: captions stay null and no caption request is taken",
                writer.name,
            )
            return None
        return CaptionService(
            writer,
            self.publisher,
            self.redis,
            constants.caption_requests_key(self.settings.deployment),
            self.settings.socket_path,
            device=self.device,
            busy=self.busy,
            stream=getattr(self.executor, "compute_stream", None),
        )

    # -- state ------------------------------------------------------------------------
    def ready(self) -> bool:
        """Readiness: warmed up, not draining or stopping, and the loop is turning."""
        return (
            self._ready
            and not self.engine.draining
            and not self._stop.is_set()
            and time.monotonic() - self._tick < LOOP_STALL_S
        )

    def live(self) -> bool:
        """Liveness: no fatal error, and once warmed up the loop has turned recently."""
        if self._fatal:
            return False
        return not self._ready or time.monotonic() - self._tick < LIVE_STALL_S

    def request_drain(self, *_: object) -> None:
        """First SIGTERM/SIGINT: finish everything in the arena, then exit."""
        if self.engine.draining:
            log.info("second stop request: stopping after the batches in flight")
            self._stop.set()
            return
        log.info("draining: finishing the work in the arena, then exiting")
        self.engine.start_draining()

    def request_stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, str | int | float]:
        """The heartbeat's fields (also what ``clipline status`` shows)."""
        now = time.monotonic()
        info: dict[str, str | int | float] = {
            "pid": os.getpid(),
            "boot": self.boot,
            "device": str(self.device),
            "models": ",".join(
                [f"{x.name}:{x.backend}:{int(x.trusted)}" for x in self.models]
                + [f"{t.name}:eager:{int(t.weights_loaded)}" for t in self.text_models]
            ),
            "precisions": ",".join(f"{x.name}:{x.precision}" for x in self.models),
            "arena": str(self.settings.arena_path),
            "host": socket.gethostname(),
            "threads": self.threads,
            "max_batch": self.policy.max_batch,
            "items": self.engine.items_done,
            "batches": self.engine.batches_done,
            "rejected": self.engine.rejected,
            "published": self.publisher.published,
            "errors": self.publisher.errors,
            "busy_s": round(self.busy.total(now), 6),
            "busy_ratio": round(self.busy.ratio(now), 4),
            "ts": round(now, 6),
            "warmup_s": round(self.warmup_s, 3),
            "draining": int(self.engine.draining),
            "ready": int(self.ready()),
        }
        if self.captions is not None:
            info["captions"] = self.captions.answered
            info["caption_errors"] = self.captions.failed
            info["captions_pending"] = self.captions.pending()
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
            info["registered"] = int(getattr(self.executor, "registered", False))
        return info

    # -- housekeeping thread ------------------------------------------------------------
    def _heartbeat(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        fields: dict[Any, Any] = dict(self.status())
        pipe.hset(self._hb_key, mapping=fields)
        pipe.expire(self._hb_key, HEARTBEAT_TTL_S)
        pipe.execute()

    def _update_gauges(self) -> None:
        node = self.settings.node_name
        m.DEVICE_BUSY.labels(node).set(self.busy.ratio())
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                util = self._nvml[0].nvmlDeviceGetUtilizationRates(self._nvml[1])
                m.GPU_UTILIZATION.labels(node).set(util.gpu / 100.0)

    def _housekeeping(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            self._update_gauges()
            try:
                self._heartbeat()
            except Exception as exc:  # Redis hiccup: the next beat retries
                log.warning("heartbeat failed: %s", exc)

    def _init_nvml(self) -> None:
        if self.device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = (
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            )
            handle = None
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
            if uuid is not None:  # robust to CUDA_VISIBLE_DEVICES renumbering
                text = str(uuid)
                text = text if text.startswith("GPU-") else f"GPU-{text}"
                with contextlib.suppress(Exception):
                    handle = pynvml.nvmlDeviceGetHandleByUUID(text)
            if handle is None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = (pynvml, handle)
        except Exception as exc:  # NVML is optional (e.g. missing driver library)
            log.warning(
                "NVML unavailable, %s not exported: %s", constants.Metric.GPU_UTILIZATION_RATIO, exc
            )

    # -- run ----------------------------------------------------------------------------
    def run(self) -> int:
        """Warm up, serve until drained or stopped; return the process exit code."""
        try:
            lay = self.consumer.arena.layout
            sizes = buckets_up_to(self.policy.max_batch) if self.device.type == "cuda" else (1,)
            self.warmup_s = self.engine.warmup(
                lay.frames_per_chunk, lay.frame_height, lay.frame_width, sizes
            )
            if self.captions is not None:
                self.warmup_s += self.captions.warmup()
            self._init_nvml()
            self.publisher.start()
            if self.captions is not None:
                self.captions.start()
            self._tick = time.monotonic()
            self._ready = True
            self._heartbeat()
            self._housekeeper = threading.Thread(
                target=self._housekeeping, name="housekeeping", daemon=True
            )
            self._housekeeper.start()
            log.info(
                "GPU daemon ready: device=%s models=%s batch<=%d delay=%.1fms arena=%s "
                "(%d slots x %d B) warm-up %.1fs",
                self.device,
                ",".join(
                    f"{x.name}[{x.backend}{'' if x.trusted else ', untrusted'}]"
                    for x in self.models
                ),
                self.policy.max_batch,
                self.policy.max_delay_s * 1000,
                self.settings.arena_path,
                lay.n_slots,
                lay.slot_stride,
                self.warmup_s,
            )
            self._loop()
            self.engine.finish_inflight()
        except DeviceFailure:
            log.critical(
                "device failure; exiting, the next daemon takes the work over", exc_info=True
            )
            self.exit_code = 1
            self._fatal = True
        except Exception:
            log.critical("the engine loop failed", exc_info=True)
            self.exit_code = 1
        finally:
            self.shutdown()
        return self.exit_code

    def _loop(self) -> None:
        engine = self.engine
        next_reclaim = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            self._tick = now
            if now >= next_reclaim:
                next_reclaim = now + 1.0
                self.consumer.reclaim_dead()
            if engine.run_once():
                continue
            if engine.draining and engine.drained():
                break
            engine.wait_for_work()

    def shutdown(self) -> None:
        """Publish what is left, stop the threads, remove the heartbeat, close the arena."""
        self._ready = False
        self._stop.set()
        if self._housekeeper is not None:
            self._housekeeper.join(5.0)
        self.publisher.close()
        with contextlib.suppress(Exception):
            self.redis.delete(self._hb_key)
        with contextlib.suppress(Exception):
            self.engine.close()
        states = self.consumer.arena.states()
        leftover = states["ready"] + states["consuming"] + states["writing"]
        if leftover:
            log.warning("leaving %d unfinished slots in the arena for the next daemon", leftover)
        if not self._fatal:
            # Unlink only a clean, empty arena; unfinished items stay for the next daemon.
            self.consumer.close(unlink=self.exit_code == 0 and leftover == 0)
        # After a device failure the slots we hold stay CONSUMING: the next daemon
        # recovers them and counts it, so a chunk that keeps killing daemons is rejected.
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        log.info(
            "GPU daemon stopped after %d items in %d batches (%d published, %d dropped)",
            self.engine.items_done,
            self.engine.batches_done,
            self.publisher.published,
            self.publisher.dropped,
        )


def main(settings: Settings | None = None) -> int:
    settings = settings or Settings.from_env()
    logging.basicConfig(
        level=os.environ.get("CLIPLINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    daemon = Daemon(settings)
    signal.signal(signal.SIGTERM, daemon.request_drain)
    signal.signal(signal.SIGINT, daemon.request_drain)
    return daemon.run()
