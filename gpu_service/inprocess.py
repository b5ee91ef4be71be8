"""Running the daemon's models inside one process, the way the engine calls them.

For the places that run models without a daemon: the before-design of the benchmarks
(one process per request), the quality benchmark and tests. It does what the
executor does around a model call that matters for results: it tells batch-aware
models (the localizer) which job each row belongs to, skips temporal models on the
product images, and names outputs by the models' declared output names.

Builds on the models and the shared-memory descriptor type; must not import the
daemon, the engine or anything of the workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gpu_service import protocol
from gpu_service.models.base import Model
from gpu_service.shm import ChunkKind, Descriptor


def items_for(
    kind: ChunkKind, job_id: str, generation: int, first_chunk: int, frames: torch.Tensor
) -> list[Descriptor]:
    """Descriptors for the rows of ``frames`` ``[B, T, H, W, 3]`` (chunks numbered on)."""
    shape = tuple(int(v) for v in frames.shape[1:])
    return [
        Descriptor(
            slot=-1,
            seq=0,
            kind=kind,
            job_id=job_id,
            generation=generation,
            chunk=first_chunk + i,
            priority=0,
            arrival=0.0,
            published_at=0.0,
            shape=shape,
            dtype=np.dtype(np.uint8),
        )
        for i in range(int(frames.shape[0]))
    ]


@torch.inference_mode()
def run(
    models: Sequence[Model],
    frames: torch.Tensor,
    *,
    kind: ChunkKind,
    job_id: str = "inprocess",
    generation: int = 0,
    first_chunk: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Run every applicable model on ``frames`` ``[B, T, H, W, 3]`` (uint8, on the models'
    device); per row, its outputs by full name, as float32 host arrays."""
    items = items_for(kind, job_id, generation, first_chunk, frames)
    per_row: list[dict[str, np.ndarray]] = [{} for _ in items]
    for mdl in models:
        if kind == ChunkKind.REFS and mdl.temporal:
            continue
        if mdl.batch_aware:
            mdl.bind(kind, items)
        for key, value in mdl(frames).items():
            name = mdl.outputs[key] if mdl.outputs else f"{mdl.name}.{key}"
            host = value.detach().float().cpu().numpy()
            for i in range(len(items)):
                per_row[i][name] = host[i]
    return per_row


def message(
    models: Sequence[Model],
    kind: str,
    chunk: int,
    outputs: dict[str, np.ndarray],
    job_id: str,
    device: str = "inprocess",
) -> dict[str, object]:
    """One row's outputs as the daemon's result message (what the workers read); the
    product images' message names only the models that ran on them (non-temporal)."""
    used = [m for m in models if kind != protocol.REFS_KIND or not m.temporal]
    return protocol.result_message(
        job_id=job_id,
        generation=0,
        chunk=chunk,
        kind=kind,
        frames=int(next(iter(outputs.values())).shape[0]),
        outputs=outputs,
        trusted={m.name: m.trusted for m in used},
        backends={m.name: m.backend for m in used},
        device=device,
        queue_wait_s=0.0,
        inference_s=0.0,
        latency_s=0.0,
        batch=1,
        batch_seq=0,
    )


def job_results(
    models: Sequence[Model],
    refs: np.ndarray,
    frames: np.ndarray,
    per_chunk: int,
    device: torch.device,
    job_id: str = "inprocess",
) -> protocol.JobResults:
    """A whole job's results, computed here: the refs chunk (``refs`` ``[R, H, W, 3]``),
    then ``frames`` ``[N, H, W, 3]`` in chunks of ``per_chunk``, through the wire format."""
    msgs = []
    x = torch.from_numpy(np.ascontiguousarray(refs)[None]).to(device)
    (out,) = run(models, x, kind=ChunkKind.REFS, job_id=job_id, first_chunk=-1)
    msgs.append(message(models, protocol.REFS_KIND, -1, out, job_id))
    for c, first in enumerate(range(0, len(frames), per_chunk)):
        x = torch.from_numpy(np.ascontiguousarray(frames[first : first + per_chunk])[None])
        (out,) = run(models, x.to(device), kind=ChunkKind.FRAMES, job_id=job_id, first_chunk=c)
        msgs.append(message(models, protocol.FRAMES_KIND, c, out, job_id))
    return protocol.JobResults.from_messages(protocol.loads(protocol.dumps(m)) for m in msgs)
