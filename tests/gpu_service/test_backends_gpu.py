"""Backends on CUDA: numerics vs eager, batch buckets, the caller's stream, TensorRT cache.

Run by ``bench/gpu_check.sh`` on a GPU machine (``pytest -m gpu``); every test skips
with a reason where CUDA (or, for the TensorRT ones, the ``tensorrt`` package) is
absent. The saliency and embed models use the benchmark's production sizes (224x384
with 4 anchors; ViT-B/16 at 224) so compiled code is shared with the benchmark run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gpu_service.backends import REL_TOL, Runner, build_backend, relative_error
from gpu_service.models.common import seeded
from gpu_service.models.embed import ARCHS, EmbedModel, ViT
from gpu_service.models.saliency import SaliencyConfig, SaliencyModel

pytestmark = pytest.mark.gpu

FRAMES = 16
BUCKETS = (1, 2, 4, 8)
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
VARIANTS = [
    ("channels_last", "fp32"),
    ("channels_last", "bf16"),
    ("channels_last", "fp16"),
    ("compile", "bf16"),
    ("cudagraphs", "bf16"),
    ("cudagraphs", "fp32"),
    ("tensorrt", "bf16"),
    ("tensorrt", "fp16"),
]


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")
    torch.backends.cudnn.benchmark = True
    return torch.device("cuda")


@pytest.fixture(scope="module")
def saliency(cuda: torch.device, tmp_path_factory: pytest.TempPathFactory) -> SaliencyModel:
    return SaliencyModel(
        cuda,
        SaliencyConfig(height=224, width=384, anchors=4),
        backend="eager",
        buckets=BUCKETS,
        cache_dir=tmp_path_factory.mktemp("engines"),
    )


@pytest.fixture(scope="module")
def embed(cuda: torch.device, tmp_path_factory: pytest.TempPathFactory) -> EmbedModel:
    with seeded():
        net = ViT(ARCHS["vit_b16"])
    return EmbedModel(
        cuda,
        net=net,
        frames_per_chunk=FRAMES,
        backend="eager",
        buckets=BUCKETS,
        cache_dir=tmp_path_factory.mktemp("engines"),
    )


def _frames(b: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (b, FRAMES, 128, 128, 3), generator=gen, dtype=torch.uint8)
    return frames.to(device)


def _need(backend: str) -> None:
    if backend == "tensorrt" and not HAVE_TRT:
        pytest.skip("tensorrt is not installed (pip install 'clipline[tensorrt]')")


def _check(
    model: SaliencyModel | EmbedModel, backend: str, precision: str, sizes: list[int]
) -> Runner:
    _need(backend)
    device = model.device
    runner = build_backend(backend, model.net, model.core_spec, device, precision)
    assert runner.backend == backend and runner.precision == precision
    for i, b in enumerate(sizes):  # fresh random chunks for every size
        with torch.inference_mode():
            x = model.preprocess(_frames(b, device, seed=100 + i))
        err = model.core_spec.error(runner(x), model.runner(x))
        assert err <= REL_TOL[precision], f"{backend}/{precision} batch {b}: {err:.3e}"
    return runner


def _sizes(backend: str) -> list[int]:
    # Static-shape backends: a bucket, a size padded up to a bucket, and one split.
    if backend in ("cudagraphs", "tensorrt"):
        return [8, 3, 9]
    return [8] if backend == "compile" else [8, 3]


@pytest.mark.parametrize(("backend", "precision"), VARIANTS)
def test_saliency_backend_matches_eager(
    saliency: SaliencyModel, backend: str, precision: str
) -> None:
    _check(saliency, backend, precision, _sizes(backend))


@pytest.mark.parametrize(("backend", "precision"), VARIANTS)
def test_embed_backend_matches_eager(embed: EmbedModel, backend: str, precision: str) -> None:
    _check(embed, backend, precision, _sizes(backend))


def _kernel_streams(fn: Callable[[], object], trace: Path) -> set[int]:
    """CUDA streams of the kernels and copies ``fn`` launched (from a profiler trace)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    return {
        int(e["args"]["stream"])
        for e in events
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "stream" in e.get("args", {})
    }


@pytest.mark.parametrize("backend", ["channels_last", "cudagraphs", "tensorrt"])
def test_model_runs_on_the_callers_stream(
    saliency: SaliencyModel, backend: str, tmp_path: Path
) -> None:
    _need(backend)
    frames = _frames(2, saliency.device, seed=7)
    eager_out = saliency(frames)["saliency"]
    saliency_runner = saliency.runner
    saliency.runner = build_backend(
        backend, saliency.net, saliency.core_spec, saliency.device, "bf16"
    )
    try:
        saliency(frames)  # warm: autotuning and lazy initialisation happen outside the trace
        default = _kernel_streams(lambda: torch.ones(256, device="cuda").mul_(2), tmp_path / "a")
        side = torch.cuda.Stream()
        out: dict[str, torch.Tensor] = {}

        def work() -> None:
            with torch.cuda.stream(side):
                out.update(saliency(frames))

        streams = _kernel_streams(work, tmp_path / "b")
        side.synchronize()
    finally:
        saliency.runner = saliency_runner
    if not streams or not default:
        pytest.skip("the profiler recorded no CUDA kernels here (CUPTI unavailable)")
    assert not streams & default, f"work on the default stream: {streams} vs {default}"
    if backend != "tensorrt":  # TensorRT may fork auxiliary streams and join them
        assert len(streams) == 1
    assert relative_error(out["saliency"], eager_out) < 0.05


def test_registry_build_on_cuda_logs_choice(
    cuda: torch.device, caplog: pytest.LogCaptureFixture
) -> None:
    from clipline_core.settings import Settings
    from gpu_service.models import BuildContext, build

    small = Settings(
        saliency_size="64x96", saliency_anchors=1, backend="cudagraphs", max_batch_size=2
    )
    caplog.set_level(logging.INFO)
    model = build("saliency", BuildContext(small, cuda))
    assert model.backend == "cudagraphs" and model.precision == "bf16"
    assert model.batch_buckets == (1, 2)
    assert "using backend cudagraphs, bf16" in caplog.text
    out = model(_frames(2, cuda, seed=3))["saliency"]
    assert out.device.type == "cuda" and out.shape == (2, FRAMES)


def test_tensorrt_engine_is_cached(
    cuda: torch.device, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _need("tensorrt")
    caplog.set_level(logging.INFO)
    cfg = SaliencyConfig(height=64, width=96, anchors=1)
    first = SaliencyModel(cuda, cfg, backend="tensorrt", buckets=(1, 2), cache_dir=tmp_path)
    assert first.backend == "tensorrt", caplog.text
    engines = list(tmp_path.glob("saliency-*.engine"))
    assert len(engines) == 1
    caplog.clear()
    second = SaliencyModel(cuda, cfg, backend="tensorrt", buckets=(1, 2), cache_dir=tmp_path)
    assert second.backend == "tensorrt"
    assert "loaded from cache" in caplog.text
    frames = _frames(2, cuda, seed=9)
    assert torch.allclose(first(frames)["saliency"], second(frames)["saliency"])
