"""Inference backends for the daemon's models, chosen by ``Settings.backend``.

Backends, in fallback order: ``eager`` → ``channels_last`` → ``compile`` →
``cudagraphs`` → ``tensorrt``. :func:`build_runner` tries the requested one; if it
is unavailable here (no CUDA, TensorRT not installed, a layer that will not convert,
a compile error) or its output on a fresh random batch differs from eager by more
than :data:`REL_TOL` for its precision, it falls back to the one before it, and logs
one line saying what was chosen and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from gpu_service.backends.base import (
    BACKENDS,
    DEFAULT_BUCKETS,
    DTYPES,
    PRECISIONS,
    REL_TOL,
    BackendUnavailable,
    CoreSpec,
    Runner,
    bucket_for,
    buckets_up_to,
    relative_error,
    resolve_precision,
)
from gpu_service.backends.torch_backends import (
    ChannelsLastRunner,
    CompileRunner,
    CudaGraphRunner,
    EagerRunner,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BUCKETS",
    "DTYPES",
    "PRECISIONS",
    "REL_TOL",
    "BackendUnavailable",
    "CoreSpec",
    "Runner",
    "bucket_for",
    "buckets_up_to",
    "build_backend",
    "build_runner",
    "relative_error",
    "resolve_precision",
]

log = logging.getLogger(__name__)


def _tensorrt(net: nn.Module, spec: CoreSpec, precision: str, device: torch.device) -> Runner:
    from gpu_service.backends.tensorrt import TensorRTRunner

    return TensorRTRunner(net, spec, precision, device)


_BUILDERS: dict[str, Callable[[nn.Module, CoreSpec, str, torch.device], Runner]] = {
    "eager": lambda net, spec, precision, device: EagerRunner(net),
    "channels_last": lambda net, spec, precision, device: ChannelsLastRunner(net, spec, precision),
    "compile": lambda net, spec, precision, device: CompileRunner(net, spec, precision),
    "cudagraphs": lambda net, spec, precision, device: CudaGraphRunner(
        net, spec, precision, device
    ),
    "tensorrt": _tensorrt,
}


def build_backend(
    name: str, net: nn.Module, spec: CoreSpec, device: torch.device, precision: str = "auto"
) -> Runner:
    """Build backend ``name`` without fallback or checks (tests, benchmarks)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    return _BUILDERS[name](net, spec, resolve_precision(precision, device, name), device)


def _build_checked(
    name: str,
    net: nn.Module,
    spec: CoreSpec,
    device: torch.device,
    precision: str,
    sample: torch.Tensor,
    reference: torch.Tensor | None,
    reasons: list[str],
) -> Runner | None:
    """Backend ``name`` at the resolved precision, checked against eager; None if unusable.

    With ``auto`` precision a reduced-precision runner whose output is off by more than
    its tolerance is retried in fp32 on the same backend: ``auto`` means the fastest
    precision that passes the check, not a fall back to a slower backend.
    """
    first = resolve_precision(precision, device, name)
    tries = [first]
    if precision in ("", "auto") and first != "fp32":
        tries.append("fp32")
    for prec in tries:
        try:
            runner = _BUILDERS[name](net, spec, prec, device)
            err = None if reference is None else spec.error(runner(sample), reference)
        except BackendUnavailable as exc:
            reasons.append(f"{name}: {exc}")
            return None
        except Exception as exc:  # a layer that will not convert, a compiler error, ...
            log.debug("%s: backend %s failed", spec.name, name, exc_info=True)
            reasons.append(f"{name} failed: {type(exc).__name__}: {exc}")
            return None
        if err is None or err <= REL_TOL[prec]:
            return runner
        reasons.append(
            f"{name}: output differs from eager: relative error {err:.2e} > "
            f"{REL_TOL[prec]:.0e} ({prec})"
        )
    return None


def build_runner(
    net: nn.Module,
    spec: CoreSpec,
    device: torch.device,
    requested: str,
    precision: str = "auto",
    *,
    verify: bool = True,
) -> Runner:
    """The best working backend at or before ``requested`` in :data:`BACKENDS`."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; use one of {', '.join(BACKENDS)}")
    net.eval()
    chain = list(reversed(BACKENDS[: BACKENDS.index(requested) + 1]))
    reasons: list[str] = []
    eager = EagerRunner(net)
    with torch.inference_mode():
        # A fixed sample: the same network gets the same backend and precision every time.
        sample = spec.example(min(spec.buckets), device, torch.Generator().manual_seed(0))
        reference = eager(sample) if verify and requested != "eager" else None
    for name in chain:
        if name == "eager":
            runner: Runner = eager
        else:
            built = _build_checked(name, net, spec, device, precision, sample, reference, reasons)
            if built is None:
                continue
            runner = built
        why = f" (requested {requested}; " + "; ".join(reasons) + ")" if reasons else ""
        log.info("%s: using backend %s, %s%s", spec.name, runner.backend, runner.precision, why)
        return runner
    raise AssertionError("unreachable: eager always works")  # pragma: no cover
