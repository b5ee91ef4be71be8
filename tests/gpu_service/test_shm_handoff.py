"""The hand-off protocol with real processes on a real /dev/shm: zero-copy, ordering,
starvation aging, backpressure, threads, fork, withdraw, requeue and metrics."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clipline_core import constants, metrics
from clipline_core.errors import ClipError, ErrorCode
from gpu_service.shm import ArenaLayout, ChunkKind, Consumer, Producer, SlotState

SHM = Path(constants.DEFAULT_SHM_DIR)
FORK = mp.get_context("fork")


@pytest.fixture
def names(deployment: str) -> Iterator[tuple[Path, Path]]:
    yield (
        SHM / constants.shm_arena_name(deployment),
        SHM / constants.shm_socket_name(deployment),
    )
    for p in SHM.glob(f"*{constants.PROJECT}-{deployment}.*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def make(
    names: tuple[Path, Path], deployment: str, n_slots: int = 4, **kw: Any
) -> tuple[Consumer, Producer]:
    layout = ArenaLayout(n_slots=n_slots, slot_bytes=256 * 1024, frames_per_chunk=2)
    consumer = Consumer(*names, layout, deployment, **kw)
    return consumer, Producer(*names, reserve_timeout_s=2.0)


def publish(producer: Producer, job: str, *, value: int = 0, **kw: Any) -> None:
    with producer.reserve() as lease:
        lease.array((8, 4))[:] = value
        lease.publish(job_id=job, shape=(8, 4), **kw)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of this process's metrics, from the registry of whichever role owns it."""
    for role in constants.MetricRole:
        value = metrics.registry(role).get_sample_value(name, labels or {})
        if value is not None:
            return value
    return 0.0


def test_consumer_sees_the_producers_pages_without_a_copy(
    names: tuple[Path, Path], deployment: str
) -> None:
    """The producer (another process) keeps its view and writes *after* publishing
    (a test-only path); the consumer's already-built tensor shows the new bytes."""
    consumer, _ = make(names, deployment)
    go, wrote = FORK.Event(), FORK.Event()

    def producer_proc() -> None:
        p = Producer(*names)
        lease = p.reserve(timeout_s=5)
        arr = lease.array((64, 64, 3))
        arr[:] = 7
        lease.publish(job_id="zc", shape=(64, 64, 3))
        go.wait(10)
        arr[0, 0, 0] = 99  # after publish: only visible if the pages are shared
        arr[-1, -1, -1] = 98
        wrote.set()

    proc = FORK.Process(target=producer_proc)
    proc.start()
    try:
        assert consumer.wait(10.0)
        (d,) = consumer.take_next(1)
        tensor = torch.from_numpy(consumer.array(d))
        assert int(tensor.sum()) == 7 * 64 * 64 * 3
        base, length = consumer.arena.base_address()
        stride = consumer.arena.layout.slot_stride
        assert tensor.data_ptr() == base + d.slot * stride  # the slot itself
        assert base % 4096 == 0 and length == consumer.arena.layout.n_slots * stride
        go.set()
        assert wrote.wait(10)
        assert int(tensor[0, 0, 0]) == 99 and int(tensor[-1, -1, -1]) == 98
        del tensor
        consumer.release(d)
    finally:
        proc.join(10)
        consumer.close()
    assert proc.exitcode == 0


def test_order_is_priority_then_request_arrival_then_chunk(
    names: tuple[Path, Path], deployment: str
) -> None:
    consumer, producer = make(names, deployment, n_slots=8)
    items = [  # (job, priority, arrival, chunk)
        ("low-old", 2, 100.0, 0),
        ("norm-new", 1, 300.0, 0),
        ("high-new", 0, 400.0, 1),
        ("norm-old", 1, 200.0, 1),
        ("high-new", 0, 400.0, 0),
        ("norm-old", 1, 200.0, 0),
        ("high-old", 0, 50.0, 3),
        ("norm-old", 1, 200.0, -1),  # product refs travel as chunk -1: first of their job
    ]

    def other_process() -> None:  # half of them come from another producer process
        p = Producer(*names)
        for job, prio, arrival, chunk in items[4:]:
            publish(p, job, priority=prio, arrival=arrival, chunk=chunk)

    for job, prio, arrival, chunk in items[:4]:
        publish(producer, job, priority=prio, arrival=arrival, chunk=chunk)
    proc = FORK.Process(target=other_process)
    proc.start()
    proc.join(20)
    assert proc.exitcode == 0
    try:
        expected = [
            ("high-old", 3),
            ("high-new", 0),
            ("high-new", 1),
            ("norm-old", -1),
            ("norm-old", 0),
            ("norm-old", 1),
            ("norm-new", 0),
            ("low-old", 0),
        ]
        assert [(d.job_id, d.chunk) for d in consumer.peek_ready()] == expected
        first = consumer.take_next(3)
        assert [(d.job_id, d.chunk) for d in first] == expected[:3]
        assert [(d.job_id, d.chunk) for d in consumer.peek_ready()] == expected[3:]
    finally:
        producer.close()
        consumer.close()


def test_lower_classes_do_not_starve_beyond_the_configured_age(
    names: tuple[Path, Path], deployment: str
) -> None:
    consumer, producer = make(names, deployment, n_slots=8, starvation_age_s=0.3)
    try:
        publish(producer, "low", priority=2, arrival=1000.0)
        publish(producer, "high-1", priority=0, arrival=900.0)
        # Young: strict classes.
        assert [d.job_id for d in consumer.peek_ready()] == ["high-1", "low"]
        time.sleep(0.35)
        publish(producer, "high-2", priority=0, arrival=800.0)
        # "low" and "high-1" have waited longer than 0.3 s: they now go ahead of every
        # class, oldest request first; the fresh high-priority item waits its turn.
        assert [d.job_id for d in consumer.peek_ready()] == ["high-1", "low", "high-2"]
    finally:
        producer.close()
        consumer.close()


def test_reserve_waits_then_raises_backpressure(names: tuple[Path, Path], deployment: str) -> None:
    consumer, producer = make(names, deployment, n_slots=2)
    try:
        held = [producer.reserve(), producer.reserve()]
        before = sample("clipline_shm_reserve_wait_seconds_count")
        start = time.monotonic()
        with pytest.raises(ClipError) as err:
            producer.reserve(timeout_s=0.2)
        assert time.monotonic() - start >= 0.2
        assert err.value.code == ErrorCode.BACKPRESSURE and err.value.transient
        assert "2 slots all busy" in err.value.message
        assert sample("clipline_shm_reserve_wait_seconds_count") == before + 1
        # A slot freed while someone waits is picked up before the timeout.
        threading.Timer(0.1, held[0].abort).start()
        lease = producer.reserve(timeout_s=5)
        assert lease.slot == held[0].slot
        lease.abort()
        held[1].abort()
        assert consumer.arena.slots_in_use() == 0
    finally:
        producer.close()
        consumer.close()


def test_threads_sharing_one_producer_deliver_each_chunk_exactly_once(
    names: tuple[Path, Path], deployment: str
) -> None:
    consumer, producer = make(names, deployment, n_slots=4)
    threads, per_thread = 4, 40
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(per_thread):
                publish(producer, f"t{t}", value=(t * per_thread + i) % 251, chunk=i)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 30
    try:
        while len(seen) < threads * per_thread and time.monotonic() < deadline:
            taken = consumer.take_next(4)
            if not taken:
                consumer.wait(0.05)
            for d in taken:
                t = int(d.job_id[1:])
                assert np.all(consumer.array(d) == (t * per_thread + d.chunk) % 251)
                seen.append((d.job_id, d.chunk))
                consumer.release(d)
        for w in workers:
            w.join(10)
        assert not errors
        assert sorted(seen) == sorted(
            (f"t{t}", i) for t in range(threads) for i in range(per_thread)
        )
        assert consumer.arena.slots_in_use() == 0
    finally:
        producer.close()
        consumer.close()


def test_a_producer_in_the_consumers_process_keeps_its_lease(
    names: tuple[Path, Path], deployment: str
) -> None:
    """Leases belong to the open file, not to the process: the daemon's reclaim must not
    take a slot that a live producer in the same process is writing."""
    consumer, producer = make(names, deployment)
    try:
        lease = producer.reserve()
        assert consumer.reclaim_dead() == 0
        assert consumer.arena.state(lease.slot) == SlotState.WRITING
        lease.publish(job_id="j", shape=(1,))
        assert [d.job_id for d in consumer.take_next(1)] == ["j"]
    finally:
        producer.close()
        consumer.close()


def test_forked_children_attach_on_their_own(names: tuple[Path, Path], deployment: str) -> None:
    """Like Celery prefork: a child inherits a Producer that is attached and holding a
    lease; the child reattaches for itself, and its exit leaves the parent's lease alone."""
    consumer, producer = make(names, deployment)
    lease = producer.reserve()
    lease.array((8, 4))[:] = 1

    def child() -> None:
        publish(producer, "child", value=2)
        assert producer.arena.pid != lease.arena.pid

    try:
        procs = [FORK.Process(target=child) for _ in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(20)
            assert proc.exitcode == 0
        assert consumer.reclaim_dead() == 0  # the parent is alive and still writing
        assert consumer.arena.state(lease.slot) == SlotState.WRITING
        lease.publish(job_id="parent", shape=(8, 4))
        got: dict[str, list[int]] = {}
        for d in consumer.take_next(4):
            got.setdefault(d.job_id, []).append(int(consumer.array(d)[0, 0]))
            consumer.release(d)
        assert got == {"child": [2, 2], "parent": [1]}
    finally:
        producer.close()
        consumer.close()


def test_withdraw_takes_back_only_unconsumed_chunks_of_that_attempt(
    names: tuple[Path, Path], deployment: str
) -> None:
    consumer, producer = make(names, deployment, n_slots=8)
    try:
        for chunk in range(3):
            publish(producer, "job-a", generation=1, chunk=chunk)
        publish(producer, "job-a", generation=2)
        publish(producer, "job-b", generation=1)
        (taken,) = consumer.take([d for d in consumer.peek_ready() if d.chunk == 2])
        assert producer.withdraw("job-a", generation=1) == 2
        assert consumer.arena.state(taken.slot) == SlotState.CONSUMING  # untouched
        left = sorted((d.job_id, d.generation) for d in consumer.peek_ready())
        assert left == [("job-a", 2), ("job-b", 1)]
        assert producer.withdraw("job-a") == 1
        assert [d.job_id for d in consumer.peek_ready()] == ["job-b"]
    finally:
        producer.close()
        consumer.close()


def test_descriptor_round_trip_requeue_and_release(
    names: tuple[Path, Path], deployment: str
) -> None:
    consumer, producer = make(names, deployment)
    try:
        with producer.reserve() as lease:
            arr = lease.array((2, 3, 4, 5, 6), np.float32)
            arr[:] = np.arange(arr.size, dtype=np.float32).reshape(arr.shape)
            lease.publish(
                job_id="job-" + "x" * 44,
                shape=(2, 3, 4, 5, 6),
                dtype=np.float32,
                chunk=-1,
                priority=2,
                arrival=1234.5,
                generation=3,
                kind=ChunkKind.REFS,
            )
        (d,) = consumer.peek_ready()
        assert (d.job_id, d.kind, d.chunk, d.priority, d.arrival, d.generation) == (
            "job-" + "x" * 44,
            ChunkKind.REFS,
            -1,
            2,
            1234.5,
            3,
        )
        assert d.shape == (2, 3, 4, 5, 6) and d.dtype == np.float32 and d.recoveries == 0
        assert d.nbytes == 720 * 4
        (t,) = consumer.take([d])
        assert consumer.take([d]) == []  # already taken
        assert consumer.arena.state(t.slot) == SlotState.CONSUMING
        consumer.requeue(t)
        assert consumer.arena.state(t.slot) == SlotState.READY
        (t,) = consumer.take_next(1)
        assert float(consumer.array(t).sum()) == float(np.arange(720).sum())
        consumer.release(t)
        assert consumer.arena.states()["free"] == 4
    finally:
        producer.close()
        consumer.close()


def test_bad_publish_arguments_leave_the_lease_usable(
    names: tuple[Path, Path], deployment: str
) -> None:
    consumer, producer = make(names, deployment)
    try:
        lease = producer.reserve()
        with pytest.raises(ValueError):
            lease.publish(job_id="j", shape=(1 << 20,), dtype=np.float32)  # 4 MiB > slot
        with pytest.raises(ValueError):
            lease.publish(job_id="j", shape=(4,), dtype=np.complex64)
        with pytest.raises(ValueError):
            lease.publish(job_id="j" * 49, shape=(4,))
        with pytest.raises(ClipError) as err:
            lease.array((1 << 20,), np.float32)
        assert err.value.code == ErrorCode.TOO_LARGE
        lease.publish(job_id="j", shape=(4,))
        with pytest.raises(RuntimeError):
            lease.publish(job_id="j", shape=(4,))
        assert consumer.ready_count() == 1
    finally:
        producer.close()
        consumer.close()


def test_metrics_follow_the_hand_off(names: tuple[Path, Path], deployment: str) -> None:
    consumer, producer = make(names, deployment)
    try:
        bytes_before = sample("clipline_handoff_bytes_total")
        handoffs_before = sample("clipline_handoff_seconds_count")
        publish(producer, "m")
        publish(producer, "m")
        assert sample("clipline_handoff_bytes_total") == bytes_before + 2 * 32
        taken = consumer.take_next(2)
        consumer.wait(0)  # take records its metrics off the hot path: at wait or release
        assert sample("clipline_handoff_seconds_count") == handoffs_before + 2
        assert sample("clipline_shm_slots_in_use") == 2
        assert sample("clipline_shm_slots") == 4
        consumer.release(taken[0])
        assert sample("clipline_shm_slots_in_use") == 1
        consumer.release(taken[1])
        assert sample("clipline_shm_slots_in_use") == 0
    finally:
        producer.close()
        consumer.close()


def test_wait_wakes_on_publish_and_times_out_otherwise(
    names: tuple[Path, Path], deployment: str
) -> None:
    consumer, producer = make(names, deployment)
    try:
        assert consumer.wait(0.05) is False
        assert consumer.wait(0) is False
        timer = threading.Timer(0.05, publish, args=(producer, "w"))
        timer.start()
        assert consumer.wait(10.0) is True
        assert consumer.ready_count() == 1
        for _ in range(20):  # many signals queue up; one wait drains them all
            producer.notify()
        assert consumer.wait(0) is True
        assert consumer.wait(0) is False
    finally:
        producer.close()
        consumer.close()


def test_views_are_reused_per_slot_and_follow_shape_changes(
    names: tuple[Path, Path], deployment: str
) -> None:
    consumer, producer = make(names, deployment, n_slots=1)
    try:
        publish(producer, "a", value=1)
        (d,) = consumer.take_next(1)
        arr, tensor = consumer.array(d), consumer.tensor(d)
        assert tensor.data_ptr() == arr.ctypes.data and int(tensor[0, 0]) == 1
        consumer.release(d)
        publish(producer, "b", value=2)
        (d,) = consumer.take_next(1)
        assert consumer.array(d) is arr and consumer.tensor(d) is tensor
        assert int(tensor[7, 3]) == 2  # same pages, new bytes
        consumer.release(d)
        with producer.reserve() as lease:
            lease.array((4,), np.float32)[:] = 3.5
            lease.publish(job_id="c", shape=(4,), dtype=np.float32)
        (d,) = consumer.take_next(1)
        assert consumer.array(d) is not arr and consumer.array(d).tolist() == [3.5] * 4
        assert consumer.tensor(d).dtype == torch.float32
        assert consumer.tensor(d).data_ptr() == tensor.data_ptr()
        consumer.release(d)
    finally:
        producer.close()
        consumer.close()
