"""The contract of text models served by the GPU daemon, and their registry.

Frame models (:class:`gpu_service.models.base.Model`) map frame chunks to tensors; a
text model maps a batch of prompts to a batch of short texts. ``generate`` returns
``None`` for every prompt when no real weights are loaded, so a deterministic
placeholder network never produces user-visible text.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from gpu_service.models.base import BuildContext


class TextModel(abc.ABC):
    """A model the daemon runs on batches of prompts."""

    #: registry name, also the ``model`` label value in metrics
    name: str = ""
    #: True only when real weights were loaded from configuration
    weights_loaded: bool = False
    #: upper bound on generated tokens per prompt
    max_new_tokens: int = 24

    @abc.abstractmethod
    def generate(self, prompts: list[str]) -> list[str | None]:
        """One output per prompt, in order; ``None`` when there is nothing to say."""


TextModelFactory = Callable[[BuildContext], TextModel]
_TEXT_REGISTRY: dict[str, TextModelFactory] = {}


def register_text(name: str) -> Callable[[TextModelFactory], TextModelFactory]:
    """Decorator adding a text model factory to the registry."""

    def deco(factory: TextModelFactory) -> TextModelFactory:
        _TEXT_REGISTRY[name] = factory
        return factory

    return deco
