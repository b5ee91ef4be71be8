"""One job, start to finish, on a CPU worker: fetch -> decode -> infer -> select -> render.

:meth:`JobRunner.run` is what the Celery task calls. It claims the job under a lease
(so a duplicate delivery does nothing, and a delivery whose previous holder died on
this host takes over at once), runs each stage as a function of its own (timed into
``clipline_stage_seconds``), advances the job's state between stages, and always
removes its scratch directory (a directory left by a killed process is removed by the
worker's housekeeping, :mod:`workers.monitor`). It returns an :class:`Outcome` telling
the task whether to acknowledge, or to retry later (a transient error with attempts
left, due in :func:`retry_countdown`; the requeue records the worker process that
will hold the retry's message, see :mod:`clipline_core.store`). The soft time limit ends
the job with ``timeout``. A GPU daemon that restarts while the job waits for its results
fails the attempt at once when results were lost (:meth:`GpuClient.collect`), so the
job is retried within seconds instead of after ``inference_timeout_s``.

The clip is rendered into the scratch directory, then goes to the artifact store
(:mod:`clipline_core.artifacts`: a local directory, or an S3 bucket the job API reads
too; the job records its key, ``highlight.artifact``, and expires with it), or, when the
job carries an ``upload_url``, to that presigned URL (:mod:`workers.upload`). A store
that fails (down, timing out) fails the attempt with a transient ``upload_failed``: the
job is retried and still ends once.

Caption: once the sources are fetched, a job with a title or description asks the GPU
daemon for a one-line caption (:meth:`gpu_service.client.GpuClient.request_caption`,
only when the daemon advertises a copywriter with real weights), so the daemon writes
it while the video decodes; it arrives with the frame results and becomes
``highlight.caption``. A caption that fails or does not come leaves it null; the job
never fails over its caption.

Progress: while a job runs, :class:`_Progress` writes a small ``progress`` field into
its hash (:class:`clipline_core.job.JobProgress`: the stage, sampled frames decoded,
chunks scored of chunks sent) at most every :data:`PROGRESS_INTERVAL_S` and only when it
changed, so ``clipline`` and the API can show a job's progress, not just its state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded

from clipline_core import artifacts, constants
from clipline_core import metrics as m
from clipline_core.constants import PriorityClass
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.job import ACTIVE, Aspect, JobSpec, JobState
from clipline_core.settings import Settings
from clipline_core.store import JobStore, holder_identity, holder_is_dead
from gpu_service import protocol
from gpu_service.client import GpuClient
from workers import (
    callbacks,
    decode,
    decoders,
    fetch,
    localize,
    preprocess,
    reframe,
    render,
    select,
    upload,
)
from workers.app import make_app

log = logging.getLogger("clipline.worker")


def lease_seconds(settings: Settings) -> float:
    """How long a job's lease lasts without renewal (renewed every third of it).

    ``Settings.job_lease_s``: a job whose worker died is recovered about this long after.
    """
    return max(1.0, settings.job_lease_s)


def retry_countdown(attempt: int, backoff: float, backoff_max: float, jitter: bool = True) -> float:
    """Seconds before retrying after failed attempt ``attempt`` (1-based), as Celery's
    ``retry_backoff``/``retry_backoff_max``/``retry_jitter`` task options compute it
    (:func:`celery.utils.time.get_exponential_backoff_interval`: whole seconds,
    ``backoff`` at least 1, doubling per attempt; with jitter drawn from 0 to that)."""
    from celery.utils.time import get_exponential_backoff_interval

    return float(
        get_exponential_backoff_interval(
            factor=int(max(1.0, backoff)),
            retries=max(0, attempt - 1),
            maximum=int(backoff_max),
            full_jitter=jitter,
        )
    )


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRY = "retry"
    SKIPPED = "skipped"  # terminal already, or someone else holds it


@dataclasses.dataclass
class Result:
    outcome: Outcome
    error: ClipError | None = None
    attempt: int = 0
    retry_in_s: float = 0.0  # with RETRY: when the retry is due


class _Lease:
    """Keeps the job's lease alive from a background thread while a stage runs."""

    def __init__(self, store: JobStore, job_id: str, token: str, lease_s: float) -> None:
        self.store, self.job_id, self.token, self.lease_s = store, job_id, token, lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.store.renew(self.job_id, self.token, self.lease_s):
                    self.lost.set()
                    return
            except Exception:  # Redis hiccup: try again next period
                log.warning("lease renewal for %s failed", self.job_id, exc_info=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


#: A running job's ``progress`` field is written at most this often (seconds).
PROGRESS_INTERVAL_S = 0.5


class _CountingSink(preprocess.SlotSink):
    """The job's shared-memory sink, counting the sampled frames written (for progress)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._count_lock = threading.Lock()
        self.frames_decoded = 0

    def commit(self, ordinal: int) -> None:
        super().commit(ordinal)
        with self._count_lock:
            self.frames_decoded += 1

    def restart(self) -> None:
        with self._count_lock:
            self.frames_decoded = 0
        super().restart()


class _Progress:
    """Writes a running job's ``progress`` from a background thread (see the module doc).

    The stage follows the job's state (:meth:`JobRunner._advance`); frames and chunks
    sent come from the sink, chunks scored from the results waiting in Redis while the
    video decodes and from :meth:`GpuClient.collect` afterwards. A write that fails (a
    Redis hiccup) is skipped: progress is advisory, never a reason to fail a job.
    """

    def __init__(self, store: JobStore, redis_client: Any, deployment: str, job_id: str) -> None:
        self.store, self.redis, self.job_id = store, redis_client, job_id
        self.results_key = constants.results_key(deployment, job_id)
        self.token = ""
        self.stage = JobState.FETCHING.value
        self.sink: _CountingSink | None = None
        self.scored: int | None = None  # counted by collect(), once it runs
        self._last: tuple[Any, ...] | None = None
        self._written = -PROGRESS_INTERVAL_S  # monotonic time of the last write
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def on_result(self, received: int) -> None:
        self.scored = received

    def snapshot(self) -> dict[str, Any]:
        sink = self.sink
        frames = sink.frames_decoded if sink is not None else 0
        chunks = sink.published if sink is not None else 0
        if self.scored is not None:
            done = self.scored
        elif chunks:
            done = int(self.redis.llen(self.results_key))
        else:
            done = 0
        return {
            "stage": self.stage,
            "frames": frames,
            "chunks_done": min(done, chunks),
            "chunks": chunks,
        }

    def write(self) -> None:
        """Write the progress if it changed and the last write is old enough."""
        now = time.monotonic()
        if now - self._written < PROGRESS_INTERVAL_S:
            return
        try:
            snap = self.snapshot()
            key = tuple(snap.values())
            if key != self._last and self.token:
                self.store.set_progress(self.job_id, self.token, {**snap, "at": time.time()})
                self._last, self._written = key, now
        except Exception:
            log.debug("job %s: progress not written", self.job_id, exc_info=True)

    def _run(self) -> None:
        # Look often (a new stage shows soon), write at most every PROGRESS_INTERVAL_S.
        while not self._stop.wait(PROGRESS_INTERVAL_S / 5):
            self.write()

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def timeout_error(limit_s: float) -> ClipError:
    """The error of a job stopped by its time limit."""
    within = f" of {limit_s:.0f} s" if limit_s else ""
    return ClipError(
        ErrorCode.TIMEOUT, f"the job did not finish within the time limit{within}", transient=False
    )


def crop_path(
    aspect: str,
    info: decode.VideoInfo,
    choice: select.Selection,
    first: int,
    frames: int,
    results: protocol.JobResults | None = None,
) -> reframe.CropPath | None:
    """The crop path of a vertical or square clip (None for the source's aspect).

    It follows the product's boxes in the chosen window (the localizer's
    ``highlight.product``: verified, else where its colours are); where the product is
    not seen, the motion in the picture (:func:`workers.localize.motion_centres`, from
    the localizer's results), and a still centre crop when neither is there.
    """
    if aspect == Aspect.SOURCE.value or frames < 1:
        return None
    ts = np.asarray(info.kept_timestamps, dtype=np.float64)
    inside = np.nonzero((ts >= choice.start_s - 1e-9) & (ts < choice.end_s - 1e-9))[0]
    kept = [float(ts[i]) for i in inside]
    boxes = reframe.sightings(choice.product, kept)
    attention = None
    if results is not None and localize.has_localizer(results):
        motion = localize.motion_centres(results)
        if len(motion) == len(ts):
            attention = [motion[i] for i in inside]
    times = info.times[first : first + frames]
    return reframe.plan(kept, boxes, times, (info.width, info.height), aspect, attention=attention)


class Cancelled(Exception):
    """The job left the active states under us (cancelled, or taken over)."""


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - start
        timings[name] = round(timings.get(name, 0.0) + elapsed, 6)
        m.STAGE_SECONDS.labels(name).observe(elapsed)


def _callback_app(settings: Settings) -> Any:
    """A Celery app for ``settings``, for runners created outside a task (tests, tools)."""
    return make_app(settings)


class JobRunner:
    """Runs jobs in one worker process (holds the Redis store and the GPU client)."""

    def __init__(self, settings: Settings, redis_client: Any, celery: Any = None) -> None:
        self.settings = settings
        self.redis = redis_client
        # The Celery app that sends completion callbacks (the task's own app in a worker).
        self.celery = celery if celery is not None else _callback_app(settings)
        self.store = callbacks.job_store(settings, redis_client, self.celery)
        self.gpu = GpuClient(settings, redis_client)
        self._message_holder = ""
        self._backoff: Callable[[int], float] | None = None
        self.artifacts = artifacts.open_store(settings)
        self._progress: _Progress | None = None

    def run(
        self,
        job_id: str,
        soft_limit_s: float | None = None,
        message_holder: str = "",
        backoff: Callable[[int], float] | None = None,
    ) -> Result:
        """Run (or skip) one delivery of ``job_id``; ``soft_limit_s`` is for messages.

        ``message_holder`` is the worker process that will hold a retry's message (the
        pool's main process); a retry is recorded as held by it
        (:meth:`clipline_core.store.JobStore.requeue`), so the job comes back if that
        process dies while the retry waits on its countdown. ``backoff(attempt)`` is the
        retry's countdown (the task's Celery options; default :func:`retry_countdown` with
        the settings); the requeue records it as the retry's due time.
        """
        self._message_holder = message_holder
        self._backoff = backoff
        token = uuid.uuid4().hex
        holder = holder_identity()
        max_attempts = self.settings.max_attempts
        lease_s = lease_seconds(self.settings)
        status, state, attempt = self.store.claim(
            job_id, token, lease_s, max_attempts, holder=holder
        )
        if status == 0 and state in {s.value for s in ACTIVE}:
            # Redelivered while leased: take over only if the holder died on this host.
            stale, owner = self.store.lease_holder(job_id)
            if stale and owner and holder_is_dead(owner):
                status, state, attempt = self.store.claim(
                    job_id, token, lease_s, max_attempts, steal=stale, holder=holder
                )
                if status == 1:
                    log.warning("job %s: took over from a dead worker (%s)", job_id, owner)
        if status == 0:
            log.info("job %s not claimable (state %s): skipping", job_id, state or "missing")
            return Result(Outcome.SKIPPED)
        if status == 2:
            err = ClipError(
                ErrorCode.WORKER_LOST, f"the job was interrupted {attempt} times; giving up"
            )
            self._fail_unleased(job_id, err)
            return Result(Outcome.FAILED, err, attempt)
        job = self.store.get(job_id)
        assert job is not None
        scratch = self.settings.scratch_path / f"{job_id}-{attempt}-{os.getpid()}"
        m.JOBS_IN_FLIGHT.inc()
        try:
            scratch.mkdir(parents=True, exist_ok=True)
            (scratch / "owner").write_text(holder)
            progress = _Progress(self.store, self.redis, self.settings.deployment, job_id)
            progress.token, progress.stage = token, job.state.value
            self._progress = progress
            with _Lease(self.store, job_id, token, lease_s) as lease, progress:
                self._process(job_id, job.spec, job.created_at, token, attempt, scratch, lease)
            return Result(Outcome.SUCCEEDED, attempt=attempt)
        except Cancelled:
            log.info("job %s was cancelled or taken over during attempt %d", job_id, attempt)
            return Result(Outcome.SKIPPED, attempt=attempt)
        except SoftTimeLimitExceeded:
            err = timeout_error(soft_limit_s or self.settings.job_soft_time_limit_s)
            return self._handle_error(job_id, token, attempt, err)
        except ClipError as err:
            return self._handle_error(job_id, token, attempt, err)
        except Exception as exc:  # a bug: fail the job with a reason, never lose it
            log.exception("job %s failed unexpectedly", job_id)
            internal = ClipError(
                ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", transient=False
            )
            return self._handle_error(job_id, token, attempt, internal)
        finally:
            self._progress = None
            m.JOBS_IN_FLIGHT.dec()
            shutil.rmtree(scratch, ignore_errors=True)

    # ------------------------------------------------------------------------------
    def _advance(self, job_id: str, to: JobState, token: str, **fields: Any) -> None:
        if not self.store.advance(job_id, to, token, **fields):
            raise Cancelled()
        if self._progress is not None:
            self._progress.stage = to.value

    def _process(
        self,
        job_id: str,
        spec: JobSpec,
        created_at: float,
        token: str,
        attempt: int,
        scratch: Path,
        lease: _Lease,
    ) -> None:
        timings: dict[str, float] = {}
        job = self.store.raw(job_id)
        timings["queued"] = round(float(job.get("started_at", created_at)) - created_at, 6)

        with stage("fetch", timings):
            video_path, _container = fetch.fetch_video(spec.video_url, scratch, self.settings)
            images = [
                fetch.fetch_image(u, scratch, i, self.settings)
                for i, u in enumerate(spec.image_urls)
            ]
        self._advance(job_id, JobState.DECODING, token, timings=timings)

        priority = PriorityClass(spec.priority).rank
        boot = self.gpu.daemon_boot()  # the daemon our items go to (see GpuClient.collect)
        sink = _CountingSink(
            self.gpu.producer, job_id, preprocess.generation(attempt), priority, created_at
        )
        if self._progress is not None:
            self._progress.sink = sink
        caption_generation = self._request_caption(job_id, spec, sink.generation, priority)
        infer_start = 0.0
        try:
            with stage("decode", timings):

                def fill_refs(arr: Any) -> int:
                    n = min(len(images), arr.shape[0])
                    for i in range(n):
                        decode.load_image(images[i], sink.size, arr[i], f"product image {i + 1}")
                    return n

                sink.publish_refs(fill_refs)
                infer_start = time.monotonic()
                info = decoders.sample_video(video_path, self.settings, sink)
        except BaseException:
            sink.abort()
            sink.withdraw_all()
            raise
        if lease.lost.is_set():
            sink.withdraw_all()
            raise Cancelled()
        self._advance(job_id, JobState.INFERRING, token, timings=timings, video=info.to_dict())

        def heartbeat() -> None:
            if lease.lost.is_set():
                raise Cancelled()

        try:
            messages = self.gpu.collect(
                job_id,
                sink.generation,
                sink.published,
                self.settings.inference_timeout_s,
                heartbeat,
                caption_generation=caption_generation,
                boot=boot,
                on_result=self._progress.on_result if self._progress is not None else None,
            )
        except BaseException:
            sink.withdraw_all()
            raise
        results = protocol.JobResults.from_messages(messages)
        timings["inference"] = round(time.monotonic() - infer_start, 6)
        m.STAGE_SECONDS.labels("inference").observe(timings["inference"])
        self._advance(job_id, JobState.RENDERING, token, timings=timings)

        with stage("render", timings):
            try:
                choice = select.select(
                    results, info.kept_timestamps, info.duration_s, spec.duration_s
                )
            except localize.ProductImagesLost as exc:  # the daemon restarted mid-job
                raise ClipError(ErrorCode.GPU_UNAVAILABLE, f"{exc}; the job is retried") from exc
            first, n_frames = info.frames_between(choice.start_s, choice.end_s)
            crop = crop_path(spec.aspect.value, info, choice, first, n_frames, results)
            dest = scratch / "clip.mp4"
            clip = render.render(
                video_path,
                dest,
                choice.start_s,
                n_frames,
                info.fps,
                self.settings.ffmpeg,
                first_frame=first,
                crop=crop,
            )
        url, key = self._store_clip(job_id, spec, clip.path, timings)
        last = first + clip.frames
        end_s = float(info.times[last]) if last < info.decoded_frames else info.duration_s
        timings["total"] = round(time.time() - created_at, 6)
        highlight = {
            "start_s": round(choice.start_s, 6),
            "end_s": round(max(end_s, choice.start_s), 6),
            "score": round(choice.score, 6),
            "path": self._local_path(key),
            "url": url,
            "artifact": key,
            "codec": clip.codec,
            "audio": clip.audio,
            "frames": clip.frames,
            "caption": results.caption.caption if results.caption else None,
            "product": choice.product,
            "aspect": spec.aspect.value,
            "width": clip.width or info.width // 2 * 2,
            "height": clip.height or info.height // 2 * 2,
            "reframe": crop.to_dict() if crop is not None else None,
        }
        if not self.store.finish(
            job_id,
            JobState.SUCCEEDED,
            allowed_from=ACTIVE,
            lease=token,
            highlight=highlight,
            timings=timings,
            ttl_s=self.settings.artifact_ttl_s if key else None,
        ):
            if key:
                self._drop_clip(key)
            raise Cancelled()
        log.info(
            "job %s succeeded: %.2f-%.2f s (score %.3f)",
            job_id,
            choice.start_s,
            highlight["end_s"],
            choice.score,
        )

    def _store_clip(
        self, job_id: str, spec: JobSpec, path: Path, timings: dict[str, float]
    ) -> tuple[str | None, str | None]:
        """Send the rendered clip where it goes: ``(upload URL, None)`` or ``(None, key)``."""
        with stage("upload", timings):
            if spec.upload_url:
                return upload.put_file(spec.upload_url, path, self.settings), None
            return None, self.artifacts.put(artifacts.clip_key(job_id), path)

    def _local_path(self, key: str | None) -> str | None:
        path = self.artifacts.local_path(key) if key else None
        return str(path) if path is not None else None

    def _drop_clip(self, key: str) -> None:
        try:
            self.artifacts.delete(key)
        except ClipError as err:  # expires with the store's retention anyway
            log.warning("could not delete the clip %s: %s", key, err.message)

    def _request_caption(
        self, job_id: str, spec: JobSpec, generation: int, priority: int
    ) -> int | None:
        """Ask the daemon for the job's caption; the ``generation`` to wait for, or None."""
        try:
            sent = self.gpu.request_caption(
                job_id, generation, spec.title, spec.description, priority
            )
        except Exception as exc:  # the caption is optional: never fail the job over it
            log.warning("job %s: could not request a caption: %s", job_id, exc)
            return None
        return generation if sent else None

    def _handle_error(self, job_id: str, token: str, attempt: int, err: ClipError) -> Result:
        if err.transient and attempt < self.settings.max_attempts:
            wait = self._retry_in_s(attempt)
            log.warning(
                "job %s attempt %d: %s (will retry in %.1f s)", job_id, attempt, err.message, wait
            )
            back = self.store.requeue(
                job_id, token, err.to_dict(), retry_in_s=wait, holder=self._message_holder
            )
            return Result(Outcome.RETRY if back else Outcome.SKIPPED, err, attempt, wait)
        log.warning("job %s failed: %s: %s", job_id, err.code.value, err.message)
        if self.store.finish(
            job_id, JobState.FAILED, allowed_from=ACTIVE, lease=token, error=err.to_dict()
        ):
            return Result(Outcome.FAILED, err, attempt)
        return Result(Outcome.SKIPPED, err, attempt)

    def _retry_in_s(self, attempt: int) -> float:
        """The retry's countdown: the task's (``backoff``), else from the settings."""
        if self._backoff is not None:
            return self._backoff(attempt)
        s = self.settings
        return retry_countdown(attempt, s.retry_backoff_s, s.retry_backoff_max_s, s.retry_jitter)

    def _fail_unleased(self, job_id: str, err: ClipError) -> None:
        self.store.finish(job_id, JobState.FAILED, error=err.to_dict())
