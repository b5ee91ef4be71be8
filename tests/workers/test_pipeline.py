"""One job on a worker, in this process: errors, retries, takeover, cleanup, metrics.

The runner is the one the Celery task uses, on real Redis, real files and a real local
HTTP server. These jobs stop before inference (or find no GPU daemon on purpose), so no
daemon runs here; the full path with the daemon is in ``test_e2e.py``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from wlib import Clips, Origin

from clipline_core import metrics
from clipline_core.constants import Metric, MetricRole
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.job import JobSpec, JobState
from clipline_core.job_metrics import JobStatsCollector
from clipline_core.settings import Settings
from clipline_core.store import holder_identity
from workers import upload
from workers.pipeline import JobRunner, Outcome


def counter(name: str, **labels: str) -> float:
    """A sample of the workers' own metrics (in this process: the runner runs here)."""
    return metrics.registry(MetricRole.WORKERS).get_sample_value(name, labels) or 0.0


def failures(r: JobRunner, code: str) -> float:
    """``clipline_job_failures_total{code}`` as the job API would export it."""
    for family in JobStatsCollector(r.store.r, r.store.deployment).collect():
        for s in family.samples:
            if s.name == Metric.JOB_FAILURES_TOTAL and s.labels == {"code": code}:
                return float(s.value)
    return 0.0


@pytest.fixture
def runner(wsettings: Settings, redis_client: redis.Redis) -> Iterator[JobRunner]:
    r = JobRunner(wsettings.replace(max_attempts=2), redis_client)
    yield r
    r.gpu.producer.close()


def submit(r: JobRunner, video: str, image: str, **kw: Any) -> str:
    spec = JobSpec(video_url=video, image_urls=[image], **kw)
    return r.store.create(spec)[0]


def scratch_empty(s: Settings) -> bool:
    root = s.scratch_path
    return not root.exists() or not any(root.iterdir())


def test_a_permanent_error_fails_the_job_with_its_code(
    runner: JobRunner, clips: Clips, tmp_path: Path
) -> None:
    img = tmp_path / "p.jpg"
    img.write_bytes(clips.product.read_bytes())
    before = failures(runner, "forbidden_source")
    fetches = counter("clipline_stage_seconds_count", stage="fetch")
    job_id = submit(runner, "http://10.0.0.1/video.mp4", str(img))
    result = runner.run(job_id)
    assert result.outcome == Outcome.FAILED
    job = runner.store.get(job_id)
    assert job is not None and job.state == JobState.FAILED and job.attempt == 1
    assert job.error is not None and job.error.code == "forbidden_source"
    assert "private-network" in job.error.message
    assert failures(runner, "forbidden_source") == before + 1
    assert counter("clipline_stage_seconds_count", stage="fetch") == fetches + 1
    assert counter("clipline_jobs_in_flight") == 0
    assert scratch_empty(runner.settings)
    assert runner.run(job_id).outcome == Outcome.SKIPPED  # redelivered: a no-op


def test_transient_errors_retry_then_fail(
    runner: JobRunner, origin: Origin, clips: Clips, tmp_path: Path
) -> None:
    img = tmp_path / "p.jpg"
    img.write_bytes(clips.product.read_bytes())
    origin.add("/v.avi", fail_first=100, fail_status=503)
    job_id = submit(runner, origin.base + "/v.avi", str(img))
    first = runner.run(job_id)
    assert first.outcome == Outcome.RETRY and first.attempt == 1
    raw = runner.store.raw(job_id)
    assert raw["state"] == "queued" and json.loads(raw["last_error"])["code"] == "fetch_failed"
    second = runner.run(job_id)  # the last attempt allowed (max_attempts=2)
    assert second.outcome == Outcome.FAILED
    job = runner.store.get(job_id)
    assert job is not None and job.error is not None and job.error.code == "fetch_failed"
    assert job.attempt == 2
    assert origin.server.routes["/v.avi"].hits == 2 * (runner.settings.fetch_retries + 1)
    assert scratch_empty(runner.settings)


def test_no_gpu_daemon_is_gpu_unavailable_and_retried(
    runner: JobRunner, clips: Clips, tmp_path: Path
) -> None:
    video, img = tmp_path / "v.avi", tmp_path / "p.jpg"
    video.write_bytes(clips.tiny.read_bytes())
    img.write_bytes(clips.product.read_bytes())
    job_id = submit(runner, str(video), str(img))
    result = runner.run(job_id)
    assert result.outcome == Outcome.RETRY
    assert result.error is not None and result.error.code == ErrorCode.GPU_UNAVAILABLE
    assert runner.store.state(job_id) == JobState.QUEUED
    assert scratch_empty(runner.settings)


def test_duplicate_delivery_leaves_a_live_holder_alone(
    runner: JobRunner, clips: Clips, tmp_path: Path
) -> None:
    img = tmp_path / "p.jpg"
    img.write_bytes(clips.product.read_bytes())
    job_id = submit(runner, str(tmp_path / "missing.avi"), str(img))
    assert runner.store.claim(job_id, "LIVE", 30, 5, holder=holder_identity())[0] == 1
    assert runner.run(job_id).outcome == Outcome.SKIPPED
    raw = runner.store.raw(job_id)
    assert raw["lease"] == "LIVE" and raw["attempt"] == "1"


def test_redelivery_after_the_holder_died_takes_over_at_once(
    runner: JobRunner, clips: Clips, tmp_path: Path
) -> None:
    img = tmp_path / "p.jpg"
    img.write_bytes(clips.product.read_bytes())
    job_id = submit(runner, str(tmp_path / "missing.avi"), str(img))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = holder_identity(proc.pid)
    proc.wait()
    assert runner.store.claim(job_id, "GONE", 30, 5, holder=dead)[0] == 1
    result = runner.run(job_id)
    assert result.outcome == Outcome.FAILED and result.attempt == 2
    job = runner.store.get(job_id)
    assert job is not None and job.error is not None and job.error.code == "not_found"


def test_cancel_while_fetching(
    runner: JobRunner, origin: Origin, clips: Clips, tmp_path: Path
) -> None:
    img = tmp_path / "p.jpg"
    img.write_bytes(clips.product.read_bytes())
    gate = threading.Event()
    route = origin.add("/v.avi", body=clips.tiny.read_bytes(), gate=gate)
    job_id = submit(runner, origin.base + "/v.avi", str(img))
    out: list[Outcome] = []
    t = threading.Thread(target=lambda: out.append(runner.run(job_id).outcome))
    t.start()
    assert route.entered.wait(10)
    assert runner.store.cancel(job_id)
    gate.set()
    t.join(30)
    assert out == [Outcome.SKIPPED]
    assert runner.store.state(job_id) == JobState.CANCELLED
    assert scratch_empty(runner.settings)


def test_soft_time_limit_fails_with_timeout_and_cleans_up(
    runner: JobRunner, origin: Origin, clips: Clips, tmp_path: Path
) -> None:
    """The soft limit arrives as Celery delivers it: an exception raised by a signal."""
    img = tmp_path / "p.jpg"
    img.write_bytes(clips.product.read_bytes())
    gate = threading.Event()
    route = origin.add("/v.avi", body=clips.tiny.read_bytes(), stall_s=30.0, gate=gate)
    gate.set()
    job_id = submit(runner, origin.base + "/v.avi", str(img))
    slow = runner.settings.replace(fetch_read_timeout_s=60.0)
    runner.settings = slow

    def soft_limit(*_: object) -> None:
        raise SoftTimeLimitExceeded()

    old = signal.signal(signal.SIGALRM, soft_limit)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        start = time.monotonic()
        result = runner.run(job_id)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - start < 10
    assert route.hits == 1
    assert result.outcome == Outcome.FAILED
    job = runner.store.get(job_id)
    assert job is not None and job.error is not None and job.error.code == "timeout"
    assert "time limit" in job.error.message
    assert scratch_empty(runner.settings)


# ---------------------------------------------------------------------------
# Presigned PUT uploads.
# ---------------------------------------------------------------------------
def test_upload_with_retries(wsettings: Settings, origin: Origin, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    route = origin.add("/bucket/clip.mp4", put_statuses=[503, 500, 200])
    url = upload.put_file(origin.base + "/bucket/clip.mp4?X-Sig=secret", clip, wsettings, sleep=0)
    assert url == origin.base + "/bucket/clip.mp4"  # the signature is never kept
    assert route.hits == 3 and len(route.uploads) == 1
    headers, body = route.uploads[0]
    assert body == clip.read_bytes()
    assert headers["content-length"] == str(len(body))
    assert headers["content-type"] == "video/mp4"


def test_upload_refusals(settings: Settings, origin: Origin, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"data")
    s = settings.replace(fetch_retries=2)
    route = origin.add("/expired", put_statuses=[403])
    with pytest.raises(ClipError) as e:
        upload.put_file(origin.base + "/expired?sig=x", clip, s, sleep=0)
    assert e.value.code == ErrorCode.UPLOAD_FAILED and not e.value.transient
    assert "403" in e.value.message and "sig=x" not in e.value.message and route.hits == 1
    down = origin.add("/down", put_statuses=[503] * 5)
    with pytest.raises(ClipError) as e:
        upload.put_file(origin.base + "/down", clip, s, sleep=0)
    assert e.value.code == ErrorCode.UPLOAD_FAILED and e.value.transient and down.hits == 3
    with pytest.raises(ClipError) as e:
        upload.put_file("http://192.168.0.10/b/c.mp4", clip, s, sleep=0)
    assert e.value.code == ErrorCode.FORBIDDEN_SOURCE


def test_public_url() -> None:
    assert (
        upload.public_url("https://user:pw@bucket.example.com/a/b.mp4?X-Amz-Signature=s#f")
        == "https://bucket.example.com/a/b.mp4"
    )
