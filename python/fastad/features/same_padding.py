"""TF "same" padding without a padded copy of the feature map.

TensorFlow-trained EfficientNets (timm's ``tf_*`` models, EfficientNet-Lite0 among them) pad
their stride-2 convolutions asymmetrically: one pixel more after than before. PyTorch's conv2d only
pads symmetrically, so timm's ``Conv2dSame`` copies the whole input into a padded tensor first;
at batch 1 on the CPU the four depthwise ones of Lite0's first blocks spend about 0.7 ms (of
6.5 ms) filling and copying.

Where the padding after is one more than before (an even input at stride 2), the same output
comes from the kernel with one zero tap put in front along that dimension and symmetric padding
of the larger amount: output o then reads inputs o*s - after .. o*s + k - after, the zero tap
meets the extra leading one, and the output size is unchanged. Where the two are equal the plain
symmetric padding does. Zero taps add exact zeros, so the features are the same to the bit.

Only grouped (depthwise) convolutions are rewritten: their work is light and the copy costs as
much, whereas a dense convolution's extra taps would cost more than the copy saves. As with
``fold_batchnorm``, the rewrite is checked on random inputs of even and odd sizes and undone
if the features differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._versions import in_place_version
from .backbones import Backbone
from .folding import features_on_random_images

__all__ = ["inline_same_padding"]

_TOLERANCE = 1e-5


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TF "same" along one dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SamePaddingConv(nn.Module):
    """A grouped TF-"same" convolution that pads inside conv2d (see the module's text), falling
    back to the padded copy for any padding it cannot express. Wraps the original module; the
    extended kernels are cached per shape of padding and made again whenever the original's
    weight is replaced or changed in place (a batch-norm fold after this rewrite, a ``.to()``)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self._extended: dict[
            tuple[int, int], tuple[torch.Tensor, int | None, torch.Tensor]
        ] = {}  # front -> (alias, version, kernel)

    def _extended_weight(self, front: tuple[int, int]) -> torch.Tensor:
        weight = self.conv.weight
        if weight.requires_grad and torch.is_grad_enabled():
            return F.pad(weight, (front[1], 0, front[0], 0))  # training: let gradients through
        cached = self._extended.get(front)
        # The cache keeps a detached alias of the weight it was made from: the alias holds that
        # storage alive, so an equal address means the same storage (not one reused after a
        # .to() or a fold freed it), and it shares the weight's in-place version counter (none
        # for weights made in inference mode, which only change there).
        if cached is not None:
            alias, version, extended = cached
            if (
                alias.data_ptr() == weight.data_ptr()
                and in_place_version(alias) == version
                and alias.dtype == weight.dtype
                and alias.device == weight.device
                and alias.stride() == weight.stride()
            ):
                return extended
        with torch.no_grad():
            # One zero tap in front of each dimension padded one more after than before; the
            # layout of the original (channels-last after .to(memory_format=...)) is kept.
            extended = F.pad(weight, (front[1], 0, front[0], 0))
            if weight.is_contiguous(memory_format=torch.channels_last):
                extended = extended.contiguous(memory_format=torch.channels_last)
        alias = weight.detach()
        self._extended[front] = (alias, in_place_version(alias), extended)
        return extended

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        weight = conv.weight
        padding, front = [], []
        for size, kernel, stride in zip(x.shape[-2:], conv.kernel_size, conv.stride, strict=True):
            before, after = _same_pads(int(size), kernel, stride)
            if after not in (before, before + 1):
                return conv(x)
            padding.append(after)
            front.append(after - before)
        if any(front):
            weight = self._extended_weight((front[0], front[1]))
        return F.conv2d(x, weight, conv.bias, conv.stride, tuple(padding), 1, conv.groups)


def _rewritable(module: nn.Module) -> bool:
    return (
        type(module).__name__ == "Conv2dSame"
        and isinstance(module, nn.Conv2d)
        and module.groups > 1
        and module.dilation == (1, 1)
        and module.padding == (0, 0)
        and module.padding_mode == "zeros"
    )


def inline_same_padding(backbone: Backbone) -> int:
    """Replaces each grouped TF-"same" convolution (timm's ``Conv2dSame``) of the backbone's
    stages by a :class:`SamePaddingConv`, in place; returns how many (0 when there were none, or
    when the numerical check failed and every one was put back)."""
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone must be a fastad Backbone, got {type(backbone).__name__}")
    sites = [
        (parent, name, child)
        for parent in backbone.stages.modules()
        for name, child in parent.named_children()
        if _rewritable(child)
    ]
    if not sites:
        return 0
    layers = backbone.layer_names
    sizes = ((64, 64), (61, 66))  # even, and odd by even: each padding case of every stride-2 layer
    with torch.inference_mode():
        before = [features_on_random_images(backbone, layers, size) for size in sizes]
    for parent, name, child in sites:
        setattr(parent, name, SamePaddingConv(child))
    with torch.inference_mode():
        after = [features_on_random_images(backbone, layers, size) for size in sizes]
    worst = max(
        float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12))
        for a, b in zip(after, before, strict=True)
        for k in layers
    )
    if worst > _TOLERANCE:
        for parent, name, child in sites:
            setattr(parent, name, child)
        return 0
    return len(sites)
