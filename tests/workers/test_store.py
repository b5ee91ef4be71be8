"""The job state machine in Redis: atomic transitions, leases, takeover, sweeping.

Real Redis; every test uses its own deployment name (its own keys).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import redis

from clipline.cli import _wait
from clipline_core import constants
from clipline_core.job import ACTIVE, TERMINAL, JobSpec, JobState
from clipline_core.settings import Settings
from clipline_core.store import (
    IdempotencyConflict,
    JobStore,
    holder_identity,
    holder_is_dead,
)


def spec(**kw: Any) -> JobSpec:
    return JobSpec(video_url="/v.mp4", image_urls=["/p.jpg"], **kw)


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> JobStore:
    return JobStore(redis_client, settings.deployment, terminal_ttl_s=120)


def dead_identity() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = holder_identity(proc.pid)
    proc.wait()
    return ident


def test_idempotent_creation(store: JobStore) -> None:
    a, created_a = store.create(spec(), "key-1")
    b, created_b = store.create(spec(), "key-1")
    assert created_a and not created_b and a == b
    with pytest.raises(IdempotencyConflict) as e:
        store.create(spec(title="other"), "key-1")
    assert e.value.job_id == a
    c, created_c = store.create(spec(), None)
    assert created_c and c != a
    job = store.get(a)
    assert job is not None and job.state == JobState.QUEUED and job.attempt == 0


def test_concurrent_duplicate_submissions_make_one_job(store: JobStore) -> None:
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        ids.append(store.create(spec(), "same-key")[0])

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1


def test_transitions_are_checked_and_leased(store: JobStore) -> None:
    job_id, _ = store.create(spec())
    assert not store.advance(job_id, JobState.DECODING, "no-lease")  # not active yet
    assert store.claim(job_id, "L1", 30, 5) == (1, "queued", 1)
    assert store.state(job_id) == JobState.FETCHING
    assert not store.advance(job_id, JobState.DECODING, "someone-else")
    assert store.advance(job_id, JobState.DECODING, "L1")
    # a second claim while the lease lives is refused (duplicate delivery)
    assert store.claim(job_id, "L2", 30, 5)[0] == 0
    assert store.running() == 1
    hl = {"start_s": 1.0, "end_s": 6.0, "score": 0.5}
    assert store.finish(job_id, JobState.SUCCEEDED, allowed_from=ACTIVE, lease="L1", highlight=hl)
    job = store.get(job_id)
    assert job is not None and job.state == JobState.SUCCEEDED and job.finished_at
    assert store.running() == 0
    # terminal: nothing moves it any more, and it expires after the configured TTL
    assert store.claim(job_id, "L3", 30, 5)[0] == 0
    assert not store.cancel(job_id)
    ttl = store.r.ttl(store.key(job_id))
    assert 0 < ttl <= 120


def test_events_are_published(store: JobStore, redis_client: redis.Redis) -> None:
    job_id, _ = store.create(spec())
    pubsub = redis_client.pubsub()
    pubsub.subscribe(store.channel(job_id))
    pubsub.get_message(timeout=1)
    store.claim(job_id, "L", 30, 5)
    store.cancel(job_id)
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.5)
        if msg and msg["type"] == "message":
            seen.append(msg["data"].decode())
    pubsub.close()
    assert seen == ["fetching", "cancelled"]


def test_takeover_only_from_a_dead_holder(store: JobStore) -> None:
    job_id, _ = store.create(spec())
    dead = dead_identity()
    assert holder_is_dead(dead)
    assert not holder_is_dead(holder_identity())
    assert not holder_is_dead("another-host:1:1")
    assert store.claim(job_id, "OLD", 30, 5, holder=dead)[0] == 1
    token, owner = store.lease_holder(job_id)
    assert (token, owner) == ("OLD", dead)
    assert store.claim(job_id, "NEW", 30, 5, steal="WRONG")[0] == 0
    status, state, attempt = store.claim(job_id, "NEW", 30, 5, steal="OLD")
    assert (status, state, attempt) == (1, "fetching", 2)
    assert not store.renew(job_id, "OLD", 30)  # the old holder lost it
    assert store.renew(job_id, "NEW", 30)


def test_attempts_are_bounded(store: JobStore) -> None:
    job_id, _ = store.create(spec())
    for n in range(1, 3):
        assert store.claim(job_id, f"L{n}", 30, 2)[0] == 1
        assert store.transition(job_id, ACTIVE, JobState.QUEUED, lease=f"L{n}")
    assert store.claim(job_id, "L3", 30, 2) == (2, "queued", 2)


def test_expired_leases_are_requeued_or_timed_out(store: JobStore) -> None:
    timeout = {"code": "timeout", "message": "too slow"}
    a, _ = store.create(spec(priority="high"))
    b, _ = store.create(spec())
    c, _ = store.create(spec())
    store.claim(a, "LA", 0.2, 5)
    store.claim(b, "LB", 0.2, 5)
    store.claim(c, "LC", 30, 5)
    assert store.expire_leases(60, timeout) == []  # nothing expired yet
    time.sleep(0.4)
    done = {e.job_id: e for e in store.expire_leases(60, timeout)}
    assert set(done) == {a, b}
    assert done[a].outcome == "requeued" and done[a].priority == "high"
    assert store.state(a) == JobState.QUEUED
    raw = store.raw(a)
    assert raw["lease"] == "" and json.loads(raw["last_error"])["code"] == "worker_lost"
    assert store.running() == 1  # only c holds a lease
    # a requeued job is claimable again: attempt 2
    assert store.claim(a, "LA2", 0.2, 5) == (1, "queued", 2)
    time.sleep(0.4)
    # past the hard time limit: failed with timeout instead of requeued again
    done = {e.job_id: e for e in store.expire_leases(0.3, timeout)}
    assert done[a].outcome == "timed_out"
    job = store.get(a)
    assert job is not None and job.state == JobState.FAILED
    assert job.error is not None and job.error.code == "timeout"
    assert store.r.ttl(store.key(a)) > 0


def test_cancel_drops_the_lease(store: JobStore) -> None:
    job_id, _ = store.create(spec())
    store.claim(job_id, "L", 30, 5)
    assert store.cancel(job_id)
    assert store.running() == 0
    assert not store.advance(job_id, JobState.DECODING, "L")  # the runner notices
    assert store.r.zscore(constants.leases_key(store.deployment), job_id) is None


def test_holder_identity_names_this_process() -> None:
    host, pid, start = holder_identity().rsplit(":", 2)
    assert int(pid) == os.getpid() and start.isdigit() and host


def test_progress_shows_states_passed_between_polls(
    store: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job that runs every stage before the first poll still prints each state in order."""
    job_id, _ = store.create(spec())
    assert store.claim(job_id, "L1", 30, 5)[0] == 1
    timings = {"queued": 0.0, "fetch": 0.01}
    assert store.advance(job_id, JobState.DECODING, "L1", timings=timings)
    timings |= {"decode": 0.02}
    assert store.advance(job_id, JobState.INFERRING, "L1", timings=timings)
    timings |= {"inference": 0.05}
    assert store.advance(job_id, JobState.RENDERING, "L1", timings=timings)
    timings |= {"render": 0.01, "total": 0.1}
    assert store.finish(
        job_id, JobState.SUCCEEDED, allowed_from=ACTIVE, lease="L1", timings=timings
    )

    job = _wait(store, job_id, 5.0, progress=True)
    assert job.state == JobState.SUCCEEDED
    lines = capsys.readouterr().out.splitlines()
    states = [line.split("]")[1].strip() for line in lines]
    assert states == ["queued", "fetching", "decoding", "inferring", "rendering", "succeeded"]
    times = [float(line.split("[")[1].split("s]")[0]) for line in lines]
    assert times == sorted(times)


def test_progress_does_not_invent_states_for_a_failed_job(
    store: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id, _ = store.create(spec())
    assert store.claim(job_id, "L1", 30, 5)[0] == 1
    assert store.transition(job_id, ACTIVE, JobState.FAILED, lease="L1")
    _wait(store, job_id, 5.0, progress=True)
    states = [line.split("]")[1].strip() for line in capsys.readouterr().out.splitlines()]
    assert states == ["failed"]


# ---------------------------------------------------------------------------
# one owner for a job's end of life
# ---------------------------------------------------------------------------
def _sample(store: JobStore, name: str, **labels: str) -> float:
    """A sample of the job metrics the API exports (read from the store's Redis)."""
    from clipline_core.job_metrics import JobStatsCollector

    for family in JobStatsCollector(store.r, store.deployment).collect():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def _latency_count(store: JobStore, status: str, priority: str = "normal") -> float:
    name = f"{constants.Metric.JOB_LATENCY_SECONDS}_count"
    return _sample(store, name, priority=priority, status=status)


def test_finish_counts_and_calls_the_hook_once_for_the_winner(store: JobStore) -> None:
    ended: list[str] = []
    store.on_terminal = ended.append
    job_id, _ = store.create(spec())
    total, failures = constants.Metric.JOBS_TOTAL, constants.Metric.JOB_FAILURES_TOTAL
    assert _sample(store, total, status="failed") == 0.0  # every series exists at 0
    assert _sample(store, failures, code="timeout") == 0.0
    err = {"code": "timeout", "message": "too slow"}
    results = [store.finish(job_id, JobState.FAILED, error=err) for _ in range(3)]
    assert results == [True, False, False]
    assert ended == [job_id]
    assert _sample(store, total, status="failed") == 1.0
    assert _sample(store, failures, code="timeout") == 1.0
    assert _latency_count(store, "failed") == 1.0  # observed once, by the winner
    job = store.get(job_id)
    assert job is not None and job.state == JobState.FAILED and job.error is not None
    assert job.error.code == "timeout"
    assert job.finished_at is not None
    latency_sum = f"{constants.Metric.JOB_LATENCY_SECONDS}_sum"
    want = job.finished_at - job.created_at
    assert _sample(store, latency_sum, priority="normal", status="failed") == pytest.approx(want)


def test_cancel_is_counted_as_cancelled(store: JobStore) -> None:
    ended: list[str] = []
    store.on_terminal = ended.append
    job_id, _ = store.create(spec(priority="high"))
    assert store.cancel(job_id) and not store.cancel(job_id)
    assert _sample(store, constants.Metric.JOBS_TOTAL, status="cancelled") == 1.0
    assert _sample(store, constants.Metric.JOB_FAILURES_TOTAL, code="cancelled") == 1.0
    assert _latency_count(store, "cancelled", "high") == 1.0
    assert ended == [job_id]


def test_success_counts_no_failure_and_an_unknown_code_is_internal(store: JobStore) -> None:
    ok, bad = store.create(spec())[0], store.create(spec())[0]
    assert store.finish(ok, JobState.SUCCEEDED)
    assert store.finish(bad, JobState.FAILED, error={"code": "no-such-code", "message": "?"})
    assert _sample(store, constants.Metric.JOBS_TOTAL, status="succeeded") == 1.0
    assert _sample(store, constants.Metric.JOB_FAILURES_TOTAL, code="internal") == 1.0
    from clipline_core.job_metrics import JobStatsCollector

    families = JobStatsCollector(store.r, store.deployment).collect()
    name = constants.Metric.JOB_FAILURES_TOTAL
    failures = [s for f in families for s in f.samples if s.name == name]
    assert sum(s.value for s in failures) == 1.0 and all(s.labels["code"] for s in failures)


def test_jobs_current_per_state(store: JobStore) -> None:
    current = constants.Metric.JOBS_BY_STATE

    def states() -> dict[str, float]:
        return {s.value: _sample(store, current, state=s.value) for s in JobState if s in open_}

    open_ = {s for s in JobState if s not in TERMINAL}

    a, b, c = (store.create(spec())[0] for _ in range(3))
    assert states() == {"queued": 3, "fetching": 0, "decoding": 0, "inferring": 0, "rendering": 0}
    assert store.claim(a, "La", 30, 5)[0] == 1
    assert store.claim(b, "Lb", 30, 5)[0] == 1
    assert store.advance(b, JobState.DECODING, "Lb")
    assert states() == {"queued": 1, "fetching": 1, "decoding": 1, "inferring": 0, "rendering": 0}
    assert store.finish(a, JobState.SUCCEEDED, lease="La")
    assert store.requeue(b, "Lb", {"code": "backpressure", "message": "busy"})
    assert store.cancel(c)
    assert states() == {"queued": 1, "fetching": 0, "decoding": 0, "inferring": 0, "rendering": 0}
    assert store.cancel(b)
    assert set(states().values()) == {0.0}


def test_advance_refuses_to_end_a_job_and_finish_refuses_an_active_state(
    store: JobStore,
) -> None:
    job_id, _ = store.create(spec())
    with pytest.raises(ValueError, match="finish"):
        store.advance(job_id, JobState.SUCCEEDED, "token")
    with pytest.raises(ValueError, match="not a terminal"):
        store.finish(job_id, JobState.DECODING)
    assert store.state(job_id) == JobState.QUEUED


def test_create_stores_the_owner_atomically(store: JobStore) -> None:
    from clipline_core.store import OWNER_FIELD

    owned, _ = store.create(spec(), owner="tenant-a")
    local, _ = store.create(spec())
    assert store.raw(owned)[OWNER_FIELD] == "tenant-a"
    assert OWNER_FIELD not in store.raw(local)


def test_lua_scripts_take_state_names_from_the_enum() -> None:
    from clipline_core import store as store_module

    for script in (store_module._CLAIM, store_module._EXPIRE, store_module._TRANSITION):
        assert "$" not in script
    active = store_module._CLAIM.split("\n", 1)[0]
    for s in ACTIVE:
        assert f"{s.value}=true" in active
    with pytest.raises(ValueError, match="placeholder"):
        store_module._lua("return $NOT_A_STATE")


def test_every_setting_is_in_exactly_one_section() -> None:
    import dataclasses

    from clipline_core.settings import SECTIONS

    placed = [f for fields in SECTIONS.values() for f in fields]
    assert sorted(placed) == sorted(f.name for f in dataclasses.fields(Settings))
    s = Settings(frame_size=96)
    assert s.section("shm")["frame_size"] == 96
    with pytest.raises(KeyError, match="no settings section"):
        s.section("nope")
