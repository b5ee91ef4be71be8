"""Models served by the GPU daemon; importing this package registers the built-ins.

Frame models (``Model``: uint8 chunks in, per-frame tensors out): ``localizer`` (the
product localizer, the default), ``features``, ``saliency`` (TASED-Net), ``embed`` (ViT),
``clip`` (CLIP image-text). Text models (``TextModel``: prompts in,
short texts out): ``copywriter`` (GPT-2).
"""

from gpu_service.models.base import BuildContext, InputSpec, Model, register
from gpu_service.models.registry import available, available_text, build, build_text
from gpu_service.models.text import TextModel, register_text

__all__ = [
    "BuildContext",
    "InputSpec",
    "Model",
    "TextModel",
    "available",
    "available_text",
    "build",
    "build_text",
    "register",
    "register_text",
]
