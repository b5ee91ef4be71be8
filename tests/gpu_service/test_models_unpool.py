"""The layout-preserving max-unpool and export-friendly pooling indices vs PyTorch's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpu_service.models.ops import max_pool3d_with_indices, max_unpool3d

CL3 = torch.channels_last_3d
# (kernel, stride, padding): TASED's three unpools, plus overlapping windows in time.
POOLS = [
    ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ((1, 2, 2), (1, 2, 2), (0, 0, 0)),
    ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
    ((2, 3, 2), (1, 2, 1), (1, 1, 0)),
]
SHAPES = [(2, 5, 4, 9, 12), (1, 3, 2, 8, 8), (3, 4, 3, 7, 11)]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """nn.MaxUnpool3d is the reference only single-threaded.

    Where overlapping windows share a maximum, several pooled positions write the same
    output element; with one thread the CPU kernel keeps the last one in scan order,
    with more threads its choice varies from run to run.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(shape: tuple[int, ...], fmt: torch.memory_format, ties: bool) -> torch.Tensor:
    x = torch.randint(0, 3, shape).float() if ties else torch.randn(shape)
    return x.contiguous(memory_format=fmt)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL3], ids=["ncdhw", "cl3d"])
def test_unpool_equals_max_unpool3d(
    one_thread: None,
    pool: tuple[tuple[int, int, int], ...],
    shape: tuple[int, ...],
    fmt: torch.memory_format,
) -> None:
    k, s, p = pool
    reference = nn.MaxUnpool3d(k, s, p)
    for ties in (False, True):
        x = _inputs(shape, fmt, ties)
        _, idx = F.max_pool3d(x, k, s, p, return_indices=True)
        values = torch.randn(idx.shape).contiguous(memory_format=fmt)
        expected = reference(values, idx, output_size=shape[2:])
        got = max_unpool3d(values, idx, k, s, shape[2:], p)
        assert torch.equal(got, expected)
        assert got.is_contiguous(memory_format=fmt)


def test_unpool_shared_maximum_takes_last_window() -> None:
    # Windows 0 ([-1, 1]) and 1 ([1, 3]) of a 3-wide, stride-2, padded pool share
    # element 1 and both picked it: the later window's value wins, as in MaxUnpool3d.
    values = torch.tensor([5.0, 7.0, 9.0]).view(1, 1, 1, 1, 3)
    idx = torch.tensor([1, 1, 5]).view(1, 1, 1, 1, 3)
    out = max_unpool3d(values, idx, (1, 1, 3), (1, 1, 2), (1, 1, 6), (0, 0, 1))
    assert out.flatten().tolist() == [0.0, 7.0, 0.0, 0.0, 0.0, 9.0]


def test_unpool_keeps_channels_last_where_max_unpool3d_does_not() -> None:
    x = torch.randn(2, 8, 4, 10, 12).contiguous(memory_format=CL3)
    pooled, idx = F.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1), return_indices=True)
    ours = max_unpool3d(pooled, idx, (1, 3, 3), (1, 2, 2), x.shape[2:], (0, 1, 1))
    theirs = F.max_unpool3d(pooled, idx, (1, 3, 3), (1, 2, 2), (0, 1, 1), x.shape[2:])
    assert ours.is_contiguous(memory_format=CL3) and not ours.is_contiguous()
    assert theirs.is_contiguous()  # the round trip our version avoids


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL3], ids=["ncdhw", "cl3d"])
def test_export_friendly_indices_equal_max_pool(
    pool: tuple[tuple[int, int, int], ...], fmt: torch.memory_format
) -> None:
    k, s, p = pool
    for shape in SHAPES:
        for ties in (False, True):
            x = _inputs(shape, fmt, ties)
            v_ref, i_ref = F.max_pool3d(x, k, s, p, return_indices=True)
            v, i = max_pool3d_with_indices(x, k, s, p, export_friendly=True)
            assert torch.equal(v, v_ref)
            assert torch.equal(i, i_ref)
