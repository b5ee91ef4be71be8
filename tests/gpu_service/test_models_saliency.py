"""The ``saliency`` model: TASED-Net weight format, Model contract, layout, preprocessing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import torch
from torch import nn

from clipline_core.settings import Settings
from gpu_service.models import BuildContext, build
from gpu_service.models.common import seeded
from gpu_service.models.saliency import (
    SaliencyConfig,
    SaliencyModel,
    TasedNet,
    load_tased_weights,
)
from gpu_service.models.weights import WeightsError

CPU = torch.device("cpu")
CL3 = torch.channels_last_3d
SMALL = SaliencyConfig(height=32, width=32, anchors=2, window=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module() -> Iterator[None]:
    """Small CPU workloads: a second thread mostly adds synchronisation cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Keys and shapes of the official TASED-Net release (TASED_v2 in MichiganCOG/TASED-Net).
OFFICIAL_KEYS = {
    "base1.0.conv_s.weight": (64, 3, 1, 7, 7),
    "base1.0.conv_t.weight": (64, 64, 7, 1, 1),
    "base1.0.bn_s.running_mean": (64,),
    "base1.2.conv.weight": (64, 64, 1, 1, 1),
    "base1.3.conv_s.weight": (192, 64, 1, 3, 3),
    "base2.0.branch3.1.conv.weight": (32, 192, 1, 1, 1),
    "base2.1.branch1.1.conv_t.weight": (192, 192, 3, 1, 1),
    "base3.4.branch2.0.bn.weight": (32,),
    "base4.1.branch0.0.conv.weight": (384, 832, 1, 1, 1),
    "convtsp1.0.weight": (1024, 1024, 1, 1, 1),
    "convtsp1.3.weight": (1024, 832, 1, 3, 3),
    "convtsp1.4.running_var": (832,),
    "convtsp2.0.weight": (832, 480, 1, 3, 3),
    "convtsp3.0.weight": (480, 192, 1, 3, 3),
    "convtsp4.0.weight": (192, 64, 1, 4, 4),
    "convtsp4.3.weight": (64, 64, 2, 1, 1),
    "convtsp4.6.weight": (64, 4, 1, 1, 1),
    "convtsp4.9.weight": (4, 4, 2, 1, 1),
    "convtsp4.12.weight": (4, 4, 1, 4, 4),
    "convtsp4.13.weight": (1, 4, 1, 1, 1),
    "convtsp4.13.bias": (1,),
}


def _trained_like(seed: int) -> TasedNet:
    """A TASED-Net with non-default weights *and* BN statistics."""
    with seeded(seed):
        net = TasedNet()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.8, 1.2)
                m.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def source_net() -> TasedNet:
    return _trained_like(7)


@pytest.fixture(scope="module")
def official_file(tmp_path_factory: pytest.TempPathFactory, source_net: TasedNet) -> Path:
    """The source net saved as the official checkpoint is: DataParallel keys."""
    path = tmp_path_factory.mktemp("weights") / "TASED_updated.pt"
    torch.save({f"module.{k}": v for k, v in source_net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def model() -> SaliencyModel:
    return SaliencyModel(CPU, SMALL, backend="eager")


def test_layout_matches_official_release() -> None:
    state = TasedNet().state_dict()
    for key, shape in OFFICIAL_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    params = sum(p.numel() for p in TasedNet().parameters())
    assert 21_000_000 < params < 21_500_000  # the released file is ~82 MB of fp32


def test_official_checkpoint_loads_and_reproduces(
    source_net: TasedNet, official_file: Path
) -> None:
    loaded = SaliencyModel(CPU, SMALL, weights=official_file, backend="eager")
    assert loaded.weights_loaded
    x = torch.rand(1, 3, 32, 32, 32) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(loaded.net(x), source_net(x))


def test_registry_finds_weights_in_weights_dir(official_file: Path) -> None:
    settings = Settings(weights_dir=str(official_file.parent))
    m = build("saliency", BuildContext(settings, CPU))
    assert m.weights_loaded and m.trusted
    assert m.name == "saliency"


def test_registry_without_weights_is_untrusted_and_deterministic(
    model: SaliencyModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    m = build("saliency", BuildContext(Settings(), CPU))
    assert not m.weights_loaded and not m.trusted
    assert "no weights configured" in caplog.text
    assert "using backend eager" in caplog.text
    # Same seeded initialisation and BN calibration as any other weight-less build.
    mine, theirs = model.net.state_dict(), m.net.state_dict()  # type: ignore[attr-defined]
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("module.convtsp4.13.bias"), "1 missing (convtsp4.13.bias)"),
        (lambda s: s.__setitem__("module.extra.weight", torch.zeros(1)), "unexpected"),
        (
            lambda s: s.__setitem__("module.convtsp4.13.bias", torch.zeros(2)),
            "convtsp4.13.bias: file (2,) vs model (1,)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_mismatched_checkpoint_is_a_clear_error(
    tmp_path: Path, official_file: Path, edit: object, message: str
) -> None:
    state = torch.load(official_file, weights_only=True)
    edit(state)  # type: ignore[operator]
    bad = tmp_path / "TASED_updated.pt"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match="TASED-Net") as err:
        load_tased_weights(TasedNet(), bad)
    assert message in str(err.value)


def test_checkpoint_without_num_batches_tracked_loads(tmp_path: Path, official_file: Path) -> None:
    state = torch.load(official_file, weights_only=True)
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(old, path)
    net = TasedNet()
    load_tased_weights(net, path)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("module.")], v) for k, v in old.items())


def test_not_a_state_dict_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_tased_weights(TasedNet(), path)


def test_model_contract(model: SaliencyModel) -> None:
    frames = torch.randint(0, 256, (2, 5, 40, 72, 3), dtype=torch.uint8)
    out = model(frames)
    assert set(out) == {"saliency"}
    s = out["saliency"]
    assert s.shape == (2, 5) and s.dtype == torch.float32
    assert bool(((s >= SMALL.top_fraction - 1e-6) & (s <= 1.0)).all())
    assert model.backend == "eager" and not model.weights_loaded
    assert model.input_spec.net_input == (3, 32, 32, 32)


def test_anchor_clips_end_at_their_frame(model: SaliencyModel) -> None:
    t = 9  # anchors at frames 0 and 8; window 4 stretched over 32 network frames
    frames = torch.arange(t, dtype=torch.uint8).mul(20).view(1, t, 1, 1, 1)
    frames = frames.expand(1, t, 32, 32, 3).contiguous()
    clips = model.preprocess(frames)
    assert clips.shape == (2, 3, 32, 32, 32)
    assert clips.is_contiguous(memory_format=CL3)
    index = ((clips[:, 0, :, 0, 0] + 1) * 255 / 2 / 20).round().long()
    assert index[0].tolist() == [0] * 32  # before the chunk start: the first frame
    assert index[1].tolist() == [5] * 8 + [6] * 8 + [7] * 8 + [8] * 8


def test_focus_score_and_interpolation(model: SaliencyModel) -> None:
    uniform = torch.full((64, 64), 0.5)
    peaked = torch.zeros(64, 64)
    peaked[10:12, 20:22] = 1.0
    # One chunk of 9 frames: anchor 0 sees a uniform map, anchor 8 a peaked one.
    scores = model.scores(torch.stack([uniform, peaked]), b=1, t=9)[0]
    assert scores[0].item() == pytest.approx(205 / 4096, rel=1e-3)  # top 5% of 4096 px
    assert scores[8].item() == pytest.approx(1.0)
    assert scores[4].item() == pytest.approx((scores[0] + scores[8]).item() / 2, rel=1e-5)
    assert bool((scores[1:] >= scores[:-1]).all())


def test_channels_last_backend_runs_convs_in_channels_last_3d() -> None:
    """Every convolution sees channels_last_3d input and weights, none converts back.

    On the CPU, PyTorch routes small single-threaded 3D convolutions to a fallback
    kernel that returns contiguous output; oneDNN (used with two or more threads, and
    cuDNN on CUDA) keeps channels_last_3d, so this check runs with two threads.
    """
    torch.set_num_threads(2)
    m = SaliencyModel(CPU, SMALL, backend="channels_last")
    assert m.backend == "channels_last"
    seen: list[tuple[bool, bool]] = []

    def check(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(
            (
                args[0].is_contiguous(memory_format=CL3),
                cast(torch.Tensor, module.weight).is_contiguous(memory_format=CL3),
            )
        )

    net = m.runner.net  # type: ignore[attr-defined]
    convs = [mod for mod in net.modules() if isinstance(mod, nn.Conv3d | nn.ConvTranspose3d)]
    hooks = [c.register_forward_pre_hook(check) for c in convs]
    try:
        m(torch.randint(0, 256, (1, 4, 32, 32, 3), dtype=torch.uint8))
    finally:
        for h in hooks:
            h.remove()
        torch.set_num_threads(1)
    # Every conv, including the decoder's after each un-pooling, saw channels_last_3d.
    assert len(seen) >= len(convs) and all(x and w for x, w in seen)


def test_eager_reference_runs_contiguous(model: SaliencyModel) -> None:
    seen: list[bool] = []
    conv = model.net.convtsp3[0]
    hook = conv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    try:
        model(torch.randint(0, 256, (1, 4, 32, 32, 3), dtype=torch.uint8))
    finally:
        hook.remove()
    assert seen == [True]
