"""The Celery app's delivery settings, queue depth, housekeeping helpers, and imports.

Queue depths are read from the real Kombu priority lists in Redis after sending real
task messages (no worker consumes this test's queue). The metrics helpers run on a
real multiprocess metrics directory written by child processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import redis

from clipline_core import constants
from clipline_core.job import JobSpec, JobState
from clipline_core.settings import Settings
from clipline_core.store import JobStore
from workers import monitor
from workers.app import make_app
from workers.submit import queue_depths, queue_depths_redis, submit


def test_delivery_settings(settings: Settings) -> None:
    app = make_app(settings.replace(job_time_limit_s=1000.0, visibility_timeout_s=900))
    c = app.conf
    opts = c.broker_transport_options
    assert opts["priority_steps"] == list(range(10))  # not Kombu's default 0/3/6/9
    assert c.task_default_priority == constants.PriorityClass.NORMAL.celery_priority
    assert [p.celery_priority for p in constants.PriorityClass] == [0, 4, 8]  # 0 is highest
    assert c.worker_prefetch_multiplier == 1
    assert c.task_acks_late and c.task_reject_on_worker_lost
    assert opts["visibility_timeout"] > 1000  # longer than the longest job
    assert opts["unacked_restore_interval"] * opts["unacked_restore_throttle"] <= 60
    assert c.worker_send_task_events and c.task_send_sent_event
    assert c.task_soft_time_limit < c.task_time_limit


def test_backlog_per_priority_class(settings: Settings, redis_client: redis.Redis) -> None:
    app = make_app(settings)
    store = JobStore(redis_client, settings.deployment)
    for prio, n in (("high", 1), ("normal", 3), ("low", 2)):
        for _ in range(n):
            submit(store, app, JobSpec(video_url="/v.mp4", image_urls=["/i.jpg"], priority=prio))
    want = {"high": 1, "normal": 3, "low": 2}
    assert queue_depths_redis(redis_client, settings.deployment) == want
    assert queue_depths(app, settings.deployment) == want
    mon = monitor.Monitor(app, settings, None)
    assert mon.update_backlog() == want
    from clipline_core import metrics

    workers = metrics.registry(constants.MetricRole.WORKERS)
    got = workers.get_sample_value(constants.Metric.BACKLOG_JOBS, {"priority": "normal"})
    assert got == 3.0
    for q in (f"{constants.queue_name(settings.deployment)}{s}" for s in ("", ":4", ":8")):
        redis_client.delete(q)


def test_monitor_requeues_lost_jobs_with_their_priority(
    settings: Settings, redis_client: redis.Redis
) -> None:
    app = make_app(settings)
    store = JobStore(redis_client, settings.deployment)
    job_id = store.create(JobSpec(video_url="/v.mp4", image_urls=["/i.jpg"], priority="low"))[0]
    store.claim(job_id, "L", 0.1, 5)
    time.sleep(0.3)
    mon = monitor.Monitor(app, settings, None)
    assert mon.recover() == [job_id]
    assert store.state(job_id) == JobState.QUEUED
    assert queue_depths_redis(redis_client, settings.deployment) == {
        "high": 0,
        "normal": 0,
        "low": 1,
    }
    assert mon.recover() == []
    redis_client.delete(f"{constants.queue_name(settings.deployment)}:8")


def test_scratch_of_dead_processes_is_swept(settings: Settings) -> None:
    from clipline_core.store import holder_identity

    root = settings.scratch_path
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = holder_identity(dead.pid)
    dead.wait()
    for name, owner in (("a-1-1", ident), ("b-1-2", holder_identity()), ("c-1-3", None)):
        d = root / name
        d.mkdir(parents=True)
        (d / "video").write_bytes(b"x")
        if owner:
            (d / "owner").write_text(owner)
    assert monitor.sweep_scratch(settings) == 1
    assert sorted(p.name for p in root.iterdir()) == ["b-1-2", "c-1-3"]


def test_metrics_directory_and_merging(settings: Settings, tmp_path: Path) -> None:
    base = tmp_path / "prom"
    env = {**os.environ, constants.ENV_PROMETHEUS_MULTIPROC_DIR: str(base)}
    code = textwrap.dedent(
        """
        import os, sys
        from clipline_core.settings import Settings
        from workers import monitor
        s = Settings(deployment="t-x", state_dir=sys.argv[1])
        path = monitor.setup_multiprocess(s)
        from clipline_core import metrics as m
        m.FRAMES_DECODED.inc(2)
        m.JOBS_IN_FLIGHT.inc()
        m.SHM_SLOTS_TOTAL.set(32)  # the GPU daemon's: never exported by a worker
        print(path)
        """
    )
    paths = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        paths.append(Path(out.stdout.strip()))
    # each run made its own folder; the second removed the first (its process is gone)
    assert paths[0] != paths[1] and paths[1].parent == base
    assert not paths[0].exists() and paths[1].is_dir()
    from clipline_core import metrics

    own = metrics.family_names(constants.MetricRole.WORKERS)
    merged = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in monitor._MergedCollector(paths[1], own).collect()
        for s in fam.samples
    }
    assert merged[("clipline_frames_decoded_total", ())] == 2.0
    assert merged[("clipline_jobs_in_flight", ())] == 1.0
    assert not any(name == constants.Metric.SHM_SLOTS_TOTAL for name, _ in merged)
    # the writer exited: its gauges go, its counters stay
    assert monitor.drop_dead_gauges(paths[1]) >= 1
    names = {
        s.name: s.value
        for fam in monitor._MergedCollector(paths[1], own).collect()
        for s in fam.samples
    }
    assert "clipline_jobs_in_flight" not in names
    assert names["clipline_frames_decoded_total"] == 2.0


def test_workers_never_import_torch() -> None:
    code = "import sys, workers.tasks, workers.monitor; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
