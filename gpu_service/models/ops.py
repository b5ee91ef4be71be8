"""Layout-preserving 3D max-pool indices and max-unpooling.

``nn.MaxUnpool3d`` always returns a contiguous (``NCDHW``) tensor, so a decoder that
runs in ``channels_last_3d`` pays two layout conversions per unpool, and its ONNX form
(``MaxUnpool`` fed by ``MaxPool``'s indices output) is rejected by TensorRT's parser.
The two functions here replace them:

:func:`max_unpool3d`
    scatters the values into a zero tensor allocated in the input's memory format
    (``scatter_`` along the flattened spatial dimension, which is a view for both
    contiguous and ``channels_last_3d`` tensors). Where overlapping pooling windows
    share their maximum (kernel larger than stride), several pooled positions point at
    the same output element; ``nn.MaxUnpool3d`` on the CPU keeps the value of the last
    such position in scan order. We resolve those duplicates *before* scattering (each
    position takes the value of the last position sharing its index, found by comparing
    with shifted copies of the indices), so every writer to one element writes the same
    value: the result equals ``nn.MaxUnpool3d`` on the CPU and is deterministic on every
    device. In ONNX this is ``Pad``/``Slice``/``Equal``/``Where``/``ScatterElements``
    (no reduction), all supported by TensorRT.

:func:`max_pool3d_with_indices`
    ``F.max_pool3d(..., return_indices=True)`` for the torch backends; with
    ``export_friendly=True`` the indices are recomputed from the pooled values by
    comparing every window offset (first maximum in scan order wins, as in PyTorch),
    which exports to ``MaxPool`` (values only), ``Slice``, ``Equal`` and ``Where``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Triple = tuple[int, int, int]


def triple(value: int | Sequence[int]) -> Triple:
    """``3`` -> ``(3, 3, 3)``; a 3-sequence is returned as a tuple."""
    if isinstance(value, int):
        return (value, value, value)
    items = tuple(int(v) for v in value)
    if len(items) != 3:
        raise ValueError(f"expected 3 values, got {items}")
    return (items[0], items[1], items[2])


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``channels_last_3d`` when ``x`` is laid out that way (and not trivially both)."""
    if (
        x.dim() == 5
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


def _shift(t: torch.Tensor, offset: Triple, fill: float) -> torch.Tensor:
    """``u[p] = t[p + offset]`` over the last three dims, ``fill`` outside the tensor."""
    pads: list[int] = []
    for off in reversed(offset):  # F.pad lists the last dim first
        pads += [max(-off, 0), max(off, 0)]
    padded = F.pad(t, pads, value=fill)
    out = padded
    for dim, off in zip((2, 3, 4), offset, strict=True):
        size = t.shape[dim]
        out = out.narrow(dim, max(off, 0), size)
    return out


def _later_overlapping_offsets(kernel: Triple, stride: Triple) -> list[Triple]:
    """Pooled-grid offsets, after the origin in scan order, whose windows can overlap it."""
    reach = [max(math.ceil(k / s) - 1, 0) for k, s in zip(kernel, stride, strict=True)]
    ranges = [range(-r, r + 1) for r in reach]
    zero = (0, 0, 0)
    return [(a, b, c) for a, b, c in itertools.product(*ranges) if (a, b, c) > zero]


def max_unpool3d(
    x: torch.Tensor,
    indices: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    output_size: Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> torch.Tensor:
    """Inverse of 3D max pooling, equal to ``nn.MaxUnpool3d`` on the CPU, layout kept.

    ``x`` and ``indices`` are ``[N, C, D, H, W]`` (``indices`` as returned by max
    pooling: flat positions in each ``D*H*W`` output plane). ``output_size`` is the
    spatial size ``(D, H, W)`` (or a full 5-d size); by default the size implied by
    ``kernel_size``, ``stride`` and ``padding``.
    """
    k = triple(kernel_size)
    s = triple(stride if stride is not None else kernel_size)
    p = triple(padding)
    n, c = x.shape[0], x.shape[1]  # not int(): keeps an exported batch dim symbolic
    if output_size is None:
        spatial = tuple((int(x.shape[2 + i]) - 1) * s[i] - 2 * p[i] + k[i] for i in range(3))
    else:
        spatial = tuple(int(v) for v in tuple(output_size)[-3:])
    values = x
    offsets = _later_overlapping_offsets(k, s)
    if offsets:
        for off in offsets:  # ascending scan order: the last match wins
            same = _shift(indices, off, -1) == indices
            values = torch.where(same, _shift(x, off, 0.0), values)
    fmt = memory_format_of(x)
    out = torch.zeros((n, c, *spatial), dtype=x.dtype, device=x.device).contiguous(
        memory_format=fmt
    )
    out.flatten(2).scatter_(2, indices.flatten(2), values.flatten(2))
    return out


def max_pool3d_with_indices(
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    *,
    export_friendly: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D max pooling returning ``(values, indices)`` with PyTorch's index convention."""
    k = triple(kernel_size)
    s = triple(stride if stride is not None else kernel_size)
    p = triple(padding)
    if not export_friendly:
        pooled, where = F.max_pool3d(x, k, s, p, return_indices=True)
        return pooled, where
    values = F.max_pool3d(x, k, s, p)
    h, w = int(x.shape[3]), int(x.shape[4])
    do, ho, wo = (int(v) for v in values.shape[2:])
    dev = x.device
    base = (
        (torch.arange(do, device=dev) * s[0] - p[0]).view(-1, 1, 1) * (h * w)
        + (torch.arange(ho, device=dev) * s[1] - p[1]).view(1, -1, 1) * w
        + (torch.arange(wo, device=dev) * s[2] - p[2]).view(1, 1, -1)
    ).view(1, 1, do, ho, wo)
    padded = F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0]), value=float("-inf"))
    indices: torch.Tensor | None = None
    # Reverse scan order so that the first maximum in scan order is written last.
    for a, b, cc in reversed(list(itertools.product(range(k[0]), range(k[1]), range(k[2])))):
        flat = base + (a * h * w + b * w + cc)
        if indices is None:
            indices = flat.expand(values.shape).contiguous(memory_format=memory_format_of(x))
            continue
        window = padded[
            :,
            :,
            a : a + s[0] * (do - 1) + 1 : s[0],
            b : b + s[1] * (ho - 1) + 1 : s[1],
            cc : cc + s[2] * (wo - 1) + 1 : s[2],
        ]
        indices = torch.where(window == values, flat, indices)
    assert indices is not None
    return values, indices
