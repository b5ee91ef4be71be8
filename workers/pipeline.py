"""One job, start to finish, on a CPU worker: fetch -> decode -> infer -> select -> render.

:meth:`JobRunner.run` is what the Celery task calls. It claims the job under a lease
(so a duplicate delivery does nothing, and a delivery whose previous holder died on
this host takes over at once), runs each stage as a function of its own (timed into
``clipline_stage_seconds``), advances the job's state between stages, and always
removes its scratch directory (a directory left by a killed process is removed by the
worker's housekeeping, :mod:`workers.monitor`). It returns an :class:`Outcome` telling
the task whether to acknowledge, or to retry later (a transient error with attempts
left). The soft time limit ends the job with ``timeout``.

The clip goes to the local artifact directory, or, when the job carries an
``upload_url``, to that presigned URL (:mod:`workers.upload`).

Caption: once the sources are fetched, a job with a title or description asks the GPU
daemon for a one-line caption (:meth:`gpu_service.client.GpuClient.request_caption`,
only when the daemon advertises a copywriter with real weights), so the daemon writes
it while the video decodes; it arrives with the frame results and becomes
``highlight.caption``. A caption that fails or does not come leaves it null; the job
never fails over its caption.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from clipline_core import metrics as m
from clipline_core.constants import PriorityClass
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.job import ACTIVE, JobSpec, JobState
from clipline_core.settings import Settings
from clipline_core.store import JobStore, holder_identity, holder_is_dead
from gpu_service import protocol
from gpu_service.client import GpuClient
from workers import callbacks, decode, fetch, localize, preprocess, render, select, upload
from workers.app import make_app

log = logging.getLogger("clipline.worker")


def lease_seconds(settings: Settings) -> float:
    """How long a job's lease lasts without renewal (renewed every third of it).

    ``Settings.job_lease_s``: a job whose worker died is recovered about this long after.
    """
    return max(1.0, settings.job_lease_s)


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


def timeout_error(limit_s: float) -> ClipError:
    """The error of a job stopped by its time limit."""
    within = f" of {limit_s:.0f} s" if limit_s else ""
    return ClipError(
        ErrorCode.TIMEOUT, f"the job did not finish within the time limit{within}", transient=False
    )


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

    def run(self, job_id: str, soft_limit_s: float | None = None) -> Result:
        """Run (or skip) one delivery of ``job_id``; ``soft_limit_s`` is for messages."""
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
            with _Lease(self.store, job_id, token, lease_s) as lease:
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
            m.JOBS_IN_FLIGHT.dec()
            shutil.rmtree(scratch, ignore_errors=True)

    # ------------------------------------------------------------------------------
    def _advance(self, job_id: str, to: JobState, token: str, **fields: Any) -> None:
        if not self.store.advance(job_id, to, token, **fields):
            raise Cancelled()

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
        sink = preprocess.SlotSink(
            self.gpu.producer, job_id, preprocess.generation(attempt), priority, created_at
        )
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
                info = decode.sample_video(video_path, self.settings, sink)
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
            if spec.upload_url:
                dest = scratch / "clip.mp4"
            else:
                dest = self.settings.artifacts_path / f"{job_id}.mp4"
            clip = render.render(
                video_path,
                dest,
                choice.start_s,
                n_frames,
                info.fps,
                self.settings.ffmpeg,
                first_frame=first,
            )
        url: str | None = None
        if spec.upload_url:
            with stage("upload", timings):
                url = upload.put_file(spec.upload_url, clip.path, self.settings)
        last = first + clip.frames
        end_s = float(info.times[last]) if last < info.decoded_frames else info.duration_s
        timings["total"] = round(time.time() - created_at, 6)
        highlight = {
            "start_s": round(choice.start_s, 6),
            "end_s": round(max(end_s, choice.start_s), 6),
            "score": round(choice.score, 6),
            "path": None if url else str(clip.path),
            "url": url,
            "codec": clip.codec,
            "audio": clip.audio,
            "frames": clip.frames,
            "caption": results.caption.caption if results.caption else None,
            "product": choice.product,
        }
        if not self.store.finish(
            job_id,
            JobState.SUCCEEDED,
            allowed_from=ACTIVE,
            lease=token,
            highlight=highlight,
            timings=timings,
        ):
            if not url:
                dest.unlink(missing_ok=True)
            raise Cancelled()
        log.info(
            "job %s succeeded: %.2f-%.2f s (score %.3f)",
            job_id,
            choice.start_s,
            highlight["end_s"],
            choice.score,
        )

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
            log.warning("job %s attempt %d: %s (will retry)", job_id, attempt, err.message)
            back = self.store.requeue(job_id, token, err.to_dict())
            return Result(Outcome.RETRY if back else Outcome.SKIPPED, err, attempt)
        log.warning("job %s failed: %s: %s", job_id, err.code.value, err.message)
        if self.store.finish(
            job_id, JobState.FAILED, allowed_from=ACTIVE, lease=token, error=err.to_dict()
        ):
            return Result(Outcome.FAILED, err, attempt)
        return Result(Outcome.SKIPPED, err, attempt)

    def _fail_unleased(self, job_id: str, err: ClipError) -> None:
        self.store.finish(job_id, JobState.FAILED, error=err.to_dict())
