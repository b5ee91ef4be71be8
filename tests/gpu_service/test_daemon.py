"""The GPU daemon as a real process (``python -m gpu_service``) fed by real producers.

Priority order through the daemon, draining on SIGTERM with nothing lost, the metrics
and health endpoints, the heartbeat, and the backend choice with its fallback chain.
The daemon is paused with SIGSTOP while producers fill the arena, so that it sees all
the work at once when it resumes (the order it then picks is deterministic).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families

from clipline_bench.daemon import ChunkSpec, publish_chunks
from clipline_core import constants
from clipline_core.settings import Settings
from gpu_service import protocol
from gpu_service.backends import resolve_precision

SIZE = 32
FRAMES = 8


class DaemonProcess:
    def __init__(self, proc: subprocess.Popen[bytes], settings: Settings, log: Path) -> None:
        self.proc = proc
        self.settings = settings
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def daemon_process(
    settings: Settings, client: redis.Redis, tmp_path: Path, timeout: float = 90.0, **env: str
) -> Iterator[DaemonProcess]:
    # These tests are about the daemon's mechanics on random frames: the cheap
    # training-free features model serves them (the localizer has tests of its own).
    s = settings.replace(
        models=settings.models if settings.models != Settings().models else "features",
        frame_size=SIZE,
        frames_per_chunk=FRAMES,
        shm_slots=16,
        shm_slot_bytes=1 << 16,
        device="cpu",
        torch_threads=1,
        shm_starvation_age_s=600.0,
    )
    full_env = {**os.environ, **s.to_env(), "PYTHONUNBUFFERED": "1", **env}
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_service"],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    handle = DaemonProcess(proc, s, log)
    key = constants.daemon_heartbeat_key(s.deployment, s.node_name)
    try:
        deadline = time.monotonic() + timeout
        while not client.exists(key):
            assert proc.poll() is None, f"daemon exited:\n{handle.text()}"
            assert time.monotonic() < deadline, f"daemon not ready:\n{handle.text()}"
            time.sleep(0.05)
        yield handle
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(10)
        for path in (s.arena_path, s.socket_path):
            path.unlink(missing_ok=True)
        client.delete(key)


def produce(settings: Settings, specs: list[ChunkSpec]) -> Any:
    proc = mp.get_context("spawn").Process(
        target=publish_chunks, args=(str(settings.arena_path), str(settings.socket_path), specs)
    )
    proc.start()
    return proc


def collect(
    client: redis.Redis, settings: Settings, job: str, n: int, timeout: float = 60.0
) -> list[dict[str, Any]]:
    key = constants.results_key(settings.deployment, job)
    deadline = time.monotonic() + timeout
    while client.llen(key) < n:
        assert time.monotonic() < deadline, f"{client.llen(key)} of {n} results for {job}"
        time.sleep(0.02)
    out = [protocol.loads(raw) for raw in client.lrange(key, 0, -1)]
    client.delete(key)
    return out


def _wait_arena_filled(settings: Settings, proc: Any, n: int) -> None:
    proc.join(60)
    assert proc.exitcode == 0
    from gpu_service.shm import attached

    with attached(settings.arena_path) as arena:
        assert arena.states()["ready"] == n


def test_priority_order_through_the_daemon(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    with daemon_process(settings, redis_client, tmp_path, CLIPLINE_MAX_BATCH_SIZE="2") as daemon:
        s = daemon.settings
        # (chunk, priority class, request arrival): published in this order while paused.
        plan = [(0, 2, 100.0), (1, 1, 101.0), (2, 0, 105.0), (3, 1, 99.0), (4, 0, 104.0)]
        plan.append((5, 2, 98.0))
        daemon.pause()
        specs = [
            ChunkSpec("job-o", c, FRAMES, SIZE, seed=c, priority=p, arrival=a) for c, p, a in plan
        ]
        _wait_arena_filled(s, produce(s, specs), len(specs))
        daemon.resume()
        got = collect(redis_client, s, "job-o", len(specs))
    batches: dict[int, set[int]] = {}
    for m in got:
        assert m["error"] is None and m["batch"] == 2
        batches.setdefault(m["batch_seq"], set()).add(m["chunk"])
    # Best first: class 0 by arrival (4, 2), then class 1 (3, 1), then class 2 (5, 0).
    assert [batches[k] for k in sorted(batches)] == [{4, 2}, {3, 1}, {5, 0}]


def test_sigterm_drains_every_item_then_removes_the_arena(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    with daemon_process(
        settings,
        redis_client,
        tmp_path,
        CLIPLINE_MAX_BATCH_SIZE="2",
        CLIPLINE_MAX_QUEUE_DELAY_MS="60000",  # only draining may run the last odd item
    ) as daemon:
        s = daemon.settings
        daemon.pause()
        specs = [ChunkSpec("job-t", c, FRAMES, SIZE, seed=c) for c in range(11)]
        _wait_arena_filled(s, produce(s, specs), len(specs))
        daemon.proc.send_signal(signal.SIGTERM)  # delivered when it resumes, mid-work
        daemon.resume()
        assert daemon.proc.wait(60) == 0, daemon.text()
        got = collect(redis_client, s, "job-t", len(specs), timeout=5)
        hb = constants.daemon_heartbeat_key(s.deployment, s.node_name)
        assert not redis_client.exists(hb)
        assert not s.arena_path.exists() and not s.socket_path.exists()
        log = daemon.text()
    assert sorted(m["chunk"] for m in got) == list(range(11))
    assert all(m["error"] is None for m in got)
    assert sorted(m["batch"] for m in got).count(1) == 1  # the odd one, run by the drain
    assert "draining" in log and "stopped after 11 items" in log


def test_metrics_readiness_and_heartbeat_while_fed_by_two_producers(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    port = _free_port()
    with daemon_process(
        settings,
        redis_client,
        tmp_path,
        CLIPLINE_DAEMON_METRICS_PORT=str(port),
        CLIPLINE_MAX_BATCH_SIZE="4",
    ) as daemon:
        s = daemon.settings
        base = f"http://127.0.0.1:{port}"
        assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        procs = [
            produce(s, [ChunkSpec(f"job-{p}", c, FRAMES, SIZE, seed=c) for c in range(6)])
            for p in ("a", "b")
        ]
        got = collect(redis_client, s, "job-a", 6) + collect(redis_client, s, "job-b", 6)
        for proc in procs:
            proc.join(30)
        time.sleep(1.5)  # one more heartbeat and gauge refresh
        text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        raw: dict[bytes, bytes] = redis_client.hgetall(  # type: ignore[assignment]
            constants.daemon_heartbeat_key(s.deployment, s.node_name)
        )
        hb = {k.decode(): v.decode() for k, v in raw.items()}
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{base}/readyz", timeout=2)
    assert all(m["error"] is None for m in got)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    labels = (("backend", "eager"), ("model", "features"))
    batches = len({m["batch_seq"] for m in got})
    assert samples[(f"{constants.Metric.ITEMS_PROCESSED_TOTAL}", labels)] == 12
    assert samples[(f"{constants.Metric.BATCH_SIZE}_count", labels)] == batches
    assert samples[(f"{constants.Metric.BATCH_SIZE}_sum", labels)] == 12
    assert samples[(f"{constants.Metric.INFERENCE_SECONDS}_count", labels)] == batches
    assert samples[(f"{constants.Metric.ARENA_WAIT_SECONDS}_count", ())] == 12
    busy = samples[(constants.Metric.DEVICE_BUSY_RATIO, (("node", s.node_name),))]
    assert 0.0 < busy <= 1.0
    assert not any(name == constants.Metric.GPU_UTILIZATION_RATIO for name, _ in samples)
    # the daemon's own series only: none of the workers' or the API's
    assert not any(
        name.startswith((constants.Metric.JOBS_IN_FLIGHT, constants.Metric.FRAMES_DECODED_TOTAL))
        or name.startswith(constants.Metric.JOBS_TOTAL.removesuffix("_total"))
        for name, _ in samples
    )
    info = [lab for name, lab in samples if name == constants.Metric.BUILD_INFO]
    assert len(info) == 1 and ("role", "gpu-daemon") in info[0]
    assert hb["device"] == "cpu" and hb["models"] == "features:eager:1"
    assert int(hb["items"]) == 12 and int(hb["batches"]) == batches and hb["ready"] == "1"
    assert float(hb["busy_s"]) > 0


def test_the_configured_backend_serves_the_neural_model_and_is_reported(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """``Settings.backend`` reaches the models; the heartbeat, the log and every result
    say which backend each model actually runs (``features`` has none: always eager)."""
    with daemon_process(
        settings,
        redis_client,
        tmp_path,
        timeout=240.0,
        CLIPLINE_MODELS="saliency",
        CLIPLINE_BACKEND="channels_last",
        CLIPLINE_MAX_BATCH_SIZE="2",
    ) as daemon:
        s = daemon.settings
        hb_key = constants.daemon_heartbeat_key(s.deployment, s.node_name)
        hb = redis_client.hget(hb_key, "models")
        precisions = redis_client.hget(hb_key, "precisions")
        proc = produce(s, [ChunkSpec("job-s", 0, FRAMES, SIZE, seed=1)])
        (msg,) = collect(redis_client, s, "job-s", 1, timeout=120)
        proc.join(30)
        log = daemon.text()
    assert hb == b"features:eager:1,saliency:channels_last:0"
    auto = resolve_precision("auto", torch.device("cpu"), "channels_last")
    assert precisions == f"features:fp32,saliency:{auto}".encode()
    assert "model saliency: backend channels_last (requested channels_last)" in log
    assert msg["error"] is None
    assert msg["backends"] == {"features": "eager", "saliency": "channels_last"}
    assert msg["trusted"] == {"features": True, "saliency": False}
    assert protocol.decode_array(msg["outputs"]["saliency.saliency"]).shape == (FRAMES,)
