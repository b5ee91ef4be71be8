"""Training-free per-frame features, computed on the device.

The ``features`` model needs no weights and is always trusted by the scorer. For
every frame it produces:

``hist``   joint RGB colour histogram, 8x8x8 bins, normalised to sum 1 (colour content,
           robust to position and scale of the product in the frame);
``thumb``  an 8x8 RGB thumbnail, zero-mean and unit-norm (coarse spatial layout, so a
           cosine similarity compares colour arrangement, not just colour amounts);
``motion`` mean absolute difference to the previous frame of the chunk at 32x32,
           in [0, 1] (how much the picture changes).

All three are a handful of fused tensor ops per batch, so they cost almost nothing
next to the neural models and keep the scoring path identical on CPU and GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_service import protocol
from gpu_service.models.base import BuildContext, Model, register

HIST_BINS_PER_CHANNEL = 8
THUMB_SIZE = 8
MOTION_SIZE = 32


class FeaturesModel(Model):
    name = "features"
    outputs = protocol.FEATURES

    def __init__(self, device: torch.device) -> None:
        self.device = device
        shift = 8 - (HIST_BINS_PER_CHANNEL.bit_length() - 1)
        self._shift = shift
        self._weights = torch.tensor(
            [HIST_BINS_PER_CHANNEL**2, HIST_BINS_PER_CHANNEL, 1], dtype=torch.int64, device=device
        )

    @property
    def trusted(self) -> bool:
        return True

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t, h, w, c = frames.shape
        flat = frames.reshape(b * t, h * w, c)
        # Colour histogram: quantise each channel, combine into one bin index, count.
        q = (flat >> self._shift).to(torch.int64)
        idx = (q * self._weights).sum(dim=-1)
        nbins = HIST_BINS_PER_CHANNEL**3
        hist = torch.zeros(b * t, nbins, device=frames.device, dtype=torch.float32)
        hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        hist /= float(h * w)

        img = frames.reshape(b * t, h, w, c).permute(0, 3, 1, 2).float().div_(255.0)
        thumb = F.adaptive_avg_pool2d(img, THUMB_SIZE).reshape(b * t, -1)
        thumb = thumb - thumb.mean(dim=1, keepdim=True)
        thumb = thumb / thumb.norm(dim=1, keepdim=True).clamp_min(1e-6)

        small = F.adaptive_avg_pool2d(img, MOTION_SIZE).reshape(b, t, -1)
        diff = (small[:, 1:] - small[:, :-1]).abs().mean(dim=-1)
        first = diff[:, :1] if t > 1 else torch.zeros(b, 1, device=frames.device)
        motion = torch.cat([first, diff], dim=1)

        return {
            "hist": hist.reshape(b, t, nbins),
            "thumb": thumb.reshape(b, t, -1),
            "motion": motion,
        }


@register("features")
def _build(ctx: BuildContext) -> Model:
    return FeaturesModel(ctx.device)
