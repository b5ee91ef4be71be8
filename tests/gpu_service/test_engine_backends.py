"""Each inference backend usable on this machine serves the same results as eager.

The engine runs in this process on a real arena fed by a producer process, with the
``features`` and ``saliency`` models built the way the daemon builds them
(:func:`gpu_service.daemon.build_models`); the saliency network runs at 32x32.
``cudagraphs`` and ``tensorrt`` need CUDA: they are checked by the ``gpu`` tests.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np
import pytest
import redis
import torch

from clipline_bench.daemon import ChunkSpec, publish_chunks
from clipline_core import constants
from clipline_core.settings import Settings
from gpu_service import protocol
from gpu_service.backends import REL_TOL, relative_error, resolve_precision
from gpu_service.daemon import Daemon, build_models, model_backends

CPU = torch.device("cpu")
SIZE = 32
FRAMES = 8


def _settings(base: Settings, **changes: Any) -> Settings:
    fields: dict[str, Any] = dict(
        saliency_size="32x32",
        saliency_anchors=1,
        frame_size=SIZE,
        frames_per_chunk=FRAMES,
        shm_slots=8,
        shm_slot_bytes=1 << 16,
        max_batch_size=2,
        max_queue_delay_ms=1.0,
        device="cpu",
        torch_threads=2,
        models="saliency",
    )
    fields.update(changes)
    return base.replace(**fields)


def _serve(settings: Settings, client: redis.Redis, job: str) -> list[dict[str, Any]]:
    """Run two chunks through an engine built from ``settings``; their results by chunk."""
    daemon = Daemon(settings, client, models=build_models(settings, CPU))
    daemon.publisher.start()
    try:
        specs = [ChunkSpec(job, c, FRAMES, SIZE, seed=c) for c in range(2)]
        proc = mp.get_context("spawn").Process(
            target=publish_chunks,
            args=(str(settings.arena_path), str(settings.socket_path), specs),
        )
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        daemon.engine.run_until_idle()
        assert daemon.publisher.flush(30)
    finally:
        daemon.shutdown()
        for path in (settings.arena_path, settings.socket_path):
            path.unlink(missing_ok=True)
    key = constants.results_key(settings.deployment, job)
    out = sorted((protocol.loads(r) for r in client.lrange(key, 0, -1)), key=lambda m: m["chunk"])
    client.delete(key)
    assert [m["chunk"] for m in out] == [0, 1]
    assert all(m["error"] is None for m in out)
    return out


def _compare(got: list[dict[str, Any]], ref: list[dict[str, Any]], backend: str) -> None:
    """Outputs agree with eager's within the tolerance of the precision ``auto`` chose
    (bf16 on a CPU with native bf16, else fp32)."""
    tol = REL_TOL[resolve_precision("auto", torch.device("cpu"), backend)]
    for a, b in zip(got, ref, strict=True):
        assert a["backends"]["saliency"] == backend and b["backends"]["saliency"] == "eager"
        for name in b["outputs"]:
            x = torch.from_numpy(protocol.decode_array(a["outputs"][name]).copy())
            y = torch.from_numpy(protocol.decode_array(b["outputs"][name]).copy())
            assert relative_error(x, y) <= tol, (backend, name)


@pytest.fixture(scope="module")
def eager_results(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    base = Settings(
        deployment=f"t-{time.monotonic_ns() % 10**10:010d}",
        redis_url=redis_url,
        state_dir=str(tmp_path_factory.mktemp("state")),
    )
    try:
        return _serve(_settings(base, backend="eager"), client, "job-eager")
    finally:
        client.close()


def test_per_model_override_runs_channels_last_with_eager_results(
    settings: Settings, redis_client: redis.Redis, eager_results: list[dict[str, Any]]
) -> None:
    s = _settings(settings, backend="eager", model_backends="saliency=channels_last")
    assert model_backends(s) == {"saliency": "channels_last"}
    got = _serve(s, redis_client, "job-cl")
    _compare(got, eager_results, "channels_last")
    saliency = protocol.decode_array(got[0]["outputs"]["saliency.saliency"])
    assert saliency.shape == (FRAMES,) and np.all((saliency > 0.0) & (saliency <= 1.0))


def test_invalid_backend_override_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="model_backends"):
        model_backends(_settings(settings, model_backends="saliency=warp-drive"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    os.environ.get("CLIPLINE_TEST_COMPILE") != "1",
    reason="compiling TASED-Net through the engine takes minutes on a CPU; set "
    "CLIPLINE_TEST_COMPILE=1 to run it (test_backends.py checks compile vs eager in CI)",
)
def test_compile_backend_gives_eager_results(
    settings: Settings, redis_client: redis.Redis, eager_results: list[dict[str, Any]]
) -> None:
    """``torch.compile`` (Inductor, C++ on the CPU) takes minutes for this network here."""
    s = _settings(settings, backend="compile")
    got = _serve(s, redis_client, "job-compile")
    used = got[0]["backends"]["saliency"]
    if used != "compile":
        pytest.fail(f"compile fell back to {used} on this machine")
    _compare(got, eager_results, "compile")
