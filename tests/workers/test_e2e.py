"""Jobs through the real stack: GPU daemon process, Celery prefork worker, Redis.

One stack for the module (``LocalStack``: ``python -m gpu_service`` on the CPU and
``celery -A workers.app worker`` with one pool child), so the order in which jobs
start is observable without timing races: a first job is held in its fetch by the
local HTTP server while the others queue up behind it; once it is released the single
child takes the rest one at a time, and each job's ``started_at`` says when.

Covered: priority classes and arrival order, a pool child SIGKILLed mid-job, the
whole worker killed mid-job, duplicate delivery, idempotent submission, soft and hard
time limits, presigned PUT upload, scratch cleanup, and the worker's metrics endpoint.
The tests share the worker, so they run in file order and each leaves it idle.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from wlib import Clips, Origin, free_port

from clipline.stack import LocalStack
from clipline_core import constants
from clipline_core.job import Job, JobSpec, JobState
from clipline_core.settings import Settings
from clipline_core.store import JobStore
from workers.app import make_app
from workers.submit import submit

pytestmark = pytest.mark.slow

LEASE_S = 3.0


class Stack:
    def __init__(self, settings: Settings, local: LocalStack, media: Path, origin: Origin):
        self.settings = settings
        self.local = local
        self.media = media
        self.origin = origin
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.store = JobStore(self.redis, settings.deployment, settings.terminal_ttl_s)
        self.app = make_app(settings)
        self.video = media / "tiny.avi"
        self.image = media / "product.jpg"

    def spec(self, video: str | None = None, **kw: Any) -> JobSpec:
        return JobSpec(
            video_url=video or str(self.video), image_urls=[str(self.image)], duration_s=1.0, **kw
        )

    def submit(self, video: str | None = None, key: str | None = None, **kw: Any) -> str:
        return submit(self.store, self.app, self.spec(video, **kw), key)[0]

    def wait(self, job_id: str, timeout: float = 90.0) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.store.get(job_id)
            if job is not None and job.terminal:
                return job
            time.sleep(0.1)
        raise AssertionError(
            f"job {job_id} not finished: {self.store.raw(job_id)}\n"
            + self.local.log_tail("worker", 40)
        )

    def wait_state(self, job_id: str, state: JobState, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.store.state(job_id) != state:
            assert time.monotonic() < deadline, (job_id, self.store.raw(job_id))
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.settings.worker_metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("clipline_"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def job_stats(self) -> dict[str, float]:
        """The job outcome and state samples (kept in Redis; the job API exports them)."""
        from prometheus_client import generate_latest
        from prometheus_client.registry import CollectorRegistry

        from clipline_core.job_metrics import JobStatsCollector

        registry = CollectorRegistry()
        registry.register(JobStatsCollector(self.redis, self.settings.deployment))
        out: dict[str, float] = {}
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith("clipline_"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def gated(self, name: str) -> tuple[str, Any, threading.Event]:
        gate = threading.Event()
        route = self.origin.add(f"/{name}.avi", body=self.video.read_bytes(), gate=gate)
        return self.origin.base + f"/{name}.avi", route, gate

    def submit_watched(self, video: str) -> tuple[str, Any]:
        """Store a job, subscribe to its transitions, then send its task."""
        job_id = self.store.create(self.spec(video))[0]
        pubsub = self.redis.pubsub()
        pubsub.subscribe(self.store.channel(job_id))
        pubsub.get_message(timeout=1)
        self.send(job_id)
        return job_id, pubsub

    def send(self, job_id: str, **options: Any) -> None:
        self.app.send_task(
            constants.CELERY_TASK_PROCESS_JOB,
            args=[job_id],
            queue=constants.queue_name(self.settings.deployment),
            **options,
        )

    def scratch_clean(self, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        root = self.settings.scratch_path
        while time.monotonic() < deadline:
            if not root.exists() or not any(root.iterdir()):
                return True
            time.sleep(0.25)
        return False

    def worker_pids(self) -> tuple[int, list[int]]:
        main = self.local.procs["worker"].pid
        children = [int(p) for p in Path(f"/proc/{main}/task/{main}/children").read_text().split()]
        return main, children


def drain(pubsub: Any, seconds: float = 0.5) -> list[str]:
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.1)
        if msg and msg["type"] == "message":
            seen.append(msg["data"].decode())
    return seen


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    clips: Clips,
    module_origin: Origin,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    media = tmp / "media"
    media.mkdir()
    (media / "tiny.avi").write_bytes(clips.tiny.read_bytes())
    (media / "product.jpg").write_bytes(clips.product.read_bytes())
    settings = Settings(
        deployment=f"t-e2e-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        state_dir=str(tmp / "state"),
        local_roots=str(media),
        allow_loopback=True,
        shm_slots=8,
        shm_slot_bytes=1 << 20,
        frame_size=64,
        sample_fps=4.0,
        worker_concurrency=1,
        worker_metrics_port=free_port(),
        fetch_retries=1,
        fetch_read_timeout_s=60.0,
        inference_timeout_s=60.0,
        job_soft_time_limit_s=0.0,  # none by default: the hard limit test relies on it
        job_time_limit_s=90.0,
        max_attempts=4,
        terminal_ttl_s=600,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPLINE_JOB_LEASE_S", str(LEASE_S))
        local = LocalStack(settings, workers=1)
        local.start(timeout_s=120)
        try:
            yield Stack(settings, local, media, module_origin)
        finally:
            if os.environ.get("CLIPLINE_TEST_KEEP_LOGS"):
                print(local.log_tail("worker", 400))
            local.stop()


def test_priority_classes_then_arrival_order(stack: Stack) -> None:
    url, route, gate = stack.gated("blocker")
    blocker = stack.submit(url)
    assert route.entered.wait(30), stack.local.log_tail("worker")
    order = [("low", "L1"), ("low", "L2"), ("normal", "N1"), ("high", "H1"), ("high", "H2")]
    ids = {}
    for prio, name in order:
        ids[name] = stack.submit(priority=prio, title=name)
        time.sleep(0.01)
    # The backlog gauge per class, as the worker's main process reports it.
    deadline = time.monotonic() + 15
    want = {"high": 2.0, "normal": 1.0, "low": 2.0}
    while True:
        m = stack.metrics()
        got = {p: m.get(f'clipline_backlog_jobs{{priority="{p}"}}') for p in want}
        if got == want:
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    assert m["clipline_jobs_in_flight"] == 1.0
    gate.set()
    jobs = {name: stack.wait(job_id) for name, job_id in ids.items()}
    first = stack.wait(blocker)
    assert first.state == JobState.SUCCEEDED
    assert all(j.state == JobState.SUCCEEDED for j in jobs.values()), {
        n: j.error for n, j in jobs.items()
    }
    started = sorted(jobs, key=lambda n: jobs[n].started_at or 0)
    assert started == ["H1", "H2", "N1", "L1", "L2"]
    assert all((jobs[n].started_at or 0) > (first.started_at or 0) for n in jobs)


def test_pool_child_killed_mid_job_completes_exactly_once(stack: Stack) -> None:
    url, route, gate = stack.gated("killed")
    job_id, events = stack.submit_watched(url)
    assert route.entered.wait(30)
    owner = stack.store.raw(job_id)["lease_owner"]
    pid = int(owner.rsplit(":", 2)[1])
    assert pid in stack.worker_pids()[1]
    os.kill(pid, signal.SIGKILL)
    gate.set()
    job = stack.wait(job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.attempt == 2  # the redelivered task took over from the dead child at once
    assert route.hits == 2
    seen = drain(events, 1.0)
    events.close()
    assert seen.count("succeeded") == 1 and seen.count("fetching") == 2
    assert job.highlight is not None and Path(job.highlight.path or "").is_file()
    assert stack.scratch_clean(), list(stack.settings.scratch_path.iterdir())


def test_duplicate_delivery_does_the_work_once(stack: Stack) -> None:
    url, route, gate = stack.gated("dup")
    job_id, events = stack.submit_watched(url)
    for _ in range(2):  # the same task delivered twice more
        stack.send(job_id)
    assert route.entered.wait(30)
    gate.set()
    job = stack.wait(job_id)
    assert job.state == JobState.SUCCEEDED and job.attempt == 1
    time.sleep(2.0)  # let the duplicates arrive and find the job finished
    deadline = time.monotonic() + 20
    while any(stack.redis.llen(q) for q in _queues(stack)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)
    seen = drain(events, 0.5)
    events.close()
    assert route.hits == 1
    assert seen.count("fetching") == 1 and seen.count("succeeded") == 1
    assert stack.store.get(job_id).attempt == 1  # type: ignore[union-attr]


def _queues(stack: Stack) -> list[str]:
    from workers.submit import queue_list

    return [queue_list(stack.settings.deployment, c) for c in constants.PriorityClass]


def test_idempotent_submission_runs_one_job(stack: Stack) -> None:
    url = stack.origin.file("/idem.avi", stack.video)
    a = stack.submit(url, key="order-42")
    b = stack.submit(url, key="order-42")
    assert a == b
    job = stack.wait(a)
    assert job.state == JobState.SUCCEEDED
    time.sleep(1.0)
    assert stack.origin.server.routes["/idem.avi"].hits == 1


def test_a_running_job_reports_its_progress(stack: Stack) -> None:
    """The worker writes ``progress`` into the job while it runs, at most every 0.5 s.

    Held in its fetch, the job says so; once it runs on, every write has no more chunks
    scored than sent, frames once it decoded; the API's view shows progress only while
    the job runs.
    """
    from clipline_core.schema import job_view
    from workers.pipeline import PROGRESS_INTERVAL_S

    url, route, gate = stack.gated("progress")
    job_id = stack.submit(url)
    assert route.entered.wait(30)
    deadline = time.monotonic() + 10 * PROGRESS_INTERVAL_S
    while "progress" not in stack.store.raw(job_id):
        assert time.monotonic() < deadline, stack.store.raw(job_id)
        time.sleep(0.02)
    held = stack.store.get(job_id)
    assert held is not None and held.progress is not None
    assert (held.progress.stage, held.progress.frames, held.progress.chunks) == ("fetching", 0, 0)
    assert job_view(held).progress == held.progress
    seen: dict[float, dict[str, Any]] = {}
    gate.set()
    while True:
        raw = stack.store.raw(job_id)
        if raw.get("progress"):
            p = json.loads(raw["progress"])
            seen[p["at"]] = p
        if raw["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.01)
    done = stack.wait(job_id)
    assert done.state == JobState.SUCCEEDED, done.error
    assert job_view(done).progress is None
    stamps = sorted(seen)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(g >= PROGRESS_INTERVAL_S - 0.05 for g in gaps), gaps
    for p in seen.values():
        assert 0 <= p["chunks_done"] <= p["chunks"], p
        if p["stage"] in ("inferring", "rendering"):
            assert p["frames"] > 0 and p["chunks"] >= 1, p


def test_presigned_upload(stack: Stack) -> None:
    route = stack.origin.add("/bucket/clip.mp4", put_statuses=[503, 200])
    job_id = stack.submit(upload_url=stack.origin.base + "/bucket/clip.mp4?X-Signature=s3cr3t")
    job = stack.wait(job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.highlight is not None
    assert job.highlight.url == stack.origin.base + "/bucket/clip.mp4"
    assert job.highlight.path is None
    assert route.hits == 2 and len(route.uploads) == 1
    body = route.uploads[0][1]
    assert body[4:8] == b"ftyp" and len(body) > 1000
    assert "s3cr3t" not in stack.store.raw(job_id)["highlight"]


def test_time_limits_end_jobs_with_timeout(stack: Stack) -> None:
    url, _, gate = stack.gated("soft")
    soft = stack.store.create(stack.spec(url))[0]
    stack.send(soft, soft_time_limit=2)
    job = stack.wait(soft)
    assert job.state == JobState.FAILED and job.error is not None
    assert job.error.code == "timeout" and "2 s" in job.error.message, job.error
    gate.set()
    url, _, gate = stack.gated("hard")
    hard = stack.store.create(stack.spec(url))[0]
    stack.send(hard, time_limit=2)  # no soft limit: the child is killed at 2 s
    job = stack.wait(hard)
    assert job.state == JobState.FAILED and job.error is not None
    assert job.error.code == "timeout" and "time limit of 2 s" in job.error.message
    gate.set()
    assert stack.scratch_clean(), list(stack.settings.scratch_path.iterdir())
    assert stack.job_stats()['clipline_job_failures_total{code="timeout"}'] >= 2


def test_metrics_of_all_pool_children(stack: Stack) -> None:
    m = stack.metrics()
    assert stack.job_stats()['clipline_jobs_total{status="succeeded"}'] >= 9
    for stage in ("fetch", "decode", "inference", "render", "upload"):
        assert m[f'clipline_stage_seconds_count{{stage="{stage}"}}'] >= 1, stage
    assert m["clipline_frames_decoded_total"] >= 9 * 8
    assert m["clipline_jobs_in_flight"] == 0.0
    for p in ("high", "normal", "low"):
        assert m[f'clipline_backlog_jobs{{priority="{p}"}}'] == 0.0
    assert not any('pid="' in k for k in m)
    # only the workers' own series: job outcomes are the API's, the arena's the daemon's
    assert not any(k.startswith(("clipline_jobs_total", "clipline_shm_slots")) for k in m)
    info = [k for k in m if k.startswith("clipline_build_info{")]
    assert len(info) == 1 and 'role="workers"' in info[0] and m[info[0]] == 1.0


def test_whole_worker_killed_mid_job_comes_back(stack: Stack) -> None:
    url, route, gate = stack.gated("lost")
    job_id = stack.submit(url)
    assert route.entered.wait(30)
    main, _ = stack.worker_pids()
    os.killpg(main, signal.SIGKILL)  # the main process and its pool child
    stack.local.procs["worker"].wait(10)
    stack.local.procs.pop("worker")
    gate.set()
    stack.local.start_one("worker")
    job = stack.wait(job_id, timeout=60)
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.attempt == 2
    assert route.hits == 2
    assert stack.scratch_clean(), list(stack.settings.scratch_path.iterdir())
