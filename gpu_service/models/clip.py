"""``clip``: a CLIP image-text model scores frames against the job's texts and images.

Owns the daemon's CLIP model (:class:`ClipModel`, registered as ``clip``; opt-in with
``CLIPLINE_MODELS=localizer,clip``) and its outputs (:data:`gpu_service.protocol.CLIP`),
per picture:

``text``   ``[1]`` cosine between the picture and the job's ``"title. description"``
           (0 when the job has no text, or the weights are not real).
``image``  ``[MAX_IMAGES]`` cosine between the picture and each of the job's product
           images, in their order, 0 after the last one.

Pictures arrive letterboxed (aspect kept, bars of exact zeros; see
:func:`gpu_service.models.localizer.content_rects`): each is cropped to its content
rectangle, resized (bilinear, antialiased, aspect not kept, so nothing is cut away) to
the model's square input, normalised with CLIP's mean/std and embedded; embeddings are
L2-normalised, so a cosine is a dot product.

Like the localizer the model is batch-aware: when a job's refs chunk runs it embeds the
product images (the item's real rows only) and, once, the job's text, fetched with
``BuildContext.job_texts`` (the daemon reads the job's spec from Redis; None in tests
and benchmarks: no text), and keeps both per ``(job_id, generation)`` in a bounded LRU
(:data:`CACHE_JOBS`). The frames chunks are scored against that cache; frames of a job
whose refs this daemon has not seen get zeros (the localizer's status already makes
the worker retry such a job). The refs chunk gets the same outputs (each product image
against the text and the product images).

Weights: a Hugging Face CLIP directory at ``Settings.weights_dir/clip`` (``config.json``,
weights, tokenizer files), loaded with ``local_files_only``; nothing is downloaded. Without
it a tiny CLIP is built from :class:`transformers.CLIPConfig` with seeded random
weights and a byte-level, tokenizer-free text path, so everything still runs (tests,
benchmarks); the model is then untrusted and the highlight scorer ignores its outputs.

Must not import the workers, the daemon or the engine.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpu_service import protocol
from gpu_service.models.base import BuildContext, InputSpec, Model, register
from gpu_service.models.common import seeded
from gpu_service.models.localizer import content_rects
from gpu_service.models.weights import WeightsError, find_weights
from gpu_service.shm import ChunkKind, Descriptor

log = logging.getLogger(__name__)

WEIGHT_DIRS = ("clip",)
#: product images scored per picture (a job has at most this many)
MAX_IMAGES = 8
#: jobs whose embeddings are kept (a job's frames follow its refs within seconds)
CACHE_JOBS = 512
#: CLIP's normalisation (used when the directory has no preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: the tokenizer-free path of the placeholder model: bytes 0..255, then these two
BYTE_BOS, BYTE_EOS = 256, 257


def job_text(title: str, description: str) -> str:
    """``"title. description"`` (whitespace collapsed; either part may be empty)."""
    parts = [" ".join(title.split()).rstrip("."), " ".join(description.split())]
    return ". ".join(p for p in parts if p)


@dataclasses.dataclass(frozen=True)
class JobRefs:
    """One job's cached embeddings: product images ``[n, D]``, text ``[D]`` or None."""

    images: torch.Tensor
    text: torch.Tensor | None


def _placeholder_config() -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": BYTE_EOS + 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": BYTE_BOS,
            "eos_token_id": BYTE_EOS,
            "pad_token_id": BYTE_EOS,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        projection_dim=64,
    )


class ClipModel(Model):
    """CLIP cosines of every picture to the job's text and product images."""

    name = "clip"
    outputs = protocol.CLIP
    batch_aware = True

    def __init__(
        self,
        device: torch.device,
        directory: Path | None = None,
        *,
        job_texts: Callable[[str], tuple[str, str]] | None = None,
    ) -> None:
        from transformers import CLIPModel as HFClipModel

        self.device = device
        self.job_texts = job_texts
        self.tokenizer: Any = None
        mean: tuple[float, ...] = CLIP_MEAN
        std: tuple[float, ...] = CLIP_STD
        if directory is not None:
            from transformers import AutoTokenizer

            try:
                model = HFClipModel.from_pretrained(str(directory), local_files_only=True)
                self.tokenizer = AutoTokenizer.from_pretrained(
                    str(directory), local_files_only=True
                )
            except (OSError, ValueError) as exc:
                raise WeightsError(f"cannot load CLIP from {directory}: {exc}") from exc
            mean, std = _normalisation(directory, mean, std)
            self.weights_loaded = True
            log.info("clip: loaded CLIP from %s", directory)
        else:
            with seeded():
                model = HFClipModel(_placeholder_config())
            self.weights_loaded = False
            log.info(
                "clip: no CLIP directory (looked for %s in weights_dir); tiny deterministic "
                "model, outputs are not used for scoring",
                " or ".join(WEIGHT_DIRS),
            )
        self.model = model.eval().to(device)
        config: Any = model.config
        self.size = int(config.vision_config.image_size)
        self.context = int(config.text_config.max_position_embeddings)
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer else None
        self.eos_id = int(eos if eos is not None else config.text_config.eos_token_id)
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self._inv_std = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0)
        self.input_spec = InputSpec(
            min_frames=1,
            net_input=(3, self.size, self.size),
            preprocessing=(
                f"crop to the letterbox content, bilinear resize to {self.size}x{self.size}, "
                "CLIP mean/std"
            ),
        )
        self._cache: collections.OrderedDict[tuple[str, int], JobRefs] = collections.OrderedDict()
        self._kind = ChunkKind.FRAMES
        self._items: list[Descriptor] = []

    def bind(self, kind: ChunkKind, items: Sequence[Descriptor]) -> None:
        """The batch's kind and items (in row order) for the next call."""
        self._kind, self._items = kind, list(items)

    # -- embeddings ------------------------------------------------------------
    def pixels(self, flat: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` letterboxed -> normalised ``[N, 3, S, S]`` content crops."""
        rects = content_rects(flat).long().tolist()
        out = torch.empty(flat.shape[0], 3, self.size, self.size, device=flat.device)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, rect in enumerate(rects):  # the frames of a video share one rectangle
            groups.setdefault(tuple(rect), []).append(i)
        for (x, y, w, h), rows in groups.items():
            idx = torch.tensor(rows, device=flat.device)
            crop = flat[idx, y : y + h, x : x + w].permute(0, 3, 1, 2).float()
            out[idx] = F.interpolate(
                crop,
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return out.sub_(self._mean).mul_(self._inv_std)

    @torch.inference_mode()
    def embed_images(self, flat: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``[N, D]`` of letterboxed uint8 pictures ``[N, H, W, 3]``."""
        vision = self.model.vision_model(pixel_values=self.pixels(flat))
        return F.normalize(self.model.visual_projection(vision.pooler_output).float(), dim=-1)

    def token_ids(self, text: str) -> list[int]:
        """The text's token ids, cut to the model's context, ending with end-of-text."""
        if self.tokenizer is not None:
            ids = list(self.tokenizer(text, truncation=True, max_length=self.context)["input_ids"])
        else:  # the placeholder: UTF-8 bytes
            ids = [BYTE_BOS, *text.encode("utf-8")]
        if self.eos_id not in ids:
            ids = [*ids[: self.context - 1], self.eos_id]
        return ids[: self.context]

    @torch.inference_mode()
    def embed_text(self, text: str) -> torch.Tensor | None:
        """The unit text embedding ``[D]`` (None for an empty text)."""
        if not text:
            return None
        ids = torch.tensor([self.token_ids(text)], device=self.device)
        out = self.model.text_model(input_ids=ids)
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)[0]

    def _texts(self, job_id: str) -> tuple[str, str]:
        if self.job_texts is None:
            return "", ""
        try:
            return self.job_texts(job_id)
        except Exception:  # the lookup is best effort: no text, no text score
            log.warning("clip: cannot read the texts of job %s", job_id, exc_info=True)
            return "", ""

    def _remember(self, key: tuple[str, int], refs: JobRefs) -> None:
        self._cache[key] = refs
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_JOBS:
            self._cache.popitem(last=False)

    # -- the call --------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t, h, w, c = frames.shape
        emb = self.embed_images(frames.reshape(b * t, h, w, c))
        items = self._items[:b]
        if self._kind == ChunkKind.REFS:
            for i, d in enumerate(items):
                n = min(t, int(d.shape[0]) if d.shape else t, MAX_IMAGES)  # rest is padding
                text = self.embed_text(job_text(*self._texts(d.job_id)))
                self._remember(
                    (d.job_id, d.generation), JobRefs(emb[i * t : i * t + n].clone(), text)
                )
        text_cos = torch.zeros(b * t, 1, device=frames.device)
        image_cos = torch.zeros(b * t, MAX_IMAGES, device=frames.device)
        for i, d in enumerate(items):
            refs = self._cache.get((d.job_id, d.generation))
            if refs is None:
                continue
            rows = emb[i * t : (i + 1) * t]
            n = int(refs.images.shape[0])
            if n:
                image_cos[i * t : (i + 1) * t, :n] = rows @ refs.images.T
            if refs.text is not None and self.weights_loaded:
                text_cos[i * t : (i + 1) * t, 0] = rows @ refs.text
        return {"text": text_cos.reshape(b, t, 1), "image": image_cos.reshape(b, t, MAX_IMAGES)}


def _normalisation(
    directory: Path, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``image_mean``/``image_std`` of the directory's ``preprocessor_config.json``."""
    pre = directory / "preprocessor_config.json"
    if pre.exists():
        try:
            cfg = json.loads(pre.read_text())
            if len(cfg.get("image_mean") or ()) == 3 and len(cfg.get("image_std") or ()) == 3:
                return tuple(map(float, cfg["image_mean"])), tuple(map(float, cfg["image_std"]))
        except (OSError, ValueError, TypeError):
            log.warning("clip: ignoring an unreadable %s", pre)
    return mean, std


@register("clip")
def _build(ctx: BuildContext) -> Model:
    directory = find_weights(ctx.settings, WEIGHT_DIRS)
    if directory is not None and not (directory / "config.json").exists():
        log.warning("clip: %s has no config.json; using the placeholder model", directory)
        directory = None
    return ClipModel(ctx.device, directory, job_texts=ctx.job_texts)
