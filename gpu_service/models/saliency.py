"""``saliency``: a TASED-Net video saliency network and a per-frame saliency score.

Network
    TASED-Net (Min & Corso, ICCV 2019): an S3D encoder (separable 3D convolutions,
    Inception-style mixed blocks) and a decoder of transposed convolutions that
    un-pools with the encoder's max-pooling indices and ends in a sigmoid. It takes a
    clip of 32 consecutive RGB frames normalised to ``[-1, 1]`` (trained at 224x384)
    and predicts the saliency map of the clip's last frame at the input resolution.
    Our modules are laid out like the official implementation (``base1..base4``,
    ``convtsp1..convtsp4``), so its released ``state_dict`` (``TASED_updated.pt``,
    keys optionally prefixed ``module.``) loads unchanged from
    ``Settings.weights_dir``. Conv3d/BatchNorm3d run in ``channels_last_3d`` on the
    accelerated backends, and un-pooling is a layout-preserving scatter
    (:func:`gpu_service.models.ops.max_unpool3d`), never ``nn.MaxUnpool3d``.

Per-frame output
    A chunk holds ``T`` frames sampled sparsely (``Settings.sample_fps``). For
    ``anchors`` frames of the chunk, evenly spaced and always including the last one,
    the model builds the clip that ends at that frame: the ``window`` chunk frames up to
    it (the first frame repeated before the chunk start), stretched over the network's
    32 input frames (nearest neighbour). Each clip yields the map of its anchor frame,
    and ``saliency[b, t]`` is that map's *focus*: the fraction of the map's total mass
    inside its most salient 5% of pixels, in ``[0.05, 1]`` (about 0.05 for a uniform map,
    near 1 when attention is concentrated on one region, e.g. the product in close-up).
    Frames between anchors are linearly interpolated. A focus score is invariant to the
    map's overall scale, which the network (trained on normalised fixation maps) does
    not calibrate.

Input size
    ``Settings.saliency_size`` (``HEIGHTxWIDTH``, multiples of 32) and
    ``Settings.saliency_anchors`` if the deployment defines them; otherwise 224x384 with
    4 anchors on CUDA and 64x64 with 1 anchor on the CPU (keeps a batch of 8 chunks to
    a few seconds on a small CPU; without weights the outputs are not used anyway).
    The temporal length is fixed at 32: the network reduces time 32-fold and a shorter
    clip would not be the trained model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipline_core.settings import Settings
from gpu_service import protocol
from gpu_service.backends import CoreSpec, Runner, build_runner
from gpu_service.models.base import BuildContext, InputSpec, Model, register
from gpu_service.models.common import (
    calibrate_batchnorm,
    engine_cache_dir,
    model_buckets,
    parse_size,
    seeded,
    setting,
)
from gpu_service.models.ops import max_pool3d_with_indices, max_unpool3d
from gpu_service.models.weights import find_weights, load_exact, read_state_dict, strip_prefix

log = logging.getLogger(__name__)

#: file names looked up in ``Settings.weights_dir``, first found wins
WEIGHT_FILES = ("TASED_updated.pt", "TASED_v2.pt", "saliency.pt", "saliency.safetensors")
CLIP_LEN = 32
SPATIAL_STRIDE = 32
TOP_FRACTION = 0.05
_BN_EPS = 1e-3
_BN_MOMENTUM = 1e-3


# ---------------------------------------------------------------------------
# Building blocks (parameter names follow the official layout)
# ---------------------------------------------------------------------------
def _bn(channels: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class UnitConv3d(nn.Module):
    """Conv3d (no bias) → BatchNorm3d → ReLU; keys ``conv``, ``bn``."""

    fusable_pairs = (("conv", "bn"),)

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride, bias=False)
        self.bn: nn.Module = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class SepConv3d(nn.Module):
    """A k×k spatial then k×1×1 temporal convolution, each with BN and ReLU (S3D)."""

    fusable_pairs = (("conv_s", "bn_s"), ("conv_t", "bn_t"))

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, pad: int = 0) -> None:
        super().__init__()
        self.conv_s = nn.Conv3d(
            cin, cout, (1, kernel, kernel), (1, stride, stride), (0, pad, pad), bias=False
        )
        self.bn_s: nn.Module = _bn(cout)
        self.conv_t = nn.Conv3d(cout, cout, (kernel, 1, 1), (stride, 1, 1), (pad, 0, 0), bias=False)
        self.bn_t: nn.Module = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_s(self.conv_s(x)))
        return F.relu(self.bn_t(self.conv_t(x)))


class Mixed(nn.Module):
    """Inception-style block: 1x1 | 1x1→sep3 | 1x1→sep3 | maxpool→1x1, concatenated."""

    def __init__(
        self, cin: int, b0: int, b1: tuple[int, int], b2: tuple[int, int], b3: int
    ) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(UnitConv3d(cin, b0))
        self.branch1 = nn.Sequential(UnitConv3d(cin, b1[0]), SepConv3d(b1[0], b1[1], 3, 1, 1))
        self.branch2 = nn.Sequential(UnitConv3d(cin, b2[0]), SepConv3d(b2[0], b2[1], 3, 1, 1))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, 1, 1), UnitConv3d(cin, b3))
        self.out_channels = b0 + b1[1] + b2[1] + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], dim=1
        )


# (in, branch0, branch1, branch2, branch3) of the S3D mixed blocks
_MIXED_3 = [(192, 64, (96, 128), (16, 32), 32), (256, 128, (128, 192), (32, 96), 64)]
_MIXED_4 = [
    (480, 192, (96, 208), (16, 48), 64),
    (512, 160, (112, 224), (24, 64), 64),
    (512, 128, (128, 256), (24, 64), 64),
    (512, 112, (144, 288), (32, 64), 64),
    (528, 256, (160, 320), (32, 128), 128),
]
_MIXED_5 = [(832, 256, (160, 320), (32, 128), 128), (832, 384, (192, 384), (48, 128), 128)]


Int3 = tuple[int, int, int]


def _deconv(cin: int, cout: int, kernel: Int3, stride: Int3, pad: Int3) -> nn.ConvTranspose3d:
    return nn.ConvTranspose3d(cin, cout, kernel, stride, pad, bias=False)


class TasedNet(nn.Module):
    """TASED-Net: ``[N, 3, 32k, H, W]`` in ``[-1, 1]`` → saliency maps ``[N, k, H, W]``.

    ``H`` and ``W`` must be multiples of 32. With ``export_friendly`` set (ONNX export
    for TensorRT) pooling indices are recomputed from ``MaxPool`` values.
    """

    def __init__(self) -> None:
        super().__init__()
        self.export_friendly = False
        self.base1 = nn.Sequential(
            SepConv3d(3, 64, 7, 2, 3),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            UnitConv3d(64, 64),
            SepConv3d(64, 192, 3, 1, 1),
        )
        self.base2 = nn.Sequential(*(Mixed(*cfg) for cfg in _MIXED_3))
        self.base3 = nn.Sequential(*(Mixed(*cfg) for cfg in _MIXED_4))
        self.base4 = nn.Sequential(*(Mixed(*cfg) for cfg in _MIXED_5))
        self.convtsp1 = nn.Sequential(
            nn.Conv3d(1024, 1024, 1, 1, bias=False), _bn(1024), nn.ReLU(),
            _deconv(1024, 832, (1, 3, 3), (1, 1, 1), (0, 1, 1)), _bn(832), nn.ReLU(),
        )  # fmt: skip
        self.convtsp2 = nn.Sequential(
            _deconv(832, 480, (1, 3, 3), (1, 1, 1), (0, 1, 1)), _bn(480), nn.ReLU()
        )
        self.convtsp3 = nn.Sequential(
            _deconv(480, 192, (1, 3, 3), (1, 1, 1), (0, 1, 1)), _bn(192), nn.ReLU()
        )
        self.convtsp4 = nn.Sequential(
            _deconv(192, 64, (1, 4, 4), (1, 2, 2), (0, 1, 1)), _bn(64), nn.ReLU(),
            nn.Conv3d(64, 64, (2, 1, 1), (2, 1, 1), bias=False), _bn(64), nn.ReLU(),
            _deconv(64, 4, (1, 1, 1), (1, 1, 1), (0, 0, 0)), _bn(4), nn.ReLU(),
            nn.Conv3d(4, 4, (2, 1, 1), (2, 1, 1), bias=False), _bn(4), nn.ReLU(),
            _deconv(4, 4, (1, 4, 4), (1, 2, 2), (0, 1, 1)),
            nn.Conv3d(4, 1, 1, 1, bias=True),
            nn.Sigmoid(),
        )  # fmt: skip

    def _pool_idx(
        self, x: torch.Tensor, k: Int3, s: Int3, p: Int3
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return max_pool3d_with_indices(x, k, s, p, export_friendly=self.export_friendly)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k133, s122, p011 = (1, 3, 3), (1, 2, 2), (0, 1, 1)
        skip3 = self.base1(x)
        y = F.max_pool3d(skip3, k133, s122, p011)
        skip3 = F.max_pool3d(skip3, (4, 1, 1), (4, 1, 1))
        _, idx2 = self._pool_idx(skip3, k133, s122, p011)
        skip2 = self.base2(y)
        y = F.max_pool3d(skip2, 3, 2, 1)
        skip2 = F.max_pool3d(skip2, (4, 1, 1), (4, 1, 1))
        _, idx1 = self._pool_idx(skip2, k133, s122, p011)
        y = self.base3(y)
        y = F.max_pool3d(y, (2, 1, 1), (2, 1, 1))
        y, idx0 = self._pool_idx(y, (1, 2, 2), (1, 2, 2), (0, 0, 0))
        y = self.base4(y)

        z = self.convtsp1(y)
        z = max_unpool3d(z, idx0, (1, 2, 2), (1, 2, 2))
        z = self.convtsp2(z)
        z = max_unpool3d(z, idx1, k133, s122, skip2.shape[2:], p011)
        z = self.convtsp3(z)
        z = max_unpool3d(z, idx2, k133, s122, skip3.shape[2:], p011)
        z = self.convtsp4(z)
        return z[:, 0]


def load_tased_weights(net: TasedNet, path: Path) -> None:
    """Load an official-format TASED-Net state_dict (``module.`` prefix allowed)."""
    state = strip_prefix(read_state_dict(path), "module.")
    load_exact(net, state, what="TASED-Net", source=str(path))


# ---------------------------------------------------------------------------
# The daemon model
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SaliencyConfig:
    """Input geometry of the saliency model (see the module docstring)."""

    height: int = 224
    width: int = 384
    anchors: int = 4
    window: int = 8
    clip_len: int = CLIP_LEN
    top_fraction: float = TOP_FRACTION

    def __post_init__(self) -> None:
        if self.height % SPATIAL_STRIDE or self.width % SPATIAL_STRIDE:
            raise ValueError(f"saliency size {self.height}x{self.width}: use multiples of 32")
        if self.clip_len % CLIP_LEN:
            raise ValueError("saliency clip length must be a multiple of 32")
        if self.anchors < 1 or self.window < 1:
            raise ValueError("saliency anchors and window must be >= 1")

    @classmethod
    def for_device(cls, settings: Settings, device: torch.device) -> SaliencyConfig:
        cuda = device.type == "cuda"
        default_size = "224x384" if cuda else "64x64"
        h, w = parse_size(setting(settings, "saliency_size", default_size))
        anchors = setting(settings, "saliency_anchors", 0) or (4 if cuda else 1)
        return cls(height=h, width=w, anchors=anchors)


class SaliencyModel(Model):
    """TASED-Net over each chunk's anchor frames; output ``saliency`` ``[B, T]``."""

    name = "saliency"
    outputs = protocol.SALIENCY

    def __init__(
        self,
        device: torch.device,
        config: SaliencyConfig | None = None,
        *,
        weights: Path | None = None,
        backend: str = "eager",
        precision: str = "auto",
        buckets: tuple[int, ...] = (1, 2, 4, 8),
        cache_dir: Path | None = None,
        verify: bool = True,
    ) -> None:
        self.device = device
        self.config = config or SaliencyConfig()
        cfg = self.config
        self.batch_buckets = buckets
        self.input_spec = InputSpec(
            min_frames=1,
            net_input=(3, cfg.clip_len, cfg.height, cfg.width),
            preprocessing=(
                f"bilinear resize to {cfg.height}x{cfg.width}, scale to [-1, 1], "
                f"{cfg.anchors} anchor clips of {cfg.clip_len} frames, channels_last_3d"
            ),
        )
        with seeded():
            net = TasedNet()
        if weights is not None:
            load_tased_weights(net, weights)
            self.weights_loaded = True
            log.info("saliency: loaded TASED-Net weights from %s", weights)
        else:
            with seeded():
                calibrate_batchnorm(net, torch.randn(1, 3, CLIP_LEN, 64, 64))
            self.weights_loaded = False
            log.info(
                "saliency: no weights configured (looked for %s in weights_dir); "
                "deterministic initialisation, outputs are not used for scoring",
                " or ".join(WEIGHT_FILES),
            )
        self.net = net.eval().to(device)
        self.core_spec = CoreSpec(
            name=self.name,
            sample_shape=self.input_spec.net_input,
            buckets=tuple(b * cfg.anchors for b in buckets),
            memory_format=torch.channels_last_3d,
            compare_pool=8,
            arch=f"tased-v2|{cfg}",
            cache_dir=cache_dir,
        )
        self.runner: Runner = build_runner(
            self.net, self.core_spec, device, backend, precision, verify=verify
        )
        self.backend = self.runner.backend
        self.precision = self.runner.precision
        self._plans: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- preprocessing ----------------------------------------------------
    def _plan(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame gather index ``[A * clip_len]`` and score interpolation ``[A, T]``."""
        if t not in self._plans:
            cfg = self.config
            a = min(cfg.anchors, t)
            if a == 1:
                anchors = torch.tensor([t - 1])
            else:
                anchors = torch.round(torch.linspace(0, t - 1, a)).long()
            window = min(cfg.window, t)
            step = torch.arange(cfg.clip_len) * window // cfg.clip_len  # 0..window-1
            gather = (anchors[:, None] - (window - 1) + step[None, :]).clamp_(0, t - 1)
            frames = torch.arange(t, dtype=torch.float32)
            pos = anchors.float()
            interp = torch.zeros(a, t)
            for j in range(t):  # linear interpolation between neighbouring anchors
                f = frames[j]
                if a == 1 or f <= pos[0]:
                    interp[0, j] = 1.0
                elif f >= pos[-1]:
                    interp[-1, j] = 1.0
                else:
                    hi = int(torch.searchsorted(pos, f, right=False))
                    lo = hi - 1
                    w = float((f - pos[lo]) / (pos[hi] - pos[lo]))
                    interp[lo, j] = 1.0 - w
                    interp[hi, j] = w
            self._plans[t] = (gather.reshape(-1).to(self.device), interp.to(self.device))
        return self._plans[t]

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, T, H, W, 3]`` → ``[B * A, 3, clip_len, h, w]`` in channels_last_3d."""
        cfg = self.config
        b, t, h, w, c = frames.shape
        gather, _ = self._plan(t)
        img = frames.reshape(b * t, h, w, c).permute(0, 3, 1, 2).float()  # NCHW view, NHWC data
        if (h, w) != (cfg.height, cfg.width):
            img = F.interpolate(
                img, size=(cfg.height, cfg.width), mode="bilinear", align_corners=False
            )
        img = img.mul_(2.0 / 255.0).sub_(1.0)
        # NHWC memory: [B, T, h, w, 3] → gather anchor clips along T → NCDHW view that is
        # channels_last_3d contiguous (no copy beyond the gather itself).
        nhwc = img.permute(0, 2, 3, 1).reshape(b, t, cfg.height, cfg.width, c)
        clips = nhwc.index_select(1, gather)
        clips = clips.reshape(-1, cfg.clip_len, cfg.height, cfg.width, c)
        return clips.permute(0, 4, 1, 2, 3)

    def scores(self, maps: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """Anchor maps ``[B * A, h, w]`` → per-frame focus scores ``[B, T]``."""
        _, interp = self._plan(t)
        flat = maps.float().flatten(1)
        k = max(1, round(self.config.top_fraction * flat.shape[1]))
        top = flat.topk(k, dim=1).values.sum(dim=1)
        focus = top / flat.sum(dim=1).clamp_min(1e-12)
        return focus.view(b, -1) @ interp

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t = int(frames.shape[0]), int(frames.shape[1])
        x = self.preprocess(frames)
        maps = self.runner(x)[:, -1]  # last temporal map: the anchor frame
        return {"saliency": self.scores(maps, b, t)}


@register("saliency")
def _build(ctx: BuildContext) -> Model:
    settings = ctx.settings
    return SaliencyModel(
        ctx.device,
        SaliencyConfig.for_device(settings, ctx.device),
        weights=find_weights(settings, WEIGHT_FILES),
        backend=settings.backend,
        precision=setting(settings, "precision", "auto"),
        buckets=model_buckets(settings),
        cache_dir=engine_cache_dir(settings),
    )
