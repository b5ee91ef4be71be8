"""How jobs look to Celery's own tools: task ids, states, retries, memory, the app's Redis.

A real Celery worker (``celery -A workers.app worker``, prefork, one child, no GPU
daemon: the jobs here end before inference) runs jobs while a real Celery event
receiver (what Flower and ``celery events`` use) records the task events of this
deployment's jobs. Checked:

* every message of a job has the job's id as its task id (submit, the retries, the
  housekeeping's re-sends), read from the broker's lists and from the worker's events;
* a job that fails ends its task in ``FAILURE`` with the error code, once: no retry, no
  redelivery, the message acknowledged, one log line without a traceback;
* a retry's countdown is Celery's ``get_exponential_backoff_interval`` of the task's
  ``retry_backoff``/``retry_backoff_max``/``retry_jitter`` options (set from the
  settings), the retried message keeps the id;
* ``worker_max_memory_mb`` replaces a pool child that passed it after its job;
* ``celery -A workers.app inspect`` in a shell without ``CLIPLINE_REDIS_URL`` finds the
  local stack recorded in ``stack.json``, and warns when there is none.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.utils.time import get_exponential_backoff_interval
from wlib import Clips, Origin

from clipline_core import constants, stackstate
from clipline_core.job import JobSpec, JobState
from clipline_core.procs import start_time
from clipline_core.settings import ENV_PREFIX, Settings
from clipline_core.store import JobStore
from workers import monitor
from workers.app import DEFAULT_REDIS_URL, make_app, max_memory_per_child_kib, worker_argv
from workers.submit import queue_list, submit
from workers.tasks import JobFailed, task_retry_countdown

ROOT = Path(__file__).resolve().parents[2]
BACKOFF_S = 1.6  # Celery's retry_backoff takes whole seconds: 1, 2, 4 ...
MAX_ATTEMPTS = 3


def _task(app: Any) -> Any:
    app.loader.import_default_modules()
    return app.tasks[constants.CELERY_TASK_PROCESS_JOB]


def _broker_ids(client: redis.Redis, deployment: str) -> list[str]:
    """Task ids of the messages waiting in every priority list of the job queue."""
    ids = []
    for cls in constants.PriorityClass:
        for raw in client.lrange(queue_list(deployment, cls), 0, -1):
            message = json.loads(raw)
            ids.append(message["headers"]["id"])
            assert json.loads(base64.b64decode(message["body"]))[0] == [message["headers"]["id"]]
    return ids


# ---------------------------------------------------------------------------
# The app and its messages (no worker).
# ---------------------------------------------------------------------------
def test_task_options_follow_the_settings(settings: Settings) -> None:
    app = make_app(
        settings.replace(
            retry_backoff_s=3.0, retry_backoff_max_s=20.0, retry_jitter=False, shm_slots=2
        )
    )
    task = _task(app)
    assert (task.retry_backoff, task.retry_backoff_max, task.retry_jitter) == (3.0, 20.0, False)
    assert task.throws == (JobFailed,) and not getattr(task, "autoretry_for", ())
    assert app.conf.task_acks_late and app.conf.task_acks_on_failure_or_timeout
    assert not app.conf.worker_deduplicate_successful_tasks
    arena_kib = 2 * settings.shm_slot_bytes // 1024
    assert app.conf.worker_max_memory_per_child == 1536 * 1024 + arena_kib
    assert max_memory_per_child_kib(settings.replace(worker_max_memory_mb=0)) is None
    # Celery's interval function, with the task's own options: whole seconds, doubling.
    assert [task_retry_countdown(task, a) for a in range(1, 6)] == [3.0, 6.0, 12.0, 20.0, 20.0]


def test_jittered_countdown_is_celerys_full_jitter(settings: Settings) -> None:
    task = _task(make_app(settings.replace(retry_backoff_s=4.0, retry_backoff_max_s=30.0)))
    assert task.retry_jitter is True
    for attempt in range(1, 8):
        seed = random.random()
        random.seed(seed)
        ours = task_retry_countdown(task, attempt)
        random.seed(seed)
        assert ours == get_exponential_backoff_interval(4, attempt - 1, 30, full_jitter=True)
        assert 0 <= ours <= min(30, 4 * 2 ** (attempt - 1))


def test_every_send_of_a_job_uses_the_job_id(settings: Settings, redis_client: redis.Redis) -> None:
    app = make_app(settings)
    store = JobStore(redis_client, settings.deployment)
    job_id, created = submit(store, app, JobSpec(video_url="/v.mp4", image_urls=["/i.jpg"]))
    assert created and _broker_ids(redis_client, settings.deployment) == [job_id]
    # The housekeeping's re-sends: a lost lease, then a held message whose holder died.
    for q in (queue_list(settings.deployment, c) for c in constants.PriorityClass):
        redis_client.delete(q)
    mon = monitor.Monitor(app, settings, None)
    try:
        store.claim(job_id, "L", 0.1, 5)
        time.sleep(0.3)
        assert mon.recover() == [job_id]
        assert _broker_ids(redis_client, settings.deployment) == [job_id]
        store.hold(job_id, f"{socket.gethostname()}:999999999:1", 0.0)
        assert mon.resend_held() == [job_id]
        assert _broker_ids(redis_client, settings.deployment) == [job_id, job_id]
    finally:
        mon.close()
        for q in (queue_list(settings.deployment, c) for c in constants.PriorityClass):
            redis_client.delete(q)


# ---------------------------------------------------------------------------
# A real worker, watched through Celery's events.
# ---------------------------------------------------------------------------
class Events:
    """A Celery event receiver (a thread) keeping the task events of some task ids."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self.hostnames: set[str] = set()
        self.lock = threading.Lock()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, name="events", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            if event.get("type", "").startswith("worker-"):
                self.hostnames.add(event.get("hostname", ""))
            else:
                self.events.append(event)

    def of(self, task_id: str, kind: str = "") -> list[dict[str, Any]]:
        with self.lock:
            return [
                e
                for e in self.events
                if e.get("uuid") == task_id and (not kind or e["type"] == f"task-{kind}")
            ]

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(5)


class Worker:
    def __init__(self, settings: Settings, media: Path, log: Path) -> None:
        self.settings = settings
        self.media = media
        self.log = log
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.store = JobStore(self.redis, settings.deployment, settings.terminal_ttl_s)
        self.app = make_app(settings)
        self.hostname = f"{settings.deployment}@{socket.gethostname()}"
        self.events = Events(self.app)
        cmd = [
            sys.executable,
            "-m",
            "celery",
            *worker_argv(settings, 1, self.hostname, "--without-mingle", "--loglevel", "INFO"),
        ]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)},
            **settings.to_env(),
            "PYTHONUNBUFFERED": "1",
        }
        self.fh = log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.fh, stderr=self.fh)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def until(self, what: Any, timeout: float, why: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = what()
            if got:
                return got
            assert self.proc.poll() is None, f"worker exited\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"{why}\n{self.text()[-4000:]}"
            time.sleep(0.05)

    def submit(self, video: str) -> str:
        spec = JobSpec(video_url=video, image_urls=[str(self.media / "product.jpg")])
        return submit(self.store, self.app, spec)[0]

    def finished(self, job_id: str, timeout: float = 60.0) -> Any:
        def done() -> Any:
            job = self.store.get(job_id)
            return job if job is not None and job.terminal else None

        return self.until(done, timeout, f"job {job_id} did not finish")

    def stop(self) -> None:
        self.events.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.fh.close()


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, clips: Clips, module_origin: Origin
) -> Iterator[Worker]:
    tmp = tmp_path_factory.mktemp("celery-fit")
    media = tmp / "media"
    media.mkdir()
    (media / "product.jpg").write_bytes(clips.product.read_bytes())
    settings = Settings(
        deployment=f"t-fit-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        state_dir=str(tmp / "state"),
        local_roots=str(media),
        allow_loopback=True,
        shm_slots=2,
        shm_slot_bytes=1 << 16,
        worker_concurrency=1,
        worker_metrics_port=0,
        fetch_retries=0,
        fetch_connect_timeout_s=2.0,
        fetch_read_timeout_s=5.0,
        max_attempts=MAX_ATTEMPTS,
        retry_backoff_s=BACKOFF_S,
        retry_jitter=False,
        # A message waits in the main process while a replaced child starts: a long
        # lease keeps the held-message sweeper from re-sending it as overdue meanwhile.
        job_lease_s=30.0,
        # Far below what a child uses: every child is replaced after its job.
        worker_max_memory_mb=1,
        terminal_ttl_s=600,
    )
    w = Worker(settings, media, tmp / "worker.log")
    try:
        w.until(lambda: w.hostname in w.events.hostnames, 90, "no worker-online event")
        yield w
    finally:
        w.stop()
        if os.environ.get("CLIPLINE_TEST_KEEP_LOGS"):
            print(w.text())


def _eta(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["eta"]).timestamp()


@pytest.mark.slow
def test_a_failed_job_ends_in_failure_with_its_code_once(worker: Worker) -> None:
    job_id = worker.submit(str(worker.media / "missing.avi"))  # in the roots, not there
    job = worker.finished(job_id)
    assert job.state == JobState.FAILED and job.error.code == "not_found"
    failed = worker.until(lambda: worker.events.of(job_id, "failed"), 30, "no task-failed event")
    assert failed[0]["exception"].startswith("JobFailed('not_found', "), failed[0]
    assert worker.hostname == failed[0]["hostname"]
    # Acknowledged, not retried, not redelivered: one delivery of the one message.
    time.sleep(1.5)
    assert len(worker.events.of(job_id, "received")) == 1
    assert not worker.events.of(job_id, "retried") and not worker.events.of(job_id, "succeeded")
    assert not _broker_ids(worker.redis, worker.settings.deployment)
    assert not [v for v in worker.redis.hvals("unacked") if job_id.encode() in v]
    # An expected failure: one INFO line, no traceback.
    text = worker.text()
    line = [ln for ln in text.splitlines() if job_id in ln and "raised expected" in ln]
    assert len(line) == 1 and "JobFailed('not_found'" in line[0], text[-3000:]
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.slow
def test_retries_keep_the_id_and_follow_celerys_backoff(
    worker: Worker, module_origin: Origin
) -> None:
    route = module_origin.add("/always-503.avi", fail_first=1000)
    job_id = worker.submit(module_origin.base + "/always-503.avi")
    job = worker.finished(job_id, 90)
    assert job.state == JobState.FAILED and job.error.code == "fetch_failed", job.error
    assert job.attempt == MAX_ATTEMPTS and route.hits == MAX_ATTEMPTS
    failed = worker.until(lambda: worker.events.of(job_id, "failed"), 30, "no task-failed event")
    assert failed[0]["exception"].startswith("JobFailed('fetch_failed', ")
    received = worker.events.of(job_id, "received")
    retried = worker.events.of(job_id, "retried")
    assert len(received) == MAX_ATTEMPTS and len(retried) == MAX_ATTEMPTS - 1
    assert [e["retries"] for e in received] == list(range(MAX_ATTEMPTS))
    assert received[0]["eta"] is None
    want = [
        get_exponential_backoff_interval(int(BACKOFF_S), n, 60, full_jitter=False)
        for n in range(MAX_ATTEMPTS - 1)
    ]
    assert want == [1, 2]  # whole seconds: not 1.6 and 3.2
    for n, (retry, again) in enumerate(zip(retried, received[1:], strict=True)):
        countdown = _eta(again) - retry["timestamp"]
        assert abs(countdown - want[n]) < 0.5, (n, countdown, want)
    # The job's error code is in the last state Flower shows for the id: FAILURE.
    last = max(worker.events.of(job_id), key=lambda e: e["timestamp"])
    assert last["type"] == "task-failed"


def _children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


@pytest.mark.slow
def test_a_child_past_the_memory_bound_is_replaced(worker: Worker) -> None:
    main = worker.proc.pid
    for _ in range(2):
        before = worker.until(lambda: _children(main), 30, "no pool child")
        job_id = worker.submit(str(worker.media / "gone.avi"))
        assert worker.finished(job_id).state == JobState.FAILED
        # The child that ran the job exits after it; a fresh one takes its place.
        after = worker.until(
            lambda b=before: (c := _children(main)) and not c & b and c, 60, "child not replaced"
        )
        assert len(after) == 1


@pytest.mark.slow
def test_inspect_without_a_redis_url_finds_the_local_stack(worker: Worker, tmp_path: Path) -> None:
    settings = worker.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "REDIS_URL"}
    env.update(
        {
            "CLIPLINE_STATE_DIR": settings.state_dir,
            "CLIPLINE_DEPLOYMENT": settings.deployment,
        }
    )
    record = stackstate.state_file(settings.state_dir, settings.deployment)
    record.parent.mkdir(parents=True, exist_ok=True)
    me = os.getpid()
    record.write_text(
        json.dumps(
            {
                "supervisor_pid": me,
                "supervisor_start": start_time(me),
                "redis_url": settings.redis_url,
            }
        )
    )
    cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "inspect"]
    ping = subprocess.run(
        [*cmd, "ping", "-d", worker.hostname, "--timeout", "10"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ping.returncode == 0 and "pong" in ping.stdout, (ping.stdout, ping.stderr)
    assert "CLIPLINE_REDIS_URL is not set" not in ping.stderr
    queues = subprocess.run(
        [*cmd, "active_queues", "-d", worker.hostname, "--timeout", "10", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert constants.queue_name(settings.deployment) in queues.stdout, queues.stderr
    # A record whose supervisor is gone, and no record: the default Redis, with a warning.
    record.write_text(json.dumps({"supervisor_pid": 999999999, "redis_url": "redis://x:1/0"}))
    probe = [sys.executable, "-c", "import workers.app as w; print(w.app.conf.broker_url)"]
    for state_dir in (settings.state_dir, str(tmp_path / "empty")):
        run = subprocess.run(
            probe,
            cwd=ROOT,
            env={**env, "CLIPLINE_STATE_DIR": state_dir},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.stdout.strip() == DEFAULT_REDIS_URL, run.stderr
        assert "CLIPLINE_REDIS_URL is not set" in run.stderr, run.stderr
        assert repr(settings.deployment) in run.stderr and DEFAULT_REDIS_URL in run.stderr
    record.unlink()
