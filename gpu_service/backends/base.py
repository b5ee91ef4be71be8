"""Shared vocabulary of the backends: what a network is, what a runner is, tolerances.

A *core* is the part of a model a backend accelerates: an ``nn.Module`` in eval mode
mapping one float tensor ``[N, *sample_shape]`` to one tensor ``[N, ...]``. The
model's on-device preprocessing and post-processing stay outside it, so every
backend (including TensorRT, which needs one static graph) sees the same function.
A *runner* is the accelerated callable; it always returns float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

#: fallback order: a request falls back to the backends before it, right to left
from clipline_core.constants import BACKENDS as BACKENDS

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
#: bound on ||backend - eager||_2 / ||eager||_2 per precision (fp32 allows TF32 convs)
REL_TOL: dict[str, float] = {"fp32": 5e-3, "bf16": 6e-2, "fp16": 2e-2}
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8)


class BackendUnavailable(RuntimeError):
    """A backend cannot be used here; the message says why (logged on fallback)."""


@dataclasses.dataclass(frozen=True)
class CoreSpec:
    """How to build and check runners for one core network."""

    #: model name, used in log lines and in engine cache file names
    name: str
    #: one item's input shape (no batch dimension)
    sample_shape: tuple[int, ...]
    #: batch sizes (in core items) that static-shape backends capture/optimise for
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    #: preferred layout for ``channels_last`` and later backends
    memory_format: torch.memory_format = torch.contiguous_format
    #: architecture description mixed into engine cache keys
    arch: str = ""
    #: where TensorRT engines are cached (None: no disk cache)
    cache_dir: Path | None = None
    #: builds a representative input of ``n`` items (default: standard normal)
    make_input: Callable[[int, torch.device], torch.Tensor] | None = None
    #: compare outputs after average-pooling their last two dims by this factor. Maps
    #: decoded through max-unpooling (saliency) move a value within its pooling window
    #: when rounding flips a near-tied argmax: a local displacement, not an error.
    compare_pool: int = 1

    def example(
        self, n: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` representative items; drawn from ``generator`` (a CPU one) when given."""
        if self.make_input is not None:
            return self.make_input(n, device)
        if generator is not None:
            return torch.randn((n, *self.sample_shape), generator=generator).to(device)
        return torch.randn((n, *self.sample_shape), device=device)

    @property
    def max_bucket(self) -> int:
        return max(self.buckets)

    def error(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        """Relative error of a backend's output against eager's, as the checks measure it."""
        k = self.compare_pool
        if k > 1 and out.dim() >= 3:
            out = F.avg_pool2d(out.float().reshape(-1, 1, *out.shape[-2:]), k, ceil_mode=True)
            ref = F.avg_pool2d(ref.float().reshape(-1, 1, *ref.shape[-2:]), k, ceil_mode=True)
        return relative_error(out, ref)


class Runner(Protocol):
    """The accelerated core: ``runner(x [N, *sample_shape]) -> float32 [N, ...]``."""

    backend: str
    precision: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_2 / ||ref||_2`` in float64 (0 when both are zero)."""
    diff = (out.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float(diff / scale)


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Where it does, oneDNN's bf16 matmuls and convolutions run 2-4x faster than fp32
    (measured on a Zen 4 EPYC: a ViT linear layer 3.9x, a 3D convolution 2.0x); where
    it does not, bf16 is emulated and slower than fp32.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(requested: str, device: torch.device, backend: str) -> str:
    """``auto`` is bf16 for the accelerated backends on CUDA and on CPUs with native
    bf16 (:func:`cpu_has_native_bf16`), fp32 elsewhere; eager is always fp32.

    Every runner is checked against eager fp32 when it is built (:data:`REL_TOL`) and
    falls back when it differs; ``fp32`` forces full precision.
    """
    if backend == "eager":
        return "fp32"
    if requested in ("", "auto"):
        if device.type == "cuda":
            return "bf16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; use auto or one of {PRECISIONS}")
    return requested


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch`` and ``max_batch`` itself: 8 -> (1, 2, 4, 8)."""
    out = []
    b = 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max(1, max_batch))
    return tuple(out)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket holding ``n`` items (the largest one if none does)."""
    for b in sorted(buckets):
        if b >= n:
            return b
    return max(buckets)
