"""The contract every model served by the GPU daemon fulfils, and the model registry.

A model receives a batch of uint8 frame chunks exactly as the workers wrote them into
shared memory (``[B, T, H, W, 3]``, RGB, already on the model's device) and returns
per-frame outputs (``[B, T, ...]`` float32 tensors) keyed by output name. Everything
that turns uint8 frames into the model's input (normalisation, resizing, layout such
as ``channels_last_3d``) happens inside the model, on the device: CPU workers only ever
decode and resize.

``weights_loaded`` tells the highlight scorer whether the outputs carry learned meaning.
A model built without configured weights still runs (throughput, tests, benchmarks),
but the scorer ignores its outputs, so random weights never degrade a result.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from clipline_core.settings import Settings
from gpu_service.protocol import ModelOutputs


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model takes from the workers and what its network sees after preprocessing.

    Frames always arrive as uint8 ``[B, T, H, W, 3]`` RGB; the model resizes and
    normalises on the device. ``net_input`` is one network item's shape after that
    (e.g. ``(3, 32, 224, 384)`` for a saliency clip), ``preprocessing`` says how.
    """

    min_frames: int = 1
    net_input: tuple[int, ...] = ()
    preprocessing: str = ""


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What a model factory may use: the settings and the device it runs on.

    ``job_texts`` maps a job id to its ``(title, description)`` (``("", "")`` when
    unknown); the daemon sets it (read from the job's spec in Redis), tests and
    benchmarks leave it None.
    """

    settings: Settings
    device: torch.device
    job_texts: Callable[[str], tuple[str, str]] | None = None


class Model(abc.ABC):
    """A model the daemon runs on batches of frame chunks."""

    #: registry name, also the ``model`` label value in metrics
    name: str = ""
    #: the outputs it returns, declared in :mod:`gpu_service.protocol` so the workers'
    #: selector reads them by the same names; an undeclared output is an error
    outputs: ModelOutputs | None = None
    #: True only when real weights were loaded from configuration
    weights_loaded: bool = False
    #: backend actually in use after the fallback chain ("eager", "compile", ...)
    backend: str = "eager"
    #: numeric precision the backend runs in ("fp32", "bf16", "fp16")
    precision: str = "fp32"
    #: batch sizes (in chunks) to pad batches up to, ascending; empty: any size is fine.
    #: Static-shape backends (CUDA graphs, TensorRT) are captured for exactly these.
    batch_buckets: tuple[int, ...] = ()
    #: what the model expects and does on the device before its network
    input_spec: InputSpec = InputSpec()
    #: True when outputs depend on frame order within a chunk (run on video chunks
    #: only, never on the product-image reference chunk)
    temporal: bool = False
    #: True when the model needs to know which job each row belongs to (it is then told
    #: with :meth:`bind` before each call, e.g. to match frames against the job's
    #: product images it saw in the refs chunk)
    batch_aware: bool = False

    @property
    def trusted(self) -> bool:
        """Whether the highlight scorer may use the outputs (learned or training-free)."""
        return self.weights_loaded

    def bind(self, kind: Any, items: Sequence[Any]) -> None:
        """The kind (:class:`gpu_service.shm.ChunkKind`) and descriptors of the next call's
        rows, in order; only called when ``batch_aware``."""
        return None

    @abc.abstractmethod
    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run on ``frames`` (uint8 ``[B, T, H, W, 3]`` on the device).

        Returns float32 tensors whose first two dimensions are ``[B, T]``.
        """


ModelFactory = Callable[[BuildContext], Model]
_REGISTRY: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Class/function decorator adding a model factory to the registry."""

    def deco(factory: ModelFactory) -> ModelFactory:
        _REGISTRY[name] = factory
        return factory

    return deco
