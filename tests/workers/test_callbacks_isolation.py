"""Completion callbacks run in their own worker: a slow receiver never holds a job.

Real parts throughout: Redis, the GPU daemon on the CPU, the prefork job worker and the
thread-pool callback worker that :class:`clipline.stack.LocalStack` starts, and a
receiver that is a real HTTP server on 127.0.0.1 (a thread of this process).

* Isolation: with one job pool child and a receiver that holds every callback until the
  test lets it go (the callback timeout is longer than the whole test), later jobs
  still run and finish while the first job's callback is in flight; the job worker
  consumes only the jobs queue and never runs ``clipline.deliver_callback`` (its log
  has no such task), the callback worker only the callbacks queue. Once released,
  every event arrives exactly once.
* Duplicates: a receiver that answers 200 after 3 s with a 1 s callback timeout takes
  the first (timed-out) attempt and the retry, which waits ``callback_retry_timeout_s``:
  it gets the event twice, once more at most, even though two copies of the task were
  enqueued at once; a redelivered or duplicate message after the 2xx sends nothing.
* The delivery record itself (claims, host limit, duplicates) on Redis alone.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from wlib import Clips

from clipline.stack import LocalStack
from clipline_core import constants
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.job import JobSpec, JobState
from clipline_core.settings import Settings
from workers import callbacks
from workers.app import ROLE_CALLBACKS, callback_worker_argv, make_app, worker_argv

SECRET = "whsec-isolation-" + "y" * 24


@dataclasses.dataclass
class Post:
    event: str
    path: str
    at: float
    body: bytes


class Receiver:
    """Records POSTs; holds each until ``gate`` is set, or sleeps ``delay_s``, then 200."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.posts: list[Post] = []
        self.open = 0  # requests being held right now
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                event = self.headers[constants.HEADER_EVENT_ID]
                with outer.cond:
                    outer.posts.append(Post(event, self.path, time.time(), body))
                    outer.open += 1
                    outer.cond.notify_all()
                try:
                    if gate is not None:
                        gate.wait(300)
                    elif delay_s:
                        time.sleep(delay_s)
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the client gave up waiting
                finally:
                    with outer.cond:
                        outer.open -= 1
                        outer.cond.notify_all()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def wait_posts(self, count: int, timeout_s: float) -> list[Post]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.posts) >= count, timeout_s)
            return list(self.posts)

    def count(self, event: str) -> int:
        with self.cond:
            return sum(p.event == event for p in self.posts)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _settings(tmp: Path, redis_url: str, **changes: Any) -> Settings:
    return Settings(
        deployment=f"t-cb-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        state_dir=str(tmp / "state"),
        local_roots=str(tmp / "media"),
        allow_loopback=True,
        shm_slots=8,
        shm_slot_bytes=1 << 20,
        frame_size=64,
        worker_concurrency=1,
        inference_timeout_s=60.0,
        terminal_ttl_s=600,
        callback_secret=SECRET,
        **changes,
    )


def _purge(client: redis.Redis, deployment: str) -> None:
    for pattern in (
        constants.redis_prefix(deployment) + ":*",
        f"{constants.PROJECT}.{deployment}.*",
        f"_kombu.binding.*{deployment}*",
    ):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


def _wait(what: str, check: Any, timeout_s: float, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(interval_s)


def _delivered(ledger: callbacks.Ledger, event: str) -> bool:
    return ledger.record(event).get("state") == callbacks.DELIVERED


# ---------------------------------------------------------------------------
# The command lines and the app of each worker.
# ---------------------------------------------------------------------------
def test_each_worker_consumes_only_its_own_queue(settings: Settings) -> None:
    s = settings.replace(callback_concurrency=5)
    jobs = worker_argv(s, 2, "h@x")
    cbs = callback_worker_argv(s, "c@x")
    assert jobs[jobs.index("--queues") + 1] == constants.queue_name(s.deployment)
    assert cbs[cbs.index("--queues") + 1] == constants.callbacks_queue_name(s.deployment)
    assert jobs[jobs.index("--pool") + 1] == "prefork"
    assert cbs[cbs.index("--pool") + 1] == "threads"
    assert cbs[cbs.index("--concurrency") + 1] == "5"
    assert cbs[1] == "workers.app:callbacks_app"
    app = make_app(s, ROLE_CALLBACKS)
    assert "workers.tasks" not in app.conf.include  # no job task in the callback worker
    assert app.conf.task_time_limit is None
    route = app.conf.task_routes[constants.CELERY_TASK_DELIVER_CALLBACK]
    assert route == {"queue": constants.callbacks_queue_name(s.deployment)}
    assert make_app(s).conf.broker_transport_options == app.conf.broker_transport_options


# ---------------------------------------------------------------------------
# The delivery record on Redis.
# ---------------------------------------------------------------------------
def test_ledger_claims_once_limits_hosts_and_remembers_deliveries(
    settings: Settings, redis_client: redis.Redis
) -> None:
    s = settings.replace(callback_host_concurrency=2, callback_timeout_s=1.0)
    ledger = callbacks.Ledger(redis_client, s)
    try:
        a = ledger.claim("evt_a", "http://hooks.example.com/a")
        assert a.outcome == callbacks.CLAIMED and a.attempt == 1 and a.timeout_s == 1.0
        # A second copy of the same event waits for the first one's lease.
        busy = ledger.claim("evt_a", "http://hooks.example.com/a")
        assert busy.outcome == callbacks.BUSY and 0 < busy.wait_s <= ledger.lease_s(1.0)
        b = ledger.claim("evt_b", "http://HOOKS.example.com:8443/b")  # same host
        assert b.outcome == callbacks.CLAIMED
        full = ledger.claim("evt_c", "http://hooks.example.com/c")
        assert full.outcome == callbacks.HOST_BUSY and full.wait_s > 0
        other = ledger.claim("evt_d", "http://other.example.com/d")
        assert other.outcome == callbacks.CLAIMED  # another host is not held up
        # evt_a timed out waiting for the answer: its next attempt waits longer.
        ledger.release("evt_a", "http://hooks.example.com/a", a.token, "retry", True)
        again = ledger.claim("evt_a", "http://hooks.example.com/a")
        assert again.outcome == callbacks.CLAIMED and again.attempt == 2
        assert again.timeout_s == s.callback_retry_timeout_s
        ledger.release(
            "evt_a", "http://hooks.example.com/a", again.token, callbacks.DELIVERED, False
        )
        assert ledger.claim("evt_a", "http://hooks.example.com/a").outcome == callbacks.DELIVERED
        ledger.release("evt_b", "http://hooks.example.com/b", b.token, callbacks.FAILED, False)
        assert ledger.claim("evt_b", "http://hooks.example.com/b").outcome == callbacks.FAILED
        assert ledger.claim("evt_c", "http://hooks.example.com/c").outcome == callbacks.CLAIMED
        record = ledger.record("evt_a")
        assert record["state"] == "delivered" and record["attempts"] == "2"
        assert "holder" not in record
        ttl = redis_client.ttl(constants.callback_event_key(s.deployment, "evt_a"))
        assert 0 < ttl <= s.terminal_ttl_s
    finally:
        _purge(redis_client, s.deployment)


def test_defer_grows_and_never_passes_the_blockers_lease() -> None:
    for n in range(12):
        assert 0.05 <= callbacks.defer_s(0.0, n) <= 36.0
    assert callbacks.defer_s(0.0, 0) <= 0.3 < 1.0 <= callbacks.defer_s(0.0, 4)
    assert callbacks.defer_s(0.5, 10) <= 0.6


# ---------------------------------------------------------------------------
# Isolation: jobs finish while a callback is held by its receiver.
# ---------------------------------------------------------------------------
@pytest.fixture
def media(tmp_path: Path, clips: Clips) -> Path:
    d = tmp_path / "media"
    d.mkdir()
    (d / "tiny.avi").write_bytes(clips.tiny.read_bytes())
    (d / "product.jpg").write_bytes(clips.product.read_bytes())
    return d


@pytest.mark.slow
def test_a_held_callback_never_holds_a_job_worker_child(
    tmp_path: Path, redis_url: str, media: Path
) -> None:
    gate = threading.Event()
    receiver = Receiver(gate=gate)
    # One job child. The callback timeout is longer than this test may wait for the jobs:
    # a delivery that ran in the job pool would keep the second and third job from ever
    # starting while the receiver holds it.
    settings = _settings(
        tmp_path,
        redis_url,
        callback_timeout_s=300.0,
        callback_concurrency=4,
        callback_host_concurrency=2,
    )
    client = redis.Redis.from_url(redis_url)
    stack = LocalStack(settings, workers=1)
    try:
        stack.start(timeout_s=120)
        assert set(stack.procs) == {"gpu-daemon", "worker", "callbacks"}
        app = make_app(settings)
        store = callbacks.job_store(settings, client, app)
        ledger = callbacks.Ledger(client, settings)

        def submit(n: int) -> str:
            from workers.submit import submit as enqueue

            spec = JobSpec(
                video_url=str(media / "tiny.avi"),
                image_urls=[str(media / "product.jpg")],
                duration_s=1.0,
                callback_url=f"{receiver.url}/hooks/{n}",
            )
            return enqueue(store, app, spec)[0]

        def finished(job_id: str) -> bool:
            job = store.get(job_id)
            return job is not None and job.terminal

        first = submit(1)
        _wait("the first job", lambda: finished(first), 120)
        assert receiver.wait_posts(1, 30), "the first callback never reached the receiver"
        assert receiver.open == 1  # held: a callback thread is waiting for the answer
        later = [submit(2), submit(3)]
        for job_id in later:
            _wait(f"job {job_id}", lambda j=job_id: finished(j), 120)
        jobs = [store.get(j) for j in [first, *later]]
        assert [j.state for j in jobs if j] == [JobState.SUCCEEDED] * 3
        # Every job finished while the first callback was still being held.
        assert not gate.is_set() and receiver.open >= 1
        events = [
            callbacks.event_id(settings.deployment, j, "job.succeeded") for j in [first, *later]
        ]
        assert not _delivered(ledger, events[0])

        # Each worker consumes its own queue, and only the callback worker ran deliveries.
        queues = app.control.inspect(timeout=5).active_queues() or {}
        by_host = {host: sorted(q["name"] for q in qs) for host, qs in queues.items()}
        mine = {h: q for h, q in by_host.items() if h.startswith(settings.deployment)}
        assert sorted(mine.values()) == [
            [constants.callbacks_queue_name(settings.deployment)],
            [constants.queue_name(settings.deployment)],
        ], by_host
        worker_log = (stack.log_dir / "worker.log").read_text(errors="replace")
        callback_log = (stack.log_dir / "callbacks.log").read_text(errors="replace")
        ran = "Task {}[".format  # Celery's "Task NAME[ID] received" (the banner lists names)
        assert ran(constants.CELERY_TASK_PROCESS_JOB) in worker_log
        assert ran(constants.CELERY_TASK_DELIVER_CALLBACK) not in worker_log
        assert ran(constants.CELERY_TASK_DELIVER_CALLBACK) in callback_log
        assert constants.CELERY_TASK_PROCESS_JOB not in callback_log  # not even registered

        gate.set()
        for event in events:
            _wait(f"delivery of {event}", lambda e=event: _delivered(ledger, e), 90, 0.25)
        assert [receiver.count(e) for e in events] == [1, 1, 1]  # each exactly once
        assert sorted(p.path for p in receiver.posts) == ["/hooks/1", "/hooks/2", "/hooks/3"]
    finally:
        gate.set()
        stack.stop()
        receiver.close()
        _purge(client, settings.deployment)
        client.close()


# ---------------------------------------------------------------------------
# Duplicates: a late 2xx, two copies at once, a redelivery after the 2xx.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_late_2xx_gets_the_event_once_more_at_most(tmp_path: Path, redis_url: str) -> None:
    # The receiver answers 200 after 3 s; the first attempt waits 1 s, so it times out
    # although the receiver takes the event. The retry waits up to 8 s and gets the 200.
    receiver = Receiver(delay_s=3.0)
    settings = _settings(
        tmp_path,
        redis_url,
        callback_timeout_s=1.0,
        callback_retry_timeout_s=8.0,
        callback_backoff_s=0.2,
        callback_max_attempts=5,
    )
    client = redis.Redis.from_url(redis_url)
    stack = LocalStack(settings)
    try:
        stack.log_dir.mkdir(parents=True, exist_ok=True)
        stack.start_one("callbacks")  # the callback worker alone: no job runs here
        app = make_app(settings)
        store = callbacks.job_store(settings, client, app)
        ledger = callbacks.Ledger(client, settings)
        job_id, _ = store.create(
            JobSpec(
                video_url="https://videos.example.com/v.mp4",
                image_urls=["https://videos.example.com/p.jpg"],
                callback_url=receiver.url + "/hook",
            )
        )
        err = ClipError(ErrorCode.NOT_A_VIDEO, "the video is not a video")
        assert store.finish(job_id, JobState.FAILED, error=err.to_dict())  # enqueues one copy
        assert callbacks.notify(settings, store, job_id, app)  # and a duplicate, at once
        event = callbacks.event_id(settings.deployment, job_id, "job.failed")

        _wait("the delivery", lambda: _delivered(ledger, event), 60, 0.1)
        record = ledger.record(event)
        assert record["read_timeouts"] == "1" and record["attempts"] == "2", record
        assert receiver.count(event) == 2  # the timed-out attempt, then once more

        # A redelivered message (the same body again, as Kombu restores it) and another
        # duplicate enqueue after the 2xx: nothing more reaches the receiver.
        body = receiver.posts[0].body.decode()
        assert json.loads(body)["id"] == event
        app.send_task(
            constants.CELERY_TASK_DELIVER_CALLBACK,
            args=[job_id, receiver.url + "/hook", body, event],
            queue=constants.callbacks_queue_name(settings.deployment),
        )
        assert callbacks.notify(settings, store, job_id, app)
        log = stack.log_dir / "callbacks.log"
        where = callbacks.redacted(receiver.url + "/hook")
        marker = f"callback {event} of job {job_id} to {where} was delivered already"

        def dropped() -> int:
            return log.read_text(errors="replace").count(marker)

        # Three copies in all found the event delivered (the second of the first pair).
        _wait("the duplicates to be dropped", lambda: dropped() >= 3, 60, 0.2)
        time.sleep(0.5)
        assert receiver.count(event) == 2
        posts = receiver.posts
        assert posts[1].at - posts[0].at >= 1.0  # the retry came after the 1 s timeout
    finally:
        stack.stop()
        receiver.close()
        _purge(client, settings.deployment)
        client.close()
