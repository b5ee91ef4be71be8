"""The arena's lifecycle and security on a real /dev/shm: files, permissions, names,
a second daemon, stale and replaced arenas, clean shutdown, workers that exit."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clipline_core import constants
from clipline_core.errors import ClipError, ErrorCode
from gpu_service.shm import HEADER_DTYPE, ArenaLayout, Consumer, Producer, SlotState

SHM = Path(constants.DEFAULT_SHM_DIR)
LAYOUT = ArenaLayout(n_slots=4, slot_bytes=64 * 1024, frames_per_chunk=2)


def paths(deployment: str) -> tuple[Path, Path]:
    return SHM / constants.shm_arena_name(deployment), SHM / constants.shm_socket_name(deployment)


def _cleanup(deployment: str) -> None:
    for p in SHM.glob(f"*{constants.PROJECT}-{deployment}.*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@pytest.fixture
def names(deployment: str) -> Iterator[tuple[Path, Path]]:
    yield paths(deployment)
    _cleanup(deployment)


def publish_one(producer: Producer, job: str, value: int, chunk: int = 0) -> None:
    with producer.reserve(timeout_s=2) as lease:
        lease.array((16,))[:] = value
        lease.publish(job_id=job, shape=(16,), chunk=chunk)


def test_files_are_owner_only_whatever_the_umask(deployment: str, names: tuple[Path, Path]) -> None:
    old = os.umask(0)
    try:
        consumer = Consumer(*names, LAYOUT, deployment)
    finally:
        os.umask(old)
    try:
        for p in names:
            assert stat.S_IMODE(os.lstat(p).st_mode) == 0o600, p
        assert stat.S_ISREG(os.lstat(names[0]).st_mode)
        assert stat.S_ISSOCK(os.lstat(names[1]).st_mode)
    finally:
        consumer.close()


def test_names_include_the_deployment_and_two_deployments_do_not_collide() -> None:
    deps = [f"{prefix}-{uuid.uuid4().hex[:10]}" for prefix in ("a", "b")]
    consumers = [Consumer(*paths(d), LAYOUT, d) for d in deps]
    producers = [Producer(*paths(d)) for d in deps]
    try:
        assert all(d in str(p) for d in deps for p in paths(d))
        publish_one(producers[0], "job-a", 1)
        publish_one(producers[1], "job-b", 2)
        publish_one(producers[1], "job-b", 2, chunk=1)
        assert [d.job_id for d in consumers[0].peek_ready()] == ["job-a"]
        assert [d.job_id for d in consumers[1].peek_ready()] == ["job-b", "job-b"]
        assert consumers[0].arena.inode != consumers[1].arena.inode
    finally:
        for p in producers:
            p.close()
        for c in consumers:
            c.close()
        for d in deps:
            _cleanup(d)


def test_a_second_daemon_for_the_same_deployment_is_refused(
    deployment: str, names: tuple[Path, Path]
) -> None:
    consumer = Consumer(*names, LAYOUT, deployment)
    try:
        # Same process on purpose: leases are per open file, not per process.
        with pytest.raises(ClipError) as err:
            Consumer(*names, LAYOUT, deployment)
        assert err.value.code == ErrorCode.GPU_UNAVAILABLE
        assert "another GPU daemon" in err.value.message
        # The refused attempt must not have broken the first daemon's files.
        assert names[0].exists() and names[1].exists()
        producer = Producer(*names)
        publish_one(producer, "j", 3)
        assert consumer.wait(1.0)
        assert consumer.ready_count() == 1
        producer.close()
    finally:
        consumer.close()


def test_clean_shutdown_removes_both_files_and_retires_the_arena(
    deployment: str, names: tuple[Path, Path]
) -> None:
    consumer = Consumer(*names, LAYOUT, deployment)
    producer = Producer(*names)
    publish_one(producer, "j", 1)
    lease = producer.reserve(timeout_s=1)
    consumer.close()
    assert not names[0].exists() and not names[1].exists()
    # A chunk written into the removed arena is refused at once (job retried), not lost.
    with pytest.raises(ClipError) as err:
        lease.publish(job_id="j", shape=(16,))
    assert err.value.code == ErrorCode.GPU_UNAVAILABLE and err.value.transient
    with pytest.raises(ClipError) as err:
        producer.reserve(timeout_s=0.1)
    assert err.value.code == ErrorCode.GPU_UNAVAILABLE
    assert producer.withdraw("j") == 0  # nothing to take back, no error
    producer.close()


def test_no_daemon_means_gpu_unavailable(names: tuple[Path, Path]) -> None:
    producer = Producer(*names)
    with pytest.raises(ClipError) as err:
        producer.reserve(timeout_s=0.1)
    assert err.value.code == ErrorCode.GPU_UNAVAILABLE and err.value.transient
    assert producer.withdraw("job") == 0
    assert not names[0].exists()


def test_an_exiting_worker_never_removes_the_arena(
    deployment: str, names: tuple[Path, Path]
) -> None:
    """A fresh interpreter (with multiprocessing's resource tracker running) attaches,
    publishes and exits; the daemon's arena must survive and hold the chunk."""
    consumer = Consumer(*names, LAYOUT, deployment)
    script = textwrap.dedent(
        f"""
        import multiprocessing.resource_tracker as rt
        from pathlib import Path
        from gpu_service.shm import Producer
        rt.ensure_running()
        p = Producer(Path({str(names[0])!r}), Path({str(names[1])!r}))
        with p.reserve(timeout_s=5) as lease:
            lease.array((16,))[:] = 42
            lease.publish(job_id="from-worker", shape=(16,))
        """
    )
    try:
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        assert names[0].exists() and names[1].exists()
        (d,) = consumer.take_next(4)
        assert d.job_id == "from-worker"
        assert consumer.array(d).tolist() == [42] * 16
        consumer.release(d)
    finally:
        consumer.close()


def test_planted_symlink_is_refused(
    deployment: str, names: tuple[Path, Path], tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    names[0].symlink_to(victim)
    with pytest.raises(ClipError) as err:
        Consumer(*names, LAYOUT, deployment)
    assert err.value.code == ErrorCode.GPU_UNAVAILABLE
    assert victim.read_bytes() == b"precious"
    with pytest.raises(ClipError):
        Producer(*names).reserve(timeout_s=0.1)


def test_an_arena_of_another_layout_version_is_replaced_and_refused_by_workers(
    deployment: str, names: tuple[Path, Path]
) -> None:
    hdr = np.zeros((), dtype=HEADER_DTYPE)
    hdr["magic"] = constants.SHM_MAGIC
    hdr["version"] = constants.SHM_LAYOUT_VERSION + 1
    hdr["n_slots"] = 1
    fd = os.open(names[0], os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, hdr.tobytes().ljust(LAYOUT.file_bytes, b"\0"))
    os.close(fd)
    with pytest.raises(ClipError) as err:
        Producer(*names).reserve(timeout_s=0.1)
    assert "layout version" in err.value.message and not err.value.transient
    consumer = Consumer(*names, LAYOUT, deployment)
    try:
        assert consumer.arena.recovered == 0
        assert consumer.arena.states() == {s.name.lower(): 0 for s in SlotState} | {"free": 4}
        producer = Producer(*names)
        publish_one(producer, "j", 5)
        assert consumer.ready_count() == 1
        producer.close()
    finally:
        consumer.close()


def test_arena_too_big_for_the_directory_fails_clearly(deployment: str, tmp_path: Path) -> None:
    """A tmpfs of 1 MiB cannot hold a 4 MiB arena: the daemon says so at start instead
    of a worker dying of SIGBUS later. Needs mount privileges; skips without them."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        arena = mnt / constants.shm_arena_name(deployment)
        with pytest.raises(ClipError) as err:
            Consumer(arena, mnt / "s.sock", ArenaLayout(n_slots=4, slot_bytes=1 << 20), deployment)
        assert "no room" in err.value.message
        assert not arena.exists()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_spinning_wait_sees_a_publish_without_its_wakeup(
    deployment: str, names: tuple[Path, Path], tmp_path: Path
) -> None:
    """The consumer's spin phase reads the slot states, not just the wake-up socket."""
    arena, _sock = names
    consumer = Consumer(arena, names[1], LAYOUT, deployment, spin_s=0.5)
    # A producer whose wake-up datagram goes nowhere: only the slot state changes.
    producer = Producer(arena, tmp_path / "nobody-listens.sock")
    try:
        publish_one(producer, "job-spin", 3)
        assert consumer.wait(1.0) is True
        assert [d.job_id for d in consumer.peek_ready()] == ["job-spin"]
        consumer.spin_s = 0.0
        consumer.take(consumer.peek_ready())
        assert consumer.wait(0.2) is False  # nothing READY, no datagram: times out
    finally:
        producer.close()
        consumer.close()
