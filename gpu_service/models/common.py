"""Helpers shared by the neural models: optional settings, seeding, BN calibration.

Model-specific tunables (input sizes, anchors, precision, engine cache) are read
with :func:`setting`, so a field that the deployment's ``Settings`` does not define
yet simply takes its documented default. Models built without weights are
initialised deterministically (:func:`seeded`) so runs, tests and benchmarks are
reproducible, and their batch-norm statistics are calibrated on one seeded random
input so activations stay in a sensible range through deep stacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from clipline_core.settings import Settings
from gpu_service.backends import buckets_up_to

T = TypeVar("T")

#: seed of every deterministic (weight-less) initialisation
INIT_SEED = 20240601


def setting(settings: Settings, name: str, default: T) -> T:
    """``settings.<name>`` when set (not empty, not 0), else ``default``.

    Optional model settings use ``""``/``0`` for "the default for this device".
    """
    value: Any = getattr(settings, name, None)
    if value is None or value == "" or value == 0:
        return default
    return type(default)(value) if default is not None else value  # type: ignore[call-arg]


def parse_size(text: str) -> tuple[int, int]:
    """``"224x384"`` -> ``(224, 384)`` (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError as exc:
        raise ValueError(f"invalid size {text!r}: use HEIGHTxWIDTH, e.g. 224x384") from exc
    if h <= 0 or w <= 0:
        raise ValueError(f"invalid size {text!r}: both sides must be positive")
    return h, w


def model_buckets(settings: Settings) -> tuple[int, ...]:
    """Batch sizes (in chunks) the daemon should pad to: 1, 2, 4, ... max_batch_size."""
    return buckets_up_to(max(1, settings.max_batch_size))


def engine_cache_dir(settings: Settings) -> Path:
    """Where compiled engines are cached: ``engine_cache_dir`` or ``<state_dir>/engines``."""
    configured = setting(settings, "engine_cache_dir", "")
    return Path(configured) if configured else Path(settings.state_dir) / "engines"


@contextlib.contextmanager
def seeded(seed: int = INIT_SEED) -> Iterator[None]:
    """Run the block with the CPU RNG seeded, restoring the caller's RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def calibrate_batchnorm(net: nn.Module, example: torch.Tensor) -> None:
    """Set every BN's running statistics from one forward pass over ``example``.

    Only for weight-less initialisation: with default statistics (mean 0, var 1) a
    randomly initialised deep stack drifts to vanishing or saturated activations, which
    makes its outputs (and the backend accuracy checks on them) meaningless.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the (single) batch
        m.train()
    try:
        net(example)
    finally:
        for m, (momentum, training) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.train(training)
