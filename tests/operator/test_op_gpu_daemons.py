"""Two GPU daemons of one node, as the operator configures them, run as real processes.

The environment of each daemon comes from the operator's builder (GPU 0 and GPU 1 of
node ``node-a``); in a cluster each daemon's ``CLIPLINE_SHM_DIR`` is its own hostPath, so
here each gets its own directory. Checked: each daemon keeps its own heartbeat (its own
name in Redis), a worker of GPU 1 (``GpuClient`` with GPU 1's settings) sees GPU 1's
daemon, and chunks published into GPU 1's arena are processed by GPU 1's daemon alone.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from clipline_bench.daemon import ChunkSpec, publish_chunks
from clipline_core import constants
from clipline_core.settings import Settings
from clipline_operator import builders
from clipline_operator.builders import Pipeline
from gpu_service import protocol
from gpu_service.client import GpuClient

NODE = "node-a"
SIZE = 32
FRAMES = 8


def _settings_of(obj: dict[str, object], base: Settings, shm_dir: Path) -> Settings:
    """The container's CLIPLINE_* settings (node name resolved), run on this machine."""
    pod = obj["spec"]["template"]["spec"]  # type: ignore[index]
    env = {
        e["name"]: e.get("value", NODE)
        for e in pod["containers"][0]["env"]
        if e["name"].startswith("CLIPLINE_") and "secretKeyRef" not in e.get("valueFrom", {})
    }
    return Settings.from_env(env).replace(
        redis_url=base.redis_url,
        deployment=base.deployment,
        state_dir=base.state_dir,
        shm_dir=str(shm_dir),
        models="features",
        device="cpu",
        torch_threads=1,
        frame_size=SIZE,
        frames_per_chunk=FRAMES,
        shm_slots=8,
        shm_slot_bytes=1 << 16,
        daemon_metrics_port=0,
    )


@contextlib.contextmanager
def _daemon(s: Settings, client: redis.Redis, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_service"],
            env={**os.environ, **s.to_env(), "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    key = constants.daemon_heartbeat_key(s.deployment, s.daemon_name)
    try:
        deadline = time.monotonic() + 90
        while not client.exists(key):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        client.delete(key)
        for path in (s.arena_path, s.socket_path):
            path.unlink(missing_ok=True)


def test_two_daemons_of_one_node_keep_their_own_identity_and_arena(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    body = {
        "metadata": {"name": "clips", "namespace": "video", "uid": "u"},
        "spec": {"image": "clipline:1", "redis": {"secretRef": {"name": "r"}}},
    }
    pipeline = Pipeline.from_body(body)
    per_gpu: list[Settings] = []
    for gpu in (0, 1):
        shm = tmp_path / f"shm-gpu{gpu}"
        shm.mkdir(mode=0o700)
        daemon_env = _settings_of(
            builders.build_daemon_deployment(pipeline, NODE, gpu), settings, shm
        )
        worker_env = _settings_of(
            builders.build_worker_deployment(pipeline, NODE, gpu, 1), settings, shm
        )
        assert (daemon_env.gpu_index, daemon_env.daemon_name) == (
            worker_env.gpu_index,
            worker_env.daemon_name,
        )
        per_gpu.append(daemon_env)
    zero, one = per_gpu
    assert (zero.daemon_name, one.daemon_name) == (NODE, f"{NODE}/gpu1")
    with (
        _daemon(zero, redis_client, tmp_path / "gpu0.log"),
        _daemon(one, redis_client, tmp_path / "gpu1.log"),
    ):
        beats = [
            redis_client.hgetall(constants.daemon_heartbeat_key(s.deployment, s.daemon_name))
            for s in per_gpu
        ]
        boots = [str(b.get(b"boot", b""), "ascii") for b in beats]  # type: ignore[arg-type]
        assert boots[0] != boots[1]
        # A worker of each GPU sees its own daemon (a restart of the other is no concern).
        for s, boot in zip(per_gpu, boots, strict=True):
            client = GpuClient(s, redis_client)
            try:
                assert client.daemon_boot() == boot
            finally:
                client.close()
        # GPU 1's arena is drained by GPU 1's daemon only.
        specs = [ChunkSpec("job-gpu1", c, FRAMES, SIZE, seed=c) for c in range(5)]
        producer = mp.get_context("spawn").Process(
            target=publish_chunks, args=(str(one.arena_path), str(one.socket_path), specs)
        )
        producer.start()
        producer.join(60)
        assert producer.exitcode == 0
        key = constants.results_key(one.deployment, "job-gpu1")
        deadline = time.monotonic() + 60
        while redis_client.llen(key) < len(specs):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        results = [protocol.loads(raw) for raw in redis_client.lrange(key, 0, -1)]
        assert sorted(m["chunk"] for m in results) == list(range(5))
        assert all(m["error"] is None for m in results)
        time.sleep(1.5)  # one more heartbeat of each
        items = [
            int(
                redis_client.hget(  # type: ignore[arg-type]
                    constants.daemon_heartbeat_key(s.deployment, s.daemon_name), "items"
                )
            )
            for s in per_gpu
        ]
        assert items == [0, 5]
        assert zero.arena_path != one.arena_path
        redis_client.delete(key)
