"""The CUDA side of the arena: registered once with cudaHostRegister, slots copied to
the device asynchronously, and released only after the copy's event has completed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from clipline_core import constants
from gpu_service.shm import ArenaLayout, Consumer, Producer, SlotState

SHM = Path(constants.DEFAULT_SHM_DIR)

pytestmark = pytest.mark.gpu


@pytest.fixture
def names(deployment: str) -> Iterator[tuple[Path, Path]]:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")
    yield (
        SHM / constants.shm_arena_name(deployment),
        SHM / constants.shm_socket_name(deployment),
    )
    for p in SHM.glob(f"*{constants.PROJECT}-{deployment}.*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def test_registered_arena_copies_asynchronously_and_releases_after_the_event(
    names: tuple[Path, Path], deployment: str
) -> None:
    layout = ArenaLayout(n_slots=4, slot_bytes=4 << 20, frames_per_chunk=16)
    consumer = Consumer(*names, layout, deployment)
    producer = Producer(*names)
    cudart = torch.cuda.cudart()
    addr, length = consumer.arena.base_address()
    err = cudart.cudaHostRegister(addr, length, 0)
    assert int(getattr(err, "value", err)) == 0, f"cudaHostRegister failed: {err}"
    try:
        shape = (16, 128, 128, 3)
        for value in range(3):
            with producer.reserve() as lease:
                lease.array(shape)[:] = value + 1
                lease.publish(job_id="cuda", shape=shape, chunk=value)
        taken = consumer.take_next(4)
        views = [torch.from_numpy(consumer.array(d)) for d in taken]
        assert all(v.is_pinned() for v in views)  # inside the registered region
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            out = torch.empty((len(views), *shape), dtype=torch.uint8, device="cuda")
            for i, v in enumerate(views):
                out[i].copy_(v, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        # Contract: a slot is released only once its copy has completed.
        event.synchronize()
        for d in taken:
            consumer.release(d)
        assert consumer.arena.states()["free"] == 4
        sums = out.view(len(views), -1).sum(dim=1, dtype=torch.int64).cpu().numpy()
        expected = [(d.chunk + 1) * int(np.prod(shape)) for d in taken]
        assert sums.tolist() == expected
        assert all(consumer.arena.state(d.slot) == SlotState.FREE for d in taken)
    finally:
        cudart.cudaHostUnregister(addr)
        producer.close()
        consumer.close()
