"""Recovery from a killed process: a Celery main process, a pool child, the GPU daemon.

First the store's bookkeeping of held messages on real Redis (who holds a queued job's
message, the sweeper's re-send), then the real stack: the GPU daemon and two Celery
workers (``python -m gpu_service``, ``celery -A workers.app worker`` twice, one pool
child each), so one worker's main process can be SIGKILLed while the other sweeps.

Bounds asserted (documented, with margin): a job whose worker's main process was
killed starts again within ``job_lease_s`` (the alive key's and the lease's time-to-
live) + :data:`workers.monitor.INTERVAL_S` (one sweep) + :data:`MARGIN_S`, counted from
the kill; a job whose GPU daemon was killed and restarted ends within
:data:`RESTART_BOUND_S` of the new daemon being ready, never after
``inference_timeout_s`` (120 s here).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from wlib import Clips, Origin

from clipline.stack import LocalStack
from clipline_core import constants
from clipline_core.job import Job, JobSpec, JobState
from clipline_core.settings import Settings
from clipline_core.store import JobStore, holder_identity
from gpu_service.shm import Producer
from workers import monitor, preprocess
from workers.app import make_app, worker_argv
from workers.submit import queue_list

LEASE_S = 3.0
BACKOFF_S = 3.0  # the first retry's countdown: long enough to kill its holder meanwhile
MARGIN_S = 5.0
#: a restarted daemon's heartbeat -> the job ends: RESTART_GRACE_S + the retry's
#: countdown + one run of the job on a shared CPU
RESTART_BOUND_S = 25.0
ERR = {"code": "fetch_failed", "message": "try again"}


def spec(**kw: Any) -> JobSpec:
    return JobSpec(video_url="/v.mp4", image_urls=["/p.jpg"], **kw)


def dead_identity() -> str:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = holder_identity(proc.pid)
    proc.wait()
    return ident


# ---------------------------------------------------------------------------
# The store's bookkeeping.
# ---------------------------------------------------------------------------
@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> JobStore:
    return JobStore(redis_client, settings.deployment, terminal_ttl_s=120)


def test_a_retry_is_recorded_as_held_until_claimed(store: JobStore) -> None:
    job_id = store.create(spec())[0]
    assert store.claim(job_id, "L1", 30, 5)[0] == 1
    assert store.requeue(job_id, "L1", ERR, retry_in_s=5.0, holder="h:1:1")
    raw = store.raw(job_id)
    assert raw["state"] == "queued" and raw["held_by"] == "h:1:1"
    assert json.loads(raw["last_error"]) == ERR
    secs, micros = store.r.time()
    due = store.r.zscore(store.held_key, job_id)
    assert due is not None and 4.0 < due - (secs + micros / 1e6) <= 5.0
    assert not store.requeue(job_id, "L1", ERR, retry_in_s=5.0, holder="h:1:1")  # not running
    assert store.claim(job_id, "L2", 30, 5) == (1, "queued", 2)
    assert store.held_by(job_id) == "" and store.r.zscore(store.held_key, job_id) is None
    assert not store.hold(job_id, "h:1:1")  # only a queued job is held


def test_the_message_of_a_dead_holder_is_sent_again_once(store: JobStore) -> None:
    job_id = store.create(spec(priority="high"))[0]
    gone = dead_identity()
    assert store.hold(job_id, gone, due_in_s=2.0)
    me = holder_identity()
    store.keep_alive(me, 30)
    [r] = store.expire_held(grace_s=30, holder=me)
    assert (r.job_id, r.priority, r.reason, r.holder) == (job_id, "high", "holder_lost", gone)
    assert 1.0 < r.countdown_s <= 2.0  # sent again due when it was
    assert store.held_by(job_id) == me  # the sweeper holds it until it is sent
    assert store.expire_held(grace_s=30, holder=me) == []  # a live holder, not overdue
    assert store.unhold(job_id, me)
    assert store.r.zscore(store.held_key, job_id) is None
    assert store.expire_held(grace_s=30, holder=me) == []
    store.drop_alive(me)


def test_a_live_holder_is_left_alone_until_overdue(store: JobStore) -> None:
    job_id = store.create(spec())[0]
    live = f"{uuid.uuid4().hex}:1:1"
    store.keep_alive(live, 30)
    assert store.hold(job_id, live, due_in_s=0.0)
    me = holder_identity()
    assert store.expire_held(grace_s=0.5, holder=me) == []
    time.sleep(0.7)
    [r] = store.expire_held(grace_s=0.5, holder=me)
    assert r.reason == "overdue" and r.countdown_s == 0.0
    store.drop_alive(live)


def test_a_job_that_leaves_queued_leaves_the_held_set(store: JobStore) -> None:
    a, b = store.create(spec())[0], store.create(spec())[0]
    for job_id in (a, b):
        assert store.hold(job_id, dead_identity())
    assert store.cancel(a)  # a transition out of queued drops the record
    assert store.r.zscore(store.held_key, a) is None and store.held_by(a) == ""
    store.r.hset(store.key(b), "state", "succeeded")  # ended behind the store's back
    assert store.expire_held(grace_s=30, holder=holder_identity()) == []
    assert store.r.zcard(store.held_key) == 0


def test_a_sweeper_that_dies_before_sending_is_swept_itself(store: JobStore) -> None:
    job_id = store.create(spec())[0]
    store.claim(job_id, "L", 0.2, 5)
    time.sleep(0.4)
    sweeper = dead_identity()  # requeues, then dies before sending the task
    [e] = store.expire_leases(60, {"code": "timeout", "message": "x"}, holder=sweeper)
    assert e.outcome == "requeued" and store.held_by(job_id) == sweeper
    [r] = store.expire_held(grace_s=30, holder=holder_identity())
    assert r.job_id == job_id and r.reason == "holder_lost"


def test_a_submitter_that_dies_before_sending_leaves_the_job_to_the_sweeper(
    store: JobStore,
) -> None:
    """The API (or CLI) stores the job held by itself, then dies before the broker has
    its message: the job is not stranded in ``queued``; once the submitter's alive key
    is gone the sweeper takes the message over."""
    submitter = f"submit:{uuid.uuid4().hex}"
    store.keep_alive(submitter, 0.3)
    job_id, created = store.create(spec(), holder=submitter)
    assert created and store.held_by(job_id) == submitter
    me = holder_identity()
    assert store.expire_held(grace_s=30, holder=me) == []  # the submitter still runs
    time.sleep(0.5)  # it died: its alive key expires
    [r] = store.expire_held(grace_s=30, holder=me)
    assert (r.job_id, r.reason, r.holder) == (job_id, "holder_lost", submitter)


def test_submit_hands_the_first_message_to_the_broker_and_lets_go(
    store: JobStore, settings: Settings
) -> None:
    from workers.submit import submit

    app = make_app(settings)
    job_id, created = submit(store, app, spec(priority="low"), hold_ttl_s=5)
    try:
        assert created and store.held_by(job_id) == ""
        assert store.r.zscore(store.held_key, job_id) is None
        raw = store.r.lrange(queue_list(settings.deployment, constants.PriorityClass.LOW), 0, -1)
        assert any(json.loads(_body(json.loads(m)))[0] == [job_id] for m in raw)
    finally:
        store.r.delete(queue_list(settings.deployment, constants.PriorityClass.LOW))


def test_the_monitor_keeps_its_alive_key_and_resends_held_messages(
    settings: Settings, redis_client: redis.Redis
) -> None:
    s = settings.replace(job_lease_s=2.0)
    mon = monitor.Monitor(make_app(s), s, None)
    try:
        key = constants.worker_alive_key(s.deployment, mon.identity)
        assert 0 < redis_client.pttl(key) <= 2000
        time.sleep(1.5)  # refreshed every third of its time-to-live
        assert redis_client.pttl(key) > 1000
        job_id = mon.store.create(spec(priority="low"))[0]
        assert mon.store.hold(job_id, dead_identity(), due_in_s=30.0)
        assert mon.resend_held() == [job_id]
        assert mon.store.held_by(job_id) == ""  # in the broker now
        [raw] = redis_client.lrange(queue_list(s.deployment, constants.PriorityClass.LOW), 0, -1)
        message = json.loads(raw)
        assert message["headers"]["eta"] is not None  # still due when it was
        assert json.loads(_body(message))[0] == [job_id]
        assert mon.resend_held() == []
    finally:
        mon.close()
    assert not redis_client.exists(key)
    redis_client.delete(queue_list(s.deployment, constants.PriorityClass.LOW))


def _body(message: dict[str, Any]) -> str:
    import base64

    return base64.b64decode(message["body"]).decode()


# ---------------------------------------------------------------------------
# The real stack.
# ---------------------------------------------------------------------------
class Stack:
    def __init__(self, settings: Settings, local: LocalStack, media: Path, origin: Origin):
        self.settings = settings
        self.local = local
        self.media = media
        self.origin = origin
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.store = JobStore(self.redis, settings.deployment, settings.terminal_ttl_s)
        self.app = make_app(settings)
        self.image = media / "product.jpg"

    def submit(self, video: str) -> tuple[str, Any]:
        """Store a job, subscribe to its transitions, then send its task."""
        job_id = self.store.create(
            JobSpec(video_url=video, image_urls=[str(self.image)], duration_s=1.0)
        )[0]
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

    def gated(self, name: str, video: str = "tiny.avi", **kw: Any) -> tuple[str, Any, Any]:
        import threading

        gate = threading.Event()
        body = (self.media / video).read_bytes()
        route = self.origin.add(f"/{name}.avi", body=body, gate=gate, **kw)
        return self.origin.base + f"/{name}.avi", route, gate

    def wait(self, job_id: str, timeout: float = 90.0) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.store.get(job_id)
            if job is not None and job.terminal:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not finished: {self.store.raw(job_id)}\n{self.logs()}")

    def until(self, what: Any, timeout: float = 30.0, why: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = what()
            if got:
                return got
            assert time.monotonic() < deadline, f"{why}\n{self.logs()}"
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(self.local.log_tail(n, 30) for n in self.local.procs)

    def queues_empty(self) -> bool:
        dep = self.settings.deployment
        return not any(self.redis.llen(queue_list(dep, c)) for c in constants.PriorityClass)

    def mains(self) -> dict[int, str]:
        """Worker main process pid -> its name in the stack."""
        return {p.pid: n for n, p in self.local.procs.items() if n.startswith("worker")}

    def start_worker(self, name: str) -> None:
        """(Re)start worker ``name`` and wait until it consumes."""
        self.local.procs.pop(name, None)
        cmd = [
            sys.executable,
            "-m",
            "celery",
            *worker_argv(
                self.settings,
                1,
                f"{self.settings.deployment}-{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ),
        ]
        log = self.local.log_dir / f"{name}.log"
        log.unlink(missing_ok=True)
        env = self.local._env()
        if name != "worker":  # the stack's own worker serves the metrics port
            env["CLIPLINE_WORKER_METRICS_PORT"] = "0"
        self.local._spawn(name, cmd, env)
        pid = self.local.procs[name].pid
        self.until(lambda: " ready." in self.local.log_tail(name, 200), 90, f"{name} not ready")
        self.until(lambda: children(pid), 30, f"{name} has no pool child")
        key = constants.worker_alive_key(self.settings.deployment, holder_identity(pid))
        assert self.redis.exists(key)

    def kill_main(self, pid: int) -> tuple[float, str]:
        """SIGKILL one worker's main process; its pool children must die with it."""
        name = self.mains()[pid]
        kids = children(pid)
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        self.local.procs[name].wait(10)
        self.until(lambda: not any(alive(k) for k in kids), 5, "pool children outlived the parent")
        return t, name

    def daemon_restart(self) -> float:
        """SIGKILL the daemon (stopped or not), start a new one; when it is ready."""
        proc = self.local.procs.pop("gpu-daemon")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.local.start_one("gpu-daemon")
        return time.time()


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


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
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, clips: Clips, module_origin: Origin
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("recovery")
    media = tmp / "media"
    media.mkdir()
    (media / "tiny.avi").write_bytes(clips.tiny.read_bytes())
    (media / "long.avi").write_bytes(clips.mjpeg.read_bytes())
    (media / "product.jpg").write_bytes(clips.product.read_bytes())
    settings = Settings(
        deployment=f"t-rec-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        state_dir=str(tmp / "state"),
        local_roots=str(media),
        allow_loopback=True,
        shm_slots=8,
        shm_slot_bytes=1 << 20,
        frame_size=64,
        sample_fps=4.0,
        worker_concurrency=1,
        worker_metrics_port=0,  # two workers: no port to share
        fetch_retries=1,
        fetch_read_timeout_s=60.0,
        inference_timeout_s=120.0,
        job_soft_time_limit_s=0.0,
        job_time_limit_s=120.0,
        job_lease_s=LEASE_S,
        retry_backoff_s=BACKOFF_S,
        retry_jitter=False,  # the countdown is BACKOFF_S exactly
        max_attempts=4,
        terminal_ttl_s=600,
    )
    local = LocalStack(settings, workers=1)
    local.start(timeout_s=120)
    s = Stack(settings, local, media, module_origin)
    try:
        s.start_worker("worker-b")
        yield s
    finally:
        if os.environ.get("CLIPLINE_TEST_KEEP_LOGS"):
            print(s.logs())
        local.stop()


def _retrying(stack: Stack, name: str) -> tuple[str, Any, Any, float]:
    """A job whose first attempt fails (the origin answers 503 twice): it waits on its
    retry's countdown, its message held by one worker's main process."""
    url = stack.origin.file(f"/{name}.avi", stack.media / "tiny.avi", fail_first=2)
    route = stack.origin.server.routes[f"/{name}.avi"]
    job_id, events = stack.submit(url)
    stack.until(
        lambda: stack.store.raw(job_id).get("last_error") and stack.store.state(job_id) == "queued",
        30,
        "the first attempt did not fail",
    )
    requeued = float(stack.store.raw(job_id)["updated_at"])
    stack.until(stack.queues_empty, 5, "the retry's message was not received")
    time.sleep(0.3)  # the receiving main process records itself (task_received)
    return job_id, events, route, requeued


@pytest.mark.slow
def test_a_resent_message_and_the_original_end_the_job_once(stack: Stack) -> None:
    job_id, events, route, _ = _retrying(stack, "dup")
    holder = stack.store.held_by(job_id)
    assert int(holder.rsplit(":", 2)[1]) in stack.mains()  # a worker's main process
    stack.send(job_id)  # what the sweeper sends: the original still waits on its countdown
    job = stack.wait(job_id)
    assert job.state == JobState.SUCCEEDED and job.attempt == 2, job.error
    time.sleep(BACKOFF_S + 1.0)  # the original's countdown ends: it finds the job finished
    stack.until(stack.queues_empty, 10)
    seen = drain(events, 1.0)
    events.close()
    assert seen.count("succeeded") == 1 and seen.count("fetching") == 2, seen
    assert route.hits == 3  # two failed requests of attempt 1, one of attempt 2
    assert stack.store.get(job_id).attempt == 2  # type: ignore[union-attr]
    assert stack.redis.zscore(stack.store.held_key, job_id) is None


@pytest.mark.slow
def test_main_process_killed_while_a_retry_waits_on_its_countdown(stack: Stack) -> None:
    job_id, events, route, requeued = _retrying(stack, "countdown")
    holder = stack.store.held_by(job_id)
    pid = int(holder.rsplit(":", 2)[1])
    assert pid in stack.mains(), (holder, stack.mains())
    assert time.time() < requeued + BACKOFF_S, "the countdown ended before the kill"
    killed, name = stack.kill_main(pid)
    job = stack.wait(job_id, 60)
    assert job.state == JobState.SUCCEEDED and job.attempt == 2, job.error
    restarted = float(stack.store.raw(job_id)["attempt_started_at"])
    print(f"\nretry recovered {restarted - killed:.1f} s after its holder was killed")
    assert restarted - killed <= LEASE_S + monitor.INTERVAL_S + MARGIN_S
    seen = drain(events, 0.5)
    events.close()
    assert seen.count("succeeded") == 1 and route.hits == 3
    stack.start_worker(name)


@pytest.mark.slow
def test_main_process_killed_while_its_child_runs_a_job(stack: Stack) -> None:
    url, route, gate = stack.gated("running")
    job_id, events = stack.submit(url)
    assert route.entered.wait(30)
    child = int(stack.store.raw(job_id)["lease_owner"].rsplit(":", 2)[1])
    parent = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
    killed, name = stack.kill_main(parent)  # the child dies with it (parent-death signal)
    gate.set()
    job = stack.wait(job_id, 60)
    assert job.state == JobState.SUCCEEDED and job.attempt == 2, job.error
    restarted = float(stack.store.raw(job_id)["attempt_started_at"])
    print(f"\nrunning job recovered {restarted - killed:.1f} s after its worker was killed")
    assert restarted - killed <= LEASE_S + monitor.INTERVAL_S + MARGIN_S
    seen = drain(events, 0.5)
    events.close()
    assert seen.count("succeeded") == 1 and route.hits == 2
    stack.start_worker(name)


def _inferring_with_daemon_stopped(stack: Stack, name: str) -> tuple[str, Any]:
    """A job whose items are all in the arena while the daemon is stopped."""
    url, route, gate = stack.gated(name, video="long.avi")
    job_id, events = stack.submit(url)
    assert route.entered.wait(30)
    daemon = stack.local.procs["gpu-daemon"]
    os.kill(daemon.pid, signal.SIGSTOP)
    hb = constants.daemon_heartbeat_key(stack.settings.deployment, stack.settings.node_name)
    stack.redis.expire(hb, 300)  # a stopped daemon's heartbeat would expire meanwhile
    gate.set()
    stack.until(lambda: stack.store.state(job_id) == JobState.INFERRING, 60, "not inferring")
    return job_id, events


@pytest.mark.slow
def test_daemon_killed_after_reading_a_jobs_items_fails_the_attempt_fast(stack: Stack) -> None:
    job_id, events = _inferring_with_daemon_stopped(stack, "lost")
    # What a daemon leaves that read every item (so the slots are free again) and was
    # killed before publishing their results: none of them is left in the arena.
    s = stack.settings
    producer = Producer(s.arena_path, s.socket_path)
    try:
        assert producer.withdraw(job_id, preprocess.generation(1)) >= 3  # refs + 3 chunks
    finally:
        producer.close()
    ready = stack.daemon_restart()
    job = stack.wait(job_id, 60)
    events.close()
    assert job.state == JobState.SUCCEEDED and job.attempt == 2, job.error
    last = json.loads(stack.store.raw(job_id)["last_error"])
    assert last["code"] == "gpu_unavailable" and "restarted" in last["message"], last
    assert job.finished_at is not None
    print(f"\nlost results: the job ended {job.finished_at - ready:.1f} s after the new daemon")
    assert job.finished_at - ready <= RESTART_BOUND_S


@pytest.mark.slow
def test_daemon_killed_before_reading_a_jobs_items_loses_nothing(stack: Stack) -> None:
    job_id, events = _inferring_with_daemon_stopped(stack, "kept")
    ready = stack.daemon_restart()
    job = stack.wait(job_id, 60)
    events.close()
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.attempt == 1  # the new daemon ran what it found in the arena
    assert job.finished_at is not None
    print(f"\nitems kept: the job ended {job.finished_at - ready:.1f} s after the new daemon")
    assert job.finished_at - ready <= RESTART_BOUND_S


@pytest.mark.slow
def test_daemon_killed_mid_inference_every_job_ends_soon_after_its_restart(stack: Stack) -> None:
    ids = []
    for i in range(2):
        url = stack.origin.file(f"/mid-{i}.avi", stack.media / "long.avi")
        ids.append(stack.submit(url)[0])
    stack.until(lambda: stack.store.state(ids[0]) == JobState.INFERRING, 60, "not inferring")
    ready = stack.daemon_restart()
    for job_id in ids:
        job = stack.wait(job_id, 90)
        assert job.state == JobState.SUCCEEDED, job.error
        assert job.finished_at is not None
        print(f"\nmid-inference kill: {job_id[:8]} attempt {job.attempt}, ended "
              f"{job.finished_at - ready:.1f} s after the new daemon")  # fmt: skip
        assert job.finished_at - ready <= RESTART_BOUND_S
