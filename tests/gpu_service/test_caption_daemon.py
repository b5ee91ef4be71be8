"""Captions in the GPU daemon: intake from Redis, batching, failures, fairness with frames.

The daemon runs in this process (its engine driven by the test, or its loop in a
thread) on a real arena and a real Redis; the copywriter is a real GPT-2 whose weights
are a tiny model trained here and saved as a Hugging Face directory (``gpt2lib``).
Requests go through the workers' real client (:class:`gpu_service.client.GpuClient`).
One test starts the daemon as a real process configured only through ``CLIPLINE_*``
variables.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from gpt2lib import CAPTION, DESCRIPTION, TITLE, shared_weights

from clipline_bench.daemon import ChunkSpec, publish_chunks
from clipline_core import constants
from clipline_core.settings import Settings
from gpu_service import protocol
from gpu_service.captions import FRAME_SHARE, CaptionService
from gpu_service.client import GpuClient
from gpu_service.daemon import Daemon
from gpu_service.models.copywriter import CopywriterModel
from gpu_service.models.features import FeaturesModel
from gpu_service.models.text import TextModel
from gpu_service.publisher import RedisResultSink, ResultPublisher

CPU = torch.device("cpu")
SIZE = 32
FRAMES = 8


@pytest.fixture(scope="module")
def gpt2_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_weights(tmp_path_factory)


@pytest.fixture(scope="module")
def writer(gpt2_weights: Path) -> CopywriterModel:
    return CopywriterModel(CPU, gpt2_weights / "gpt2", max_new_tokens=16)


class Fussy(TextModel):
    """A real copywriter that raises on any batch holding a ``poison`` prompt."""

    name = constants.CAPTION_MODEL

    def __init__(self, inner: TextModel) -> None:
        self.inner = inner
        self.weights_loaded = inner.weights_loaded
        self.calls: list[int] = []

    def generate(self, prompts: list[str]) -> list[str | None]:
        self.calls.append(len(prompts))
        if any("poison" in p for p in prompts):
            raise ValueError("poison prompt")
        return self.inner.generate(prompts)


def _settings(base: Settings, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "frame_size": SIZE,
        "frames_per_chunk": FRAMES,
        "shm_slots": 24,
        "shm_slot_bytes": 1 << 16,
        "max_batch_size": 4,
        "max_queue_delay_ms": 20.0,
        "device": "cpu",
        "torch_threads": 1,
        "models": "features,copywriter",
    }
    values.update(changes)
    return base.replace(**values)


@contextlib.contextmanager
def engine(
    settings: Settings, client: redis.Redis, text_models: list[TextModel] | None
) -> Iterator[Daemon]:
    """A daemon in this process whose engine the test drives (publisher and intake running)."""
    daemon = Daemon(settings, client, models=[FeaturesModel(CPU)], text_models=text_models)
    daemon.publisher.start()
    if daemon.captions is not None:
        daemon.captions.start()
    daemon._heartbeat()
    try:
        yield daemon
    finally:
        daemon.engine.finish_inflight()
        daemon.shutdown()
        for path in (settings.arena_path, settings.socket_path):
            path.unlink(missing_ok=True)
        client.delete(constants.caption_requests_key(settings.deployment))


def wait_pending(daemon: Daemon, n: int, timeout: float = 20.0) -> None:
    assert daemon.captions is not None
    deadline = time.monotonic() + timeout
    while daemon.captions.pending() < n:
        assert time.monotonic() < deadline, f"{daemon.captions.pending()} of {n} requests taken"
        time.sleep(0.01)


def messages(client: redis.Redis, settings: Settings, job: str) -> list[dict[str, Any]]:
    key = constants.results_key(settings.deployment, job)
    out = [protocol.loads(raw) for raw in client.lrange(key, 0, -1)]
    client.delete(key)
    return out


def push_raw(client: redis.Redis, settings: Settings, *raws: str) -> None:
    client.rpush(constants.caption_requests_key(settings.deployment), *raws)


# ---------------------------------------------------------------------------
def test_requests_are_batched_and_answered_with_a_deterministic_caption(
    settings: Settings, redis_client: redis.Redis, writer: CopywriterModel
) -> None:
    s = _settings(settings)
    gpu = GpuClient(s, redis_client)
    key = constants.caption_requests_key(s.deployment)
    with engine(s, redis_client, [writer]) as daemon:
        assert "copywriter:eager:1" in str(daemon.status()["models"]).split(",")
        assert gpu.copywriter_ready()
        assert not gpu.request_caption("job-n", 3, "  ", "", 1)  # nothing to write about
        assert not redis_client.exists(key)
        assert gpu.request_caption("job-a", 8, TITLE, DESCRIPTION, 1)
        assert gpu.request_caption("job-b", 16, TITLE, DESCRIPTION, 2)
        assert gpu.request_caption("job-c", 8, "Blue hat", "", 0)
        wait_pending(daemon, 3)
        assert daemon.engine.run_once()  # no frames: the captions run at once, together
        assert daemon.captions is not None and daemon.captions.batches_done == 1
        assert not daemon.engine.run_once()  # nothing left
        assert daemon.publisher.flush(10)
        got = {job: messages(redis_client, s, job) for job in ("job-a", "job-b", "job-c")}
        # The worker's collect returns the caption for its generation (no frames expected).
        assert gpu.request_caption("job-a", 9, TITLE, DESCRIPTION, 1)
        wait_pending(daemon, 1)
        daemon.engine.run_once()
        collected = gpu.collect("job-a", 9, 0, 10.0, caption_generation=9)
    for job, generation in (("job-a", 8), ("job-b", 16), ("job-c", 8)):
        (msg,) = got[job]
        assert msg["kind"] == protocol.CAPTION_KIND and msg["chunk"] == protocol.CAPTION_CHUNK
        assert msg["generation"] == generation and msg["error"] is None
        assert msg["trusted"] == {"copywriter": True} and msg["outputs"] == {}
        assert msg["batch"] == 3 and msg["batch_seq"] == 1
    assert got["job-a"][0]["caption"] == got["job-b"][0]["caption"] == CAPTION
    assert got["job-c"][0]["caption"] == writer.captions([("Blue hat", "")])[0]
    assert len(collected) == 1 and protocol.caption_of(collected) == CAPTION
    assert not redis_client.exists(key)


def test_without_weights_the_copywriter_is_untrusted_and_takes_no_request(
    settings: Settings, redis_client: redis.Redis
) -> None:
    s = _settings(settings)  # copywriter configured, but no weights_dir
    gpu = GpuClient(s, redis_client)
    key = constants.caption_requests_key(s.deployment)
    with engine(s, redis_client, None) as daemon:
        assert [t.name for t in daemon.text_models] == ["copywriter"]
        assert daemon.captions is None and daemon.engine.captions is None
        assert "copywriter:eager:0" in str(daemon.status()["models"]).split(",")
        assert not gpu.copywriter_ready()
        assert not gpu.request_caption("job-a", 8, TITLE, DESCRIPTION, 1)
        assert not redis_client.exists(key)
        # A request someone pushes anyway is left for a daemon that can answer it.
        req = protocol.CaptionRequest.make(
            job_id="job-x", generation=0, title=TITLE, description="", priority=1,
            now=time.time(), ttl_s=60,
        )  # fmt: skip
        push_raw(redis_client, s, req.dumps())
        time.sleep(0.3)
        assert not daemon.engine.run_once()
        assert redis_client.llen(key) == 1
        assert messages(redis_client, s, "job-x") == []
    # Not configured at all (the default models): not advertised, nothing requested.
    plain = _settings(settings, models="features")
    with engine(plain, redis_client, None) as daemon:
        assert daemon.text_models == [] and daemon.captions is None
        assert str(daemon.status()["models"]) == "features:eager:1"
        assert not GpuClient(plain, redis_client).copywriter_ready()


def test_a_failing_caption_is_answered_with_its_error_only(
    settings: Settings,
    redis_client: redis.Redis,
    writer: CopywriterModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "clipline.gpu")
    s = _settings(settings)
    gpu = GpuClient(s, redis_client)
    fussy = Fussy(writer)
    with engine(s, redis_client, [fussy]) as daemon:
        assert daemon.captions is not None
        for job in ("job-a", "job-p", "job-c"):
            title = "poison apple" if job == "job-p" else TITLE
            assert gpu.request_caption(job, 8, title, DESCRIPTION, 1)
        expired = protocol.CaptionRequest.make(
            job_id="job-e", generation=8, title=TITLE, description="", priority=0,
            now=time.time() - 100, ttl_s=50,
        )  # fmt: skip
        push_raw(redis_client, s, expired.dumps(), "not json", '{"job_id": 5}')
        wait_pending(daemon, 4)
        while daemon.engine.run_once():
            pass
        assert daemon.publisher.flush(10)
        got = {job: messages(redis_client, s, job) for job in ("job-a", "job-p", "job-c")}
        assert messages(redis_client, s, "job-e") == []  # expired: nobody waits any more
        assert daemon.captions.expired == 1 and daemon.captions.intake.invalid == 2
        assert daemon.captions.failed == 1 and daemon.captions.answered == 3
        assert daemon.publisher.errors == 1
        # The daemon keeps serving after the failure.
        assert gpu.request_caption("job-z", 8, TITLE, DESCRIPTION, 1)
        wait_pending(daemon, 1)
        daemon.engine.run_once()
        assert daemon.publisher.flush(10)
        (after,) = messages(redis_client, s, "job-z")
    assert fussy.calls[0] == 3  # one batch, then split to isolate the failing request
    (poisoned,) = got["job-p"]
    assert poisoned["kind"] == "caption" and poisoned["caption"] is None
    assert "poison prompt" in poisoned["error"]
    for job in ("job-a", "job-c"):
        (msg,) = got[job]
        assert msg["error"] is None and msg["caption"] == CAPTION
    assert after["caption"] == CAPTION
    assert "caption for job job-p failed" in caplog.text
    assert "invalid caption request" in caplog.text


def test_frame_batches_keep_running_under_a_caption_flood(
    settings: Settings, redis_client: redis.Redis, writer: CopywriterModel
) -> None:
    s = _settings(settings)
    n_captions, n_chunks = 48, 12
    with engine(s, redis_client, [writer]) as daemon:
        captions = daemon.captions
        assert captions is not None
        captions.max_batch = 4  # many small caption batches: 12 of them
        now = time.time()
        flood = [
            protocol.CaptionRequest.make(
                job_id=f"cap-{i}", generation=0, title=f"Product {i}", description="",
                priority=0, now=now, ttl_s=300,
            ).dumps()
            for i in range(n_captions)
        ]  # fmt: skip
        push_raw(redis_client, s, *flood)
        wait_pending(daemon, n_captions)
        specs = [ChunkSpec("job-f", i, FRAMES, SIZE, seed=i, priority=2) for i in range(n_chunks)]
        publish_chunks(str(s.arena_path), str(s.socket_path), specs)
        trace: list[tuple[int, int]] = []  # (frame batches, caption batches) after each step
        while daemon.engine.run_once():
            trace.append((daemon.engine.batches_done, captions.batches_done))
        assert daemon.publisher.flush(10)
        frames = messages(redis_client, s, "job-f")
        answered = sum(len(messages(redis_client, s, f"cap-{i}")) for i in range(n_captions))
    frame_batches = n_chunks // s.max_batch_size
    assert sorted(m["chunk"] for m in frames) == list(range(n_chunks))
    assert all(m["error"] is None for m in frames)
    # The frames finished while most captions still waited: the flood took at most one
    # caption turn per FRAME_SHARE frame batches ...
    step = next(i for i, (f, _) in enumerate(trace) if f == frame_batches)
    caption_batches_then = trace[step][1]
    assert caption_batches_then <= frame_batches // FRAME_SHARE
    # ... but it was not starved either: a caption batch ran between the frame batches,
    assert caption_batches_then >= 1
    # and afterwards every request was answered.
    assert captions.batches_done == n_captions // 4 and answered == n_captions


def test_caption_turns_leave_the_frames_their_share_of_device_time(
    redis_client: redis.Redis, writer: CopywriterModel, tmp_path: Path
) -> None:
    """The scheduling rule alone: batches *and* time owed to the frames (no arena)."""
    sink = RedisResultSink(redis_client, "unused", 60)
    svc = CaptionService(
        writer, ResultPublisher(sink, "cpu"), redis_client, "unused", tmp_path / "sock",
        device=CPU, frame_share=2,
    )  # fmt: skip
    try:
        assert not svc.due(False, 0)  # nothing pending
        req = protocol.CaptionRequest.make(
            job_id="j", generation=0, title=TITLE, description="", priority=1,
            now=time.time(), ttl_s=60,
        )  # fmt: skip
        svc.queue.put_many([req])
        assert svc.due(False, 0)  # no frame batch was due: captions use the idle device
        assert not svc.due(True, 1)  # frames keep coming: they get 2 batches first
        assert svc.due(True, 2)
        svc._frames_mark, svc._last_s, svc._last_end = 2, 1.0, time.monotonic()
        assert not svc.due(True, 9)  # a 1 s caption batch: the frames get 2 s first
        svc._last_end -= 2.5
        assert svc.due(True, 9)
        svc._last_end -= 100
        assert not svc.due(True, 3)  # and at least 2 frame batches
    finally:
        svc.close()


def test_a_hard_stop_hands_unanswered_requests_back_best_first(
    redis_client: redis.Redis, writer: CopywriterModel, tmp_path: Path, deployment: str
) -> None:
    key = constants.caption_requests_key(deployment)
    sink = RedisResultSink(redis_client, deployment, 60)
    svc = CaptionService(
        writer, ResultPublisher(sink, "cpu"), redis_client, key, tmp_path / "sock", device=CPU
    )
    now = time.time()
    reqs = [
        protocol.CaptionRequest.make(
            job_id=f"j{i}", generation=0, title=TITLE, description="", priority=prio,
            now=now + i, ttl_s=120,
        )
        for i, prio in enumerate([2, 0, 1, 0])
    ]  # fmt: skip
    try:
        redis_client.rpush(key, *[r.dumps() for r in reqs])
        svc.start()
        deadline = time.monotonic() + 20
        while svc.pending() < len(reqs):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not redis_client.exists(key)
        svc.close()  # what the daemon does on a second stop signal: nothing is lost
        back = [protocol.CaptionRequest.loads(raw) for raw in redis_client.lrange(key, 0, -1)]
        assert [r.job_id for r in back] == ["j1", "j3", "j2", "j0"]  # priority, then age
        assert back == sorted(reqs, key=lambda r: (r.priority, r.requested_at))
        assert 0 < redis_client.ttl(key) <= 125 and svc.requeued == 4
    finally:
        redis_client.delete(key)


@pytest.mark.slow
def test_daemon_process_configured_by_environment_serves_captions(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, gpt2_weights: Path
) -> None:
    from test_daemon import daemon_process

    s = settings.replace(models="features,copywriter", weights_dir=str(gpt2_weights))
    with daemon_process(s, redis_client, tmp_path, timeout=120.0) as proc:
        gpu = GpuClient(proc.settings, redis_client)
        assert gpu.copywriter_ready()
        assert gpu.request_caption("job-a", 8, TITLE, DESCRIPTION, 1)
        got = gpu.collect("job-a", 8, 0, 60.0, caption_generation=8)
        assert protocol.caption_of(got) == CAPTION
        assert got[0]["device"] == "cpu" and got[0]["trusted"] == {"copywriter": True}
        hb_key = constants.daemon_heartbeat_key(s.deployment, s.node_name)
        deadline = time.monotonic() + 10
        while int(redis_client.hget(hb_key, "captions") or 0) < 1:  # refreshed every second
            assert time.monotonic() < deadline, redis_client.hgetall(hb_key)
            time.sleep(0.1)
        hb = redis_client.hgetall(hb_key)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0, proc.text()
    redis_client.delete(constants.caption_requests_key(s.deployment))
    assert b"copywriter:eager:1" in hb[b"models"] and int(hb[b"caption_errors"]) == 0
