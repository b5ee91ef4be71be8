"""The model registry's lookups: which models exist and how to build one by name.

Owns ``available``/``build`` (frame models) and ``available_text``/``build_text`` (text
models). Importing it imports every built-in model module, whose ``@register`` /
``@register_text`` decorators fill the tables kept in :mod:`gpu_service.models.base`
and :mod:`gpu_service.models.text`. The model modules never import this one, so the
arrows point one way: registry -> models -> base. Must not import the daemon, the
engine or anything of the workers.
"""

from __future__ import annotations

from gpu_service.models import (  # noqa: F401
    clip,
    copywriter,
    embed,
    features,
    localizer,
    saliency,
)
from gpu_service.models.base import _REGISTRY, BuildContext, Model
from gpu_service.models.text import _TEXT_REGISTRY, TextModel


def available() -> list[str]:
    """Names of the registered frame models."""
    return sorted(_REGISTRY)


def build(name: str, ctx: BuildContext) -> Model:
    """Instantiate registered model ``name`` for ``ctx``; raise ``KeyError`` if unknown."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(ctx)


def available_text() -> list[str]:
    """Names of the registered text models."""
    return sorted(_TEXT_REGISTRY)


def build_text(name: str, ctx: BuildContext) -> TextModel:
    """Instantiate text model ``name``; ``KeyError`` if unknown."""
    try:
        factory = _TEXT_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_TEXT_REGISTRY))
        raise KeyError(f"unknown text model {name!r}; known: {known}") from None
    return factory(ctx)
