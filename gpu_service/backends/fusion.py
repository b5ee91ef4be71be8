"""Fold eval-mode batch normalisation into the convolution before it.

A convolution followed by ``BatchNorm`` in inference is one affine map per output
channel, so the BN can be folded into the convolution's weight and bias: one kernel
and one full read/write of the activation less per pair. The backends other than
``eager`` fold before anything else (TensorRT does the same internally).

Which pairs are folded is explicit, never guessed from attribute order: consecutive
``(conv, bn)`` children of an ``nn.Sequential``, and the attribute pairs a module
lists in a ``fusable_pairs`` class attribute (e.g. ``(("conv", "bn"),)``). A folded
BN is replaced by ``nn.Identity`` so the module's ``forward`` is unchanged.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def fold_into(conv: nn.Module, bn: nn.Module) -> bool:
    """Fold ``bn`` into ``conv`` in place; False (nothing changed) if they do not match."""
    if not isinstance(conv, _CONVS) or not isinstance(bn, _BNS):
        return False
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return False
    if conv.out_channels != bn.num_features:
        return False
    var = bn.running_var.float()
    mean = bn.running_mean.float()
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.weight is not None:
        scale = scale * bn.weight.float()
        shift = shift * bn.weight.float()
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    weight = conv.weight
    if isinstance(conv, _TRANSPOSED):
        # Transposed conv weights are [in, out/groups, k...]: scale along dim 1.
        groups = conv.groups
        w = weight.float().unflatten(0, (groups, -1))  # [g, in/g, out/g, k...]
        per_out = scale.view(groups, 1, -1, *([1] * (weight.dim() - 2)))
        w = (w * per_out).flatten(0, 1)
    else:
        w = weight.float() * scale.view(-1, *([1] * (weight.dim() - 1)))
    bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(shift)
    new_bias = bias * scale + shift
    conv.weight.copy_(w.to(weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=False)
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))
    return True


def fold_batchnorm_(root: nn.Module) -> int:
    """Fold every declared conv→BN pair under ``root`` in place; return how many."""
    folded = 0
    for module in list(root.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in itertools.pairwise(names):
                conv, bn = module._modules[first], module._modules[second]
                if conv is not None and bn is not None and fold_into(conv, bn):
                    module._modules[second] = nn.Identity()
                    folded += 1
        for conv_name, bn_name in getattr(module, "fusable_pairs", ()):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if fold_into(conv, bn):
                setattr(module, bn_name, nn.Identity())
                folded += 1
    return folded
