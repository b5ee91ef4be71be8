"""``embed``: a Vision Transformer frame embedder; output ``embed`` ``[B, T, D]``, unit norm.

Every frame of a chunk is resized on the device to the model's square input (the
whole frame, aspect ratio not kept, so nothing is cropped away), normalised with the
model's mean/std, split into patches, encoded by a pre-norm transformer, and the
final class-token feature is L2-normalised: cosine similarity between frames (or
against a product image) is then a dot product.

Weights (``Settings.weights_dir``), first found wins:

``embed.safetensors`` / ``embed.pt``
    a ``state_dict`` in the *timm* ViT layout (``patch_embed.proj.*``, ``cls_token``,
    ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
    ``norm.*``; a ``head.*`` classifier is ignored), e.g. ``vit_base_patch16_224``.
    Width, depth, patch and input size are read from the tensors; heads are
    ``width / 64`` (``Settings.embed_heads`` overrides), LayerNorm eps 1e-6,
    mean = std = 0.5.
``vit/`` (a Hugging Face ``ViTModel``/``ViTForImageClassification`` directory)
    ``config.json`` (heads, eps) + ``model.safetensors`` or ``pytorch_model.bin``; the
    ``vit.``/``embeddings``/``encoder.layer.N.attention.attention.{query,key,value}``
    keys are mapped onto the layout above (q, k, v concatenated), and
    ``preprocessor_config.json`` supplies mean/std when present.

Without weights the model is ViT-B/16 at 224 on CUDA and a ViT-Ti/16 at 112 on the
CPU (``Settings.embed_arch`` / ``embed_size`` override), deterministically initialised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gpu_service import protocol
from gpu_service.backends import CoreSpec, Runner, build_runner
from gpu_service.models.base import BuildContext, InputSpec, Model, register
from gpu_service.models.common import engine_cache_dir, model_buckets, seeded, setting
from gpu_service.models.weights import WeightsError, find_weights, load_exact, read_state_dict

log = logging.getLogger(__name__)

WEIGHT_FILES = ("embed.safetensors", "embed.pt", "vit")
HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    patch: int = 16
    image: int = 224
    eps: float = 1e-6
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"ViT width {self.width} is not divisible by {self.heads} heads")
        if self.image % self.patch:
            raise ValueError(f"ViT input {self.image} is not a multiple of patch {self.patch}")

    @property
    def grid(self) -> int:
        return self.image // self.patch


ARCHS: dict[str, ViTConfig] = {
    "vit_b16": ViTConfig(),
    "vit_s16": ViTConfig(width=384, depth=12, heads=6, mlp=1536),
    "vit_ti16": ViTConfig(width=192, depth=12, heads=3, mlp=768),
}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = Mlp(cfg.width, cfg.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch, cfg.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """``[N, 3, S, S]`` normalised images → final class-token features ``[N, width]``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, cfg.width))
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self._init()

    @torch.no_grad()
    def _init(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.norm(x[:, 0])


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------
def config_from_timm(
    state: dict[str, torch.Tensor], heads: int = 0, **overrides: object
) -> ViTConfig:
    """Infer the architecture of a timm-layout ``state_dict``."""
    try:
        proj = state["patch_embed.proj.weight"]
        pos = state["pos_embed"]
    except KeyError as exc:
        raise WeightsError(f"not a ViT state_dict in timm layout: no {exc.args[0]}") from None
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max(
        (int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1
    )
    grid = math.isqrt(int(pos.shape[1]) - 1)
    if grid * grid != int(pos.shape[1]) - 1:
        raise WeightsError(f"pos_embed of {pos.shape[1]} tokens is not 1 + a square grid")
    mlp = int(state["blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * width
    kwargs: dict[str, object] = dict(
        width=width,
        depth=depth,
        heads=heads or max(1, width // HEAD_DIM),
        mlp=mlp,
        patch=patch,
        image=grid * patch,
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)  # type: ignore[arg-type]


_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)$")


def timm_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ViT ``state_dict`` onto the timm layout (pooler/head dropped)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("vit.")
        if m := _HF_QKV.match(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in _HF_RENAMES:
            new, hits = re.subn(pattern, repl, key)
            if hits:
                out[new] = value
                break
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise WeightsError(f"layer {layer} lacks one of query/key/value {kind}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]]
        )
    return out


def load_vit(path: Path, heads: int = 0) -> ViT:
    """Build and load a ViT from a timm-layout file or a Hugging Face ViT directory."""
    if path.is_dir():
        files = [path / "model.safetensors", path / "pytorch_model.bin"]
        weights = next((f for f in files if f.exists()), None)
        if weights is None:
            raise WeightsError(f"{path} has neither model.safetensors nor pytorch_model.bin")
        hf = (
            json.loads((path / "config.json").read_text())
            if (path / "config.json").exists()
            else {}
        )
        overrides: dict[str, object] = {}
        if hf.get("num_attention_heads"):
            overrides["heads"] = int(hf["num_attention_heads"])
        if hf.get("layer_norm_eps"):
            overrides["eps"] = float(hf["layer_norm_eps"])
        pre = path / "preprocessor_config.json"
        if pre.exists():
            pp = json.loads(pre.read_text())
            if pp.get("image_mean") and pp.get("image_std"):
                overrides["mean"] = tuple(float(v) for v in pp["image_mean"])
                overrides["std"] = tuple(float(v) for v in pp["image_std"])
        state = timm_from_hf(read_state_dict(weights))
        source = str(weights)
    else:
        overrides = {}
        state = read_state_dict(path)
        source = str(path)
    explicit_heads = heads or int(overrides.pop("heads", 0))  # type: ignore[call-overload]
    cfg = config_from_timm(state, explicit_heads, **overrides)
    with seeded():
        net = ViT(cfg)
    load_exact(net, state, what="ViT (timm layout)", source=source, ignore=_is_head)
    return net


def _is_head(key: str) -> bool:
    return key.startswith(("head.", "fc_norm.", "pooler.", "classifier.", "pre_logits."))


# ---------------------------------------------------------------------------
# The daemon model
# ---------------------------------------------------------------------------
class EmbedModel(Model):
    """ViT over every frame; output ``embed`` ``[B, T, D]`` float32, unit L2 norm."""

    name = "embed"
    outputs = protocol.EMBED

    def __init__(
        self,
        device: torch.device,
        *,
        net: ViT | None = None,
        weights_loaded: bool = False,
        frames_per_chunk: int = 16,
        backend: str = "eager",
        precision: str = "auto",
        buckets: tuple[int, ...] = (1, 2, 4, 8),
        cache_dir: Path | None = None,
        verify: bool = True,
    ) -> None:
        self.device = device
        if net is None:
            with seeded():
                net = ViT(ARCHS["vit_ti16"])
        self.cfg = net.cfg
        self.weights_loaded = weights_loaded
        self.batch_buckets = buckets
        size = self.cfg.image
        self.input_spec = InputSpec(
            min_frames=1,
            net_input=(3, size, size),
            preprocessing=f"bilinear resize to {size}x{size}, mean/std normalisation",
        )
        self.net = net.eval().to(device)
        self._mean = torch.tensor(self.cfg.mean, device=device).view(1, 3, 1, 1) * 255.0
        self._inv_std = 1.0 / (torch.tensor(self.cfg.std, device=device).view(1, 3, 1, 1) * 255.0)
        self.core_spec = CoreSpec(
            name=self.name,
            sample_shape=self.input_spec.net_input,
            buckets=tuple(b * frames_per_chunk for b in buckets),
            memory_format=torch.channels_last,
            arch=f"vit|{self.cfg}",
            cache_dir=cache_dir,
        )
        self.runner: Runner = build_runner(
            self.net, self.core_spec, device, backend, precision, verify=verify
        )
        self.backend = self.runner.backend
        self.precision = self.runner.precision

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, T, H, W, 3]`` → normalised ``[B * T, 3, S, S]`` (channels_last)."""
        b, t, h, w, c = frames.shape
        img = frames.reshape(b * t, h, w, c).permute(0, 3, 1, 2).float()
        size = self.cfg.image
        if (h, w) != (size, size):
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
        return img.sub_(self._mean).mul_(self._inv_std)

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t = int(frames.shape[0]), int(frames.shape[1])
        feats = self.runner(self.preprocess(frames))
        emb = F.normalize(feats.float(), dim=-1)
        return {"embed": emb.view(b, t, -1)}


@register("embed")
def _build(ctx: BuildContext) -> Model:
    settings = ctx.settings
    heads = setting(settings, "embed_heads", 0)
    path = find_weights(settings, WEIGHT_FILES)
    if path is not None:
        net = load_vit(path, heads)
        log.info("embed: loaded ViT weights from %s (%s)", path, net.cfg)
        loaded = True
    else:
        cuda = ctx.device.type == "cuda"
        arch = setting(settings, "embed_arch", "vit_b16" if cuda else "vit_ti16")
        if arch not in ARCHS:
            raise ValueError(f"unknown embed_arch {arch!r}; use one of {', '.join(ARCHS)}")
        size = setting(settings, "embed_size", 224 if cuda else 112)
        with seeded():
            net = ViT(dataclasses.replace(ARCHS[arch], image=size))
        log.info(
            "embed: no weights configured (looked for %s in weights_dir); deterministic "
            "%s at %d, outputs are not used for scoring",
            " or ".join(WEIGHT_FILES),
            arch,
            size,
        )
        loaded = False
    return EmbedModel(
        ctx.device,
        net=net,
        weights_loaded=loaded,
        frames_per_chunk=settings.frames_per_chunk,
        backend=settings.backend,
        precision=setting(settings, "precision", "auto"),
        buckets=model_buckets(settings),
        cache_dir=engine_cache_dir(settings),
    )
