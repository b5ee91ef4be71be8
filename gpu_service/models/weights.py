"""Reading weight files and loading them into our modules with clear errors.

Real weights are only ever read from ``Settings.weights_dir``; nothing is downloaded
at run time. A file that does not match the module (missing keys, unexpected keys,
wrong shapes) raises :class:`WeightsError` naming the first offending keys, rather
than loading half a model silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from clipline_core.settings import Settings

log = logging.getLogger(__name__)

#: keys allowed to be absent from a file (older PyTorch did not save them)
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_SHOW = 5


class WeightsError(ValueError):
    """A weight file cannot be read or does not fit the model."""


def find_weights(settings: Settings, names: Iterable[str]) -> Path | None:
    """The first of ``names`` present in ``settings.weights_dir`` (None without a dir)."""
    if not settings.weights_dir:
        return None
    root = Path(settings.weights_dir)
    for name in names:
        path = root / name
        if path.exists():
            return path
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pt``/``.pth`` (``torch.save``) or ``.safetensors`` file.

    A checkpoint wrapping the tensors under ``state_dict`` or ``model`` is unwrapped.
    Files are read with ``weights_only=True``: no pickled code is executed.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format, pickled code refused, ...
        raise WeightsError(f"cannot read weights from {path}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()
    ):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(raw)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove a leading ``prefix`` (e.g. ``module.`` from DataParallel) from every key."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def load_exact(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    what: str,
    source: str,
    ignore: Callable[[str], bool] | None = None,
) -> None:
    """Copy ``state`` into ``module``; every parameter and buffer must be matched.

    ``ignore(key)`` marks file keys to drop (e.g. a classifier head we do not use).
    Raises :class:`WeightsError` listing missing, unexpected and mis-shaped keys.
    """
    own = module.state_dict()
    given = {k: v for k, v in state.items() if not (ignore and ignore(k))}
    missing = [k for k in own if k not in given and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in given if k not in own]
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in given.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with a wrong shape", wrong),
        ):
            if items:
                shown = ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")
                parts.append(f"{len(items)} {label} ({shown})")
        raise WeightsError(f"{source} does not fit the {what} layout: " + "; ".join(parts))
    converted = {k: v.to(own[k].dtype) for k, v in given.items()}
    module.load_state_dict(converted, strict=False)
    log.debug("loaded %d tensors for %s from %s", len(converted), what, source)
