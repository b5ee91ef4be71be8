"""Crash safety with real processes and SIGKILL on a real /dev/shm: producers that die
mid-write, daemons that die mid-consume or restart while workers stay attached."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipline_core import constants, metrics
from clipline_core.errors import ClipError, ErrorCode
from gpu_service.shm import ArenaLayout, Consumer, Producer, SlotState

SHM = Path(constants.DEFAULT_SHM_DIR)
FORK = mp.get_context("fork")
LAYOUT = ArenaLayout(n_slots=3, slot_bytes=128 * 1024, frames_per_chunk=2)


@pytest.fixture
def names(deployment: str) -> Iterator[tuple[Path, Path]]:
    yield (
        SHM / constants.shm_arena_name(deployment),
        SHM / constants.shm_socket_name(deployment),
    )
    for p in SHM.glob(f"*{constants.PROJECT}-{deployment}.*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def reclaimed_total() -> float:
    """Slots the consumer (the GPU daemon's side) counted as reclaimed."""
    daemon = metrics.registry(constants.MetricRole.GPU_DAEMON)
    return daemon.get_sample_value("clipline_shm_slots_reclaimed_total") or 0.0


def killed_when_ready(body: Callable[[Any], None]) -> int:
    """Run ``body(ready_event)`` in a child, SIGKILL it once it sets the event."""
    ready = FORK.Event()

    def main() -> None:
        body(ready)
        signal.pause()

    proc = FORK.Process(target=main)
    proc.start()
    assert ready.wait(20), "child did not get ready"
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    return proc.pid


def publish(producer: Producer, job: str, value: int, chunk: int = 0) -> None:
    with producer.reserve(timeout_s=5) as lease:
        lease.array((32,))[:] = value
        lease.publish(job_id=job, shape=(32,), chunk=chunk)


def test_producer_killed_mid_write_leaks_nothing(names: tuple[Path, Path], deployment: str) -> None:
    consumer = Consumer(*names, LAYOUT, deployment)
    try:

        def writer(ready: Any) -> None:
            p = Producer(*names)
            lease = p.reserve()
            lease.array((1000,))[:500] = 9  # half written
            ready.set()

        before = reclaimed_total()
        killed_when_ready(writer)
        assert consumer.arena.states()["writing"] == 1
        assert consumer.ready_count() == 0  # nothing half-written is ever published
        assert consumer.reclaim_dead() == 1
        assert consumer.reclaim_dead() == 0
        assert consumer.arena.states()["free"] == LAYOUT.n_slots
        assert reclaimed_total() == before + 1
    finally:
        consumer.close()


def test_producer_reclaims_dead_leases_itself_when_the_arena_is_full(
    names: tuple[Path, Path], deployment: str
) -> None:
    """Killed between reserve and publish, holding every slot: a live producer that
    needs a slot reclaims them without waiting for the daemon's periodic sweep."""
    consumer = Consumer(*names, LAYOUT, deployment)
    producer = Producer(*names)
    try:

        def hog(ready: Any) -> None:
            p = Producer(*names)
            for _ in range(LAYOUT.n_slots):
                p.reserve()
            ready.set()

        killed_when_ready(hog)
        assert consumer.arena.states()["writing"] == LAYOUT.n_slots
        publish(producer, "after", 5)
        (d,) = consumer.take_next(1)
        assert d.job_id == "after" and int(consumer.array(d)[0]) == 5
        consumer.release(d)
        assert consumer.arena.slots_in_use() == 0
    finally:
        producer.close()
        consumer.close()


def test_daemon_killed_mid_consume_requeues_on_restart_and_workers_stay_attached(
    names: tuple[Path, Path], deployment: str
) -> None:
    producer = Producer(*names)

    def daemon(ready: Any) -> None:
        c = Consumer(*names, LAYOUT, deployment)
        ready.set()
        while c.ready_count() < 2:
            c.wait(0.5)
        (d,) = c.take_next(1)  # holds chunk 0 as CONSUMING, then dies
        assert d.chunk == 0
        np.asarray(c.array(d)).sum()

    ready = FORK.Event()
    taken = FORK.Event()

    def daemon_main() -> None:
        daemon(ready)
        taken.set()
        signal.pause()

    proc = FORK.Process(target=daemon_main)
    proc.start()
    try:
        assert ready.wait(20)
        publish(producer, "job", 1, chunk=0)
        publish(producer, "job", 2, chunk=1)
        assert taken.wait(20)
        lease = producer.reserve()  # a worker mid-write while the daemon dies
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        inode = producer.arena.inode

        consumer = Consumer(*names, LAYOUT, deployment)  # the restarted daemon
        try:
            assert consumer.arena.inode == inode  # reused, not replaced
            assert consumer.arena.recovered == 1
            ready_now = consumer.peek_ready()
            assert [(d.chunk, d.recoveries) for d in ready_now] == [(0, 1), (1, 0)]
            assert [int(consumer.array(d)[0]) for d in ready_now] == [1, 2]
            # The attached worker carries on without noticing: its lease survived...
            lease.array((32,))[:] = 3
            lease.publish(job_id="job", shape=(32,), chunk=2)
            # ...and its wake-ups reach the new daemon's socket.
            assert consumer.wait(5.0)
            values = []
            for d in consumer.take_next(4):
                values.append((d.chunk, int(consumer.array(d)[0])))
                consumer.release(d)
            publish(producer, "job", 4, chunk=3)
            assert consumer.wait(5.0)
            for d in consumer.take_next(4):
                values.append((d.chunk, int(consumer.array(d)[0])))
                consumer.release(d)
            assert producer.arena.inode == inode
            assert values == [(0, 1), (1, 2), (2, 3), (3, 4)]
            assert consumer.arena.slots_in_use() == 0
        finally:
            consumer.close()
    finally:
        producer.close()
        if proc.is_alive():
            proc.kill()


def test_stale_arena_of_another_layout_is_replaced_and_workers_move_over(
    names: tuple[Path, Path], deployment: str
) -> None:
    producer = Producer(*names)

    def daemon(ready: Any) -> None:
        Consumer(*names, LAYOUT, deployment)
        ready.set()

    killed_when_ready(daemon)
    lease = producer.reserve()
    old_inode = producer.arena.inode
    assert producer.frame_spec == (2, 128, 128)
    bigger = ArenaLayout(n_slots=5, slot_bytes=256 * 1024, frames_per_chunk=4)
    consumer = Consumer(*names, bigger, deployment)
    try:
        assert consumer.arena.inode != old_inode
        # The chunk being written into the old file is refused, so the job retries now.
        with pytest.raises(ClipError) as err:
            lease.publish(job_id="old", shape=(4,))
        assert err.value.code == ErrorCode.GPU_UNAVAILABLE
        # The next reservation attaches the new arena and its frame spec.
        publish(producer, "new", 6)
        assert producer.frame_spec == (4, 128, 128)
        assert [d.job_id for d in consumer.peek_ready()] == ["new"]
        assert consumer.arena.states()["ready"] == 1
        leftovers = [p for p in SHM.glob(f".*{deployment}*") if p.name.endswith(".tmp")]
        assert leftovers == []
    finally:
        producer.close()
        consumer.close()


def test_clean_daemon_restart_with_workers_attached(
    names: tuple[Path, Path], deployment: str
) -> None:
    consumer = Consumer(*names, LAYOUT, deployment)
    producer = Producer(*names)
    publish(producer, "before", 1)
    (d,) = consumer.take_next(1)
    consumer.close()  # clean shutdown (requeues what it held, then removes the files)
    assert not names[0].exists()
    consumer = Consumer(*names, LAYOUT, deployment)
    try:
        publish(producer, "after", 2)  # reattaches on its own
        assert [x.job_id for x in consumer.peek_ready()] == ["after"]
        assert consumer.arena.state(d.slot) in (SlotState.FREE, SlotState.READY)
    finally:
        producer.close()
        consumer.close()
