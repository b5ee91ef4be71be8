"""The dynamic batching policy of the GPU daemon (pure logic, no device, no arena).

Given the READY descriptors of the arena, best first (priority class, request arrival,
chunk; see :meth:`gpu_service.shm.Descriptor.order_key`), :meth:`Batcher.select`
decides whether to run a batch now and which items go into it:

* the *head* (the best READY item) fixes the batch's kind (video frames or product
  reference images) and frame geometry (height, width, channels); every READY item of
  the same kind and geometry may join, best first, up to ``max_batch`` items;
* items of one batch must have the same number of frames ``T``, unless every model that
  runs on that kind is non-temporal: then shorter items are padded up to the longest
  one by repeating their last frame (per-frame and causal outputs such as the colour
  histogram or the motion to the previous frame are unchanged by that, and the padding
  is never sent back), so a video's last, partial chunk or a job's reference chunk
  does not run alone;
* a job's video frames never run before its product reference images: while a job's
  REFS chunk is still READY, that job's FRAMES chunks may neither head nor join a batch
  (the localizer matches frames against the features its refs chunk leaves behind; a
  frames batch led by another job would otherwise sweep them in first);
* the batch runs when it is full, when any READY item has waited ``max_delay_s``
  since it was published (the delay bound), or when forced (draining);
* descriptors the daemon cannot run at all (not ``uint8 [T, H, W, 3]``) are returned
  as *rejected*, at once, so their jobs fail with a reason instead of waiting forever;
* an item that was in flight when a daemon died (``Descriptor.recoveries``) runs in a
  batch of its own, so a chunk that crashes the device cannot take its batch-mates down
  again, and after ``MAX_RECOVERIES`` such deaths it is rejected (a poison chunk).

Batch-size buckets (``buckets_up_to(max_batch)``, i.e. 1, 2, 4, 8 ...) are applied by
the executor: it pads a batch of ``B`` items up to the bucket a model asks for, so
static-shape backends (CUDA graphs, TensorRT) and ``cudnn.benchmark`` see few shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from gpu_service.shm import ChunkKind, Descriptor

#: channels of every frame the daemon runs (RGB)
CHANNELS = 3
#: daemon deaths an item may have been in flight for before it is rejected
MAX_RECOVERIES = 2
_UINT8 = np.dtype(np.uint8)


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    """How big a batch may get and how long its first item may wait for company."""

    max_batch: int = 8
    max_delay_s: float = 0.005

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.max_delay_s < 0:
            raise ValueError("max_delay_s must not be negative")


@dataclasses.dataclass
class Batch:
    """Items taken from the arena to run together."""

    seq: int
    kind: ChunkKind
    items: list[Descriptor]
    #: frames per item in the staged tensor (the longest item; shorter ones are padded)
    frames: int
    #: (height, width, channels) shared by every item
    geometry: tuple[int, int, int]
    #: ``time.monotonic()`` when the batch was formed (end of the items' queue wait)
    formed_at: float

    def __len__(self) -> int:
        return len(self.items)


@dataclasses.dataclass
class Selection:
    """What :meth:`Batcher.select` chose: a batch's items and items to reject."""

    items: list[Descriptor]
    rejected: list[tuple[Descriptor, str]]

    @property
    def frames(self) -> int:
        return max(int(d.shape[0]) for d in self.items) if self.items else 0


def invalid_reason(d: Descriptor) -> str | None:
    """Why the daemon will not run ``d`` (None if it will); the text goes to the job."""
    if d.recoveries >= MAX_RECOVERIES:
        return f"poison chunk: a daemon died {d.recoveries} times while it was in flight"
    if d.dtype != _UINT8:
        return f"invalid chunk: frames must be uint8, got {d.dtype}"
    if len(d.shape) != 4:
        return f"invalid chunk: frames must be [T, H, W, 3], got shape {list(d.shape)}"
    t, h, w, c = d.shape
    if c != CHANNELS:
        return f"invalid chunk: frames must have {CHANNELS} channels (RGB), got {c}"
    if t < 1 or h < 1 or w < 1:
        return f"invalid chunk: empty (shape {list(d.shape)})"
    return None


def geometry(d: Descriptor) -> tuple[int, int, int]:
    return (int(d.shape[1]), int(d.shape[2]), int(d.shape[3]))


class Batcher:
    """Chooses the next batch; ``pad_frames(kind)`` says if ``T`` may differ in a batch."""

    def __init__(self, policy: BatchPolicy, pad_frames: Callable[[ChunkKind], bool]) -> None:
        self.policy = policy
        self.pad_frames = pad_frames

    def select(
        self, ready: Sequence[Descriptor], now: float, *, force: bool = False
    ) -> Selection | None:
        """The batch to run now (and items to reject), or None to wait for more items."""
        valid: list[Descriptor] = []
        rejected: list[tuple[Descriptor, str]] = []
        for d in ready:
            reason = invalid_reason(d)
            if reason is None:
                valid.append(d)
            else:
                rejected.append((d, reason))
        if not valid:
            return Selection([], rejected) if rejected else None
        waiting = {(d.job_id, d.generation) for d in valid if d.kind == ChunkKind.REFS}
        runnable = [
            d for d in valid if d.kind == ChunkKind.REFS or (d.job_id, d.generation) not in waiting
        ]  # never empty: a job's waiting refs chunk is itself runnable
        head = runnable[0]
        pad = self.pad_frames(head.kind)
        geo = geometry(head)
        if head.recoveries:
            group = [head]  # isolate a chunk that was in flight when a daemon died
        else:
            group = [
                d
                for d in runnable
                if d.kind == head.kind
                and not d.recoveries
                and geometry(d) == geo
                and (pad or d.shape[0] == head.shape[0])
            ][: self.policy.max_batch]
        oldest = min(d.published_at for d in valid)
        due = (
            force
            or head.recoveries > 0
            or len(group) >= self.policy.max_batch
            or now - oldest >= self.policy.max_delay_s
        )
        if not due:
            return Selection([], rejected) if rejected else None
        return Selection(group, rejected)

    def time_to_due(self, ready: Sequence[Descriptor], now: float) -> float:
        """Seconds until the oldest READY item reaches the delay bound (0 if it has)."""
        if not ready:
            return self.policy.max_delay_s
        oldest = min(d.published_at for d in ready)
        return max(0.0, oldest + self.policy.max_delay_s - now)
