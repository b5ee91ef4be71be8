"""Backends on the CPU: numerics vs eager, fallback chain, BN folding, ONNX export, cache keys.

CUDA graphs and TensorRT need a GPU; here we only check that they refuse cleanly
and that the chain falls back past them (their numerics are in the ``gpu`` tests).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import torch
from torch import nn

from gpu_service.backends import (
    REL_TOL,
    BackendUnavailable,
    CoreSpec,
    bucket_for,
    buckets_up_to,
    build_backend,
    build_runner,
    relative_error,
)
from gpu_service.backends import base as backends_base
from gpu_service.backends.base import cpu_has_native_bf16, resolve_precision
from gpu_service.backends.fusion import fold_batchnorm_
from gpu_service.backends.onnx_export import export_copy, export_onnx, op_types
from gpu_service.backends.tensorrt import engine_key, model_hash
from gpu_service.models.common import seeded
from gpu_service.models.embed import ViT, ViTConfig
from gpu_service.models.saliency import SaliencyConfig, SaliencyModel, TasedNet

CPU = torch.device("cpu")
TINY_VIT = ViTConfig(width=64, depth=2, heads=4, mlp=128, patch=8, image=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module() -> Iterator[None]:
    """Small CPU workloads: a second thread mostly adds synchronisation cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saliency() -> SaliencyModel:
    return SaliencyModel(CPU, SaliencyConfig(height=32, width=32, anchors=1), backend="eager")


def _vit() -> tuple[ViT, CoreSpec]:
    with seeded(1):
        net = ViT(TINY_VIT).eval()
    spec = CoreSpec(
        name="vit-test",
        sample_shape=(3, 32, 32),
        buckets=(1, 2, 4),
        memory_format=torch.channels_last,
    )
    return net, spec


def _random_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


# -- batch buckets ---------------------------------------------------------------------
def test_buckets() -> None:
    assert buckets_up_to(8) == (1, 2, 4, 8)
    assert buckets_up_to(6) == (1, 2, 4, 6)
    assert buckets_up_to(1) == (1,)
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]


# -- batch-norm folding -------------------------------------------------------------------
def _conv3d() -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(4, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU())


def _deconv3d() -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(4, 6, (1, 4, 4), (1, 2, 2), (0, 1, 1), groups=2, bias=False),
        nn.BatchNorm3d(6),
    )


def _conv2d() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5))


@pytest.mark.parametrize(
    ("make", "shape"),
    [(_conv3d, (4, 3, 8, 8)), (_deconv3d, (4, 3, 8, 8)), (_conv2d, (3, 9, 9))],
    ids=["conv3d", "convtranspose3d-groups", "conv2d"],
)
def test_fold_batchnorm_keeps_outputs(
    make: Callable[[], nn.Sequential], shape: tuple[int, ...]
) -> None:
    with seeded(2):
        net = make().eval()
        _random_bn(net)
        x = torch.randn(2, *shape)
    folded = copy.deepcopy(net)
    assert fold_batchnorm_(folded) == 1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-5)


def test_fold_batchnorm_uses_declared_pairs_in_tased() -> None:
    net = TasedNet().eval()
    bns = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert fold_batchnorm_(copy.deepcopy(net)) == bns  # every BN follows a conv


# -- CPU backends against eager, on fresh random inputs ----------------------------------
def test_channels_last_saliency_matches_eager(saliency: SaliencyModel) -> None:
    runner = build_backend("channels_last", saliency.net, saliency.core_spec, CPU, "fp32")
    for n in (1, 3):
        x = torch.rand(n, *saliency.core_spec.sample_shape) * 2 - 1
        err = saliency.core_spec.error(runner(x), saliency.runner(x))
        assert err <= REL_TOL["fp32"], err


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_channels_last_vit_matches_eager(precision: str) -> None:
    net, spec = _vit()
    eager = build_backend("eager", net, spec, CPU)
    runner = build_backend("channels_last", net, spec, CPU, precision)
    assert runner.precision == precision
    for n in (1, 5):
        x = torch.randn(n, *spec.sample_shape)
        out = runner(x)
        assert out.dtype == torch.float32
        assert relative_error(out, eager(x)) <= REL_TOL[precision]


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(tmp_path: Path) -> None:
    """``auto``: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32; eager always fp32."""
    native = tmp_path / "zen4"
    native.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    plain = tmp_path / "older"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert cpu_has_native_bf16(str(native))
    assert not cpu_has_native_bf16(str(plain))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))
    here = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_precision("auto", CPU, "channels_last") == here
    assert resolve_precision("", CPU, "compile") == here
    assert resolve_precision("auto", torch.device("cuda"), "channels_last") == "bf16"
    assert resolve_precision("auto", CPU, "eager") == "fp32"
    assert resolve_precision("bf16", CPU, "eager") == "fp32"
    assert resolve_precision("fp32", CPU, "channels_last") == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int4", CPU, "channels_last")


def test_bf16_saliency_matches_eager_within_its_tolerance(saliency: SaliencyModel) -> None:
    """What ``auto`` runs on a CPU with native bf16: TASED-Net in bf16, checked like the
    daemon checks it (pooled over the unpooling windows)."""
    runner = build_backend("channels_last", saliency.net, saliency.core_spec, CPU, "bf16")
    assert runner.precision == "bf16"
    with seeded(5):
        x = torch.rand(2, *saliency.core_spec.sample_shape) * 2 - 1
    out = runner(x)
    assert out.dtype == torch.float32
    assert saliency.core_spec.error(out, saliency.runner(x)) <= REL_TOL["bf16"]


class Cancelling(nn.Module):
    """Adds and removes a large constant: exact in fp32, ruined in bf16 (8-bit mantissa)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 256.0) - 256.0


def test_auto_precision_retries_fp32_on_the_same_backend(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``auto`` resolving to bf16 whose output fails the check keeps the backend in fp32;
    an explicit bf16 request falls back to eager instead."""
    monkeypatch.setattr(backends_base, "cpu_has_native_bf16", lambda *a: True)
    caplog.set_level("INFO")
    spec = CoreSpec("cancel", (3, 4, 4), (1, 2), memory_format=torch.channels_last)
    runner = build_runner(Cancelling().eval(), spec, CPU, "channels_last", "auto")
    assert (runner.backend, runner.precision) == ("channels_last", "fp32")
    assert "channels_last: output differs from eager" in caplog.text and "(bf16)" in caplog.text
    pinned = build_runner(Cancelling().eval(), spec, CPU, "channels_last", "bf16")
    assert pinned.backend == "eager"


def test_chain_falls_back_to_compile_and_compile_matches_eager(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one torch.compile test on the CPU (Inductor's C++ backend, ~10 s)."""
    caplog.set_level("INFO")
    net, spec = _vit()
    runner = build_runner(net, spec, CPU, "tensorrt", "fp32")
    assert runner.backend == "compile"
    line = next(r.message for r in caplog.records if "using backend" in r.message)
    assert "requested tensorrt" in line
    assert "tensorrt: TensorRT needs a CUDA device" in line
    assert "cudagraphs: CUDA graphs need a CUDA device" in line
    eager = build_backend("eager", net, spec, CPU)
    x = torch.randn(3, *spec.sample_shape)
    assert relative_error(runner(x), eager(x)) <= REL_TOL["fp32"]


class LayoutSensitive(nn.Module):
    """Reads its input's raw memory order: wrong as soon as the layout changes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.as_strided(y, (y.shape[0], y[0].numel()), (y[0].numel(), 1))


def test_backend_whose_output_differs_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    spec = CoreSpec("layout", (3, 4, 4), (1, 2), memory_format=torch.channels_last)
    runner = build_runner(LayoutSensitive().eval(), spec, CPU, "channels_last")
    assert runner.backend == "eager"
    assert "channels_last: output differs from eager" in caplog.text


def test_unknown_and_unavailable_backends() -> None:
    net, spec = _vit()
    with pytest.raises(ValueError, match="unknown backend"):
        build_runner(net, spec, CPU, "onnxruntime")
    with pytest.raises(BackendUnavailable, match="CUDA graphs need a CUDA device"):
        build_backend("cudagraphs", net, spec, CPU)
    with pytest.raises(BackendUnavailable, match="TensorRT needs a CUDA device"):
        build_backend("tensorrt", net, spec, CPU)


# -- TensorRT path on the CPU: the exported graph and the engine cache key ---------------
def test_export_friendly_copy_computes_the_same(saliency: SaliencyModel) -> None:
    """What is exported for TensorRT (indices from MaxPool values, scatter unpool)
    equals the torch path bit for bit once both have BN folded."""
    exported = export_copy(saliency.net, "fp32")
    assert getattr(exported, "export_friendly", False)
    reference = copy.deepcopy(exported)
    setattr(reference, "export_friendly", False)  # noqa: B010
    x = torch.rand(2, *saliency.core_spec.sample_shape) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(exported(x), reference(x))


@pytest.mark.slow
def test_saliency_onnx_has_no_maxunpool_and_passes_checker(
    saliency: SaliencyModel, tmp_path: Path
) -> None:
    import onnx

    path = export_onnx(saliency.net, saliency.core_spec, tmp_path / "saliency.onnx", "fp32")
    ops = op_types(path)
    assert "MaxUnpool" not in ops
    assert ops.get("ScatterElements") == 3  # the three un-pooling steps
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "MaxPool":
            assert len([o for o in node.output if o]) == 1  # no indices output
        if node.op_type == "ScatterElements":
            reduction = [a.s for a in node.attribute if a.name == "reduction"]
            assert reduction in ([], [b"none"])  # TensorRT supports no reduction here
    onnx.checker.check_model(str(path), full_check=True)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param  # dynamic batch dimension for the optimisation profile


def test_engine_key_covers_weights_precision_gpu_and_trt_version(
    saliency: SaliencyModel,
) -> None:
    spec = saliency.core_spec
    net = saliency.net
    base = engine_key(net, spec, "bf16", "10.9.0", (9, 0))
    assert base == engine_key(net, spec, "bf16", "10.9.0", (9, 0))
    assert base != engine_key(net, spec, "fp16", "10.9.0", (9, 0))
    assert base != engine_key(net, spec, "bf16", "11.0.0", (9, 0))
    assert base != engine_key(net, spec, "bf16", "10.9.0", (10, 0))
    wider = dataclasses.replace(spec, buckets=(*spec.buckets, 16))
    assert base != engine_key(net, wider, "bf16", "10.9.0", (9, 0))
    changed = copy.deepcopy(net)
    with torch.no_grad():
        cast(nn.Conv3d, changed.convtsp4[13]).bias.add_(1e-3)  # type: ignore[union-attr]
    assert model_hash(changed, spec) != model_hash(net, spec)
    assert model_hash(copy.deepcopy(net).to(torch.bfloat16), spec)  # any dtype hashes
