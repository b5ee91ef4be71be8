"""The engine on CUDA: registered arena, copy/compute overlap, busy time, backends vs eager.

Runs only where CUDA is available (``bench/gpu_check.sh`` on a GPU machine); elsewhere
every test skips with the reason. The engine runs in this process on a real arena fed
by a producer process, results go to a real Redis.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import time
from typing import Any

import numpy as np
import pytest
import redis
import torch

from clipline_bench.daemon import ChunkSpec, chunk_data, publish_chunks
from clipline_core import constants
from clipline_core.settings import Settings
from gpu_service import protocol
from gpu_service.backends import REL_TOL, relative_error
from gpu_service.daemon import Daemon, build_models
from gpu_service.models.features import FeaturesModel

pytestmark = pytest.mark.gpu

SIZE = 128
FRAMES = 16


@pytest.fixture(autouse=True)
def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")


def _settings(base: Settings, **changes: Any) -> Settings:
    fields: dict[str, Any] = dict(
        saliency_size="64x96",
        saliency_anchors=2,
        frame_size=SIZE,
        frames_per_chunk=FRAMES,
        shm_slots=24,
        shm_slot_bytes=FRAMES * SIZE * SIZE * 3,
        max_batch_size=4,
        max_queue_delay_ms=2.0,
        device="cuda",
    )
    fields.update(changes)
    return base.replace(**fields)


def _feed(settings: Settings, specs: list[ChunkSpec]) -> None:
    proc = mp.get_context("spawn").Process(
        target=publish_chunks, args=(str(settings.arena_path), str(settings.socket_path), specs)
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0


def _results(client: redis.Redis, settings: Settings, job: str, n: int) -> list[dict[str, Any]]:
    key = constants.results_key(settings.deployment, job)
    deadline = time.monotonic() + 60
    while client.llen(key) < n:
        assert time.monotonic() < deadline, f"{client.llen(key)} of {n} results"
        time.sleep(0.02)
    out = [protocol.loads(r) for r in client.lrange(key, 0, -1)]
    client.delete(key)
    return sorted(out, key=lambda m: m["chunk"])


def _remove_files(settings: Settings) -> None:
    for path in (settings.arena_path, settings.socket_path):
        path.unlink(missing_ok=True)


def _drain(daemon: Daemon) -> None:
    daemon.engine.start_draining()
    while not daemon.engine.drained():
        daemon.engine.run_once()
    assert daemon.publisher.flush(60)


def test_cuda_pipeline_overlaps_copies_with_compute_and_matches_the_cpu(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # The production input size, so that each batch's compute clearly outlasts the
    # launch of the next one (a launch-bound toy model would leave nothing to overlap).
    s = _settings(
        settings, models="saliency", max_batch_size=2, saliency_size="224x384", saliency_anchors=4
    )
    models = build_models(s, torch.device("cuda"))
    daemon = Daemon(s, redis_client, models=models)
    assert daemon.engine.depth == 2
    assert getattr(daemon.executor, "registered", False), "cudaHostRegister of the arena failed"
    daemon.publisher.start()
    try:
        daemon.engine.warmup(FRAMES, SIZE, SIZE, (1, 2))
        specs = [ChunkSpec("job-g", c, FRAMES, SIZE, seed=c) for c in range(16)]
        specs.append(ChunkSpec("job-g", 16, 5, SIZE, seed=16))  # a short last chunk
        _feed(s, specs)
        start = time.monotonic()
        _drain(daemon)
        wall = time.monotonic() - start
        assert daemon.consumer.arena.states()["free"] == s.shm_slots
        got = _results(redis_client, s, "job-g", len(specs))
        done = sorted(daemon.engine.recent, key=lambda c: c.batch.seq)
        busy = daemon.busy.total()
    finally:
        daemon.shutdown()
        _remove_files(s)
    assert all(m["error"] is None and m["device"] == "cuda" for m in got)
    # Copy of batch N+1 finished while batch N was still computing (the pipeline).
    pairs = list(itertools.pairwise(done))
    overlapped = sum(1 for a, b in pairs if b.copy_end < a.span[1])
    assert overlapped >= len(pairs) // 2, [(a.span, b.copy_end) for a, b in pairs]
    # Busy time from CUDA events: positive, never more than the wall time it spans.
    spans = [c.span for c in done]
    assert all(e > s0 for s0, e in spans)
    assert 0 < busy <= wall + 0.05
    # The features computed on the GPU match the CPU model on the same frames.
    cpu = FeaturesModel(torch.device("cpu"))
    for m in got:
        frames = chunk_data(m["chunk"], m["frames"], SIZE)
        want = cpu(torch.from_numpy(frames)[None])
        for key in ("hist", "thumb", "motion"):
            np.testing.assert_allclose(
                protocol.decode_array(m["outputs"][f"features.{key}"]),
                want[key][0].numpy(),
                atol=2e-4,
            )


@pytest.mark.parametrize("backend", ["channels_last", "cudagraphs"])
def test_cuda_backend_serves_results_close_to_eager(
    backend: str, settings: Settings, redis_client: redis.Redis
) -> None:
    outputs: dict[str, list[np.ndarray]] = {}
    for be in ("eager", backend):
        s = _settings(
            settings,
            models="saliency",
            model_backends=f"saliency={be}",
            deployment=f"{settings.deployment}-{be.replace('_', '-')}"[:40],
        )
        daemon = Daemon(s, redis_client, models=build_models(s, torch.device("cuda")))
        daemon.publisher.start()
        try:
            assert daemon.models[1].backend == be, f"{be} fell back to {daemon.models[1].backend}"
            _feed(s, [ChunkSpec("job-b", c, FRAMES, SIZE, seed=c) for c in range(6)])
            _drain(daemon)
            got = _results(redis_client, s, "job-b", 6)
        finally:
            daemon.shutdown()
            _remove_files(s)
        assert {m["backends"]["saliency"] for m in got} == {be}
        outputs[be] = [protocol.decode_array(m["outputs"]["saliency.saliency"]) for m in got]
    precision = "bf16"  # the accelerated backends' default precision on CUDA
    for a, b in zip(outputs[backend], outputs["eager"], strict=True):
        err = relative_error(torch.from_numpy(a.copy()), torch.from_numpy(b.copy()))
        assert err <= REL_TOL[precision], (backend, err)
