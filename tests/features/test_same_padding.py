"""inline_same_padding: TF "same" depthwise convolutions padded inside conv2d compute the same
features as timm's padded copy, at every input size, and follow later changes to their weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastad.features import backbone_from_network, fold_batchnorm, inline_same_padding
from fastad.features.same_padding import SamePaddingConv

SIZES = [(64, 64), (61, 66), (97, 130), (225, 224), (33, 35)]


def _features(backbone, images):
    with torch.inference_mode():
        return backbone(images, backbone.layer_names)


def _count(backbone) -> int:
    return sum(isinstance(m, SamePaddingConv) for m in backbone.stages.modules())


@pytest.mark.parametrize("name,sites", [("efficientnet_lite0", 4), ("efficientnet_b4", 4), ("resnet18", 0)])
def test_rewritten_backbone_computes_the_same_features(random_network, name, sites, rng):
    original = backbone_from_network(name, copy.deepcopy(random_network(name)))
    rewritten = backbone_from_network(name, copy.deepcopy(random_network(name)))
    assert inline_same_padding(rewritten) == sites
    assert _count(rewritten) == sites
    for size in SIZES:
        images = torch.rand(1, 3, *size, generator=rng)
        before, after = _features(original, images), _features(rewritten, images)
        for layer in original.layer_names:
            # Zero taps add exact zeros; only the order of a convolution's sums may differ.
            torch.testing.assert_close(after[layer], before[layer], rtol=1e-5, atol=1e-5, msg=f"{layer} at {size}")


def test_channels_last_and_later_weight_changes_are_followed(random_network, rng):
    original = backbone_from_network("efficientnet_lite0", copy.deepcopy(random_network("efficientnet_lite0")))
    rewritten = backbone_from_network("efficientnet_lite0", copy.deepcopy(random_network("efficientnet_lite0")))
    inline_same_padding(rewritten)  # caches kernels during its check, before the changes below
    for backbone in (original, rewritten):
        fold_batchnorm(backbone)  # replaces the convolutions' weights
        backbone.to(memory_format=torch.channels_last)  # swaps their storage
        with torch.no_grad():
            for conv in backbone.stages.modules():
                if type(conv).__name__ == "Conv2dSame" and conv.groups > 1:
                    conv.weight.mul_(1.5)  # in place
    images = torch.rand(2, 3, 96, 96, generator=rng).contiguous(memory_format=torch.channels_last)
    before, after = _features(original, images), _features(rewritten, images)
    for layer in original.layer_names:
        torch.testing.assert_close(after[layer], before[layer], rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_weight_when_training(rng):
    timm_layers = pytest.importorskip("timm.layers")
    conv = timm_layers.Conv2dSame(8, 8, 5, stride=2, groups=8)
    wrapped = SamePaddingConv(copy.deepcopy(conv))
    x = torch.rand(2, 8, 20, 21, generator=rng)
    out_a, out_b = conv(x), wrapped(x)
    torch.testing.assert_close(out_b, out_a)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    torch.testing.assert_close(wrapped.conv.weight.grad, conv.weight.grad)


def test_a_rewrite_that_changes_features_is_undone(random_network, monkeypatch):
    backbone = backbone_from_network("efficientnet_lite0", copy.deepcopy(random_network("efficientnet_lite0")))
    monkeypatch.setattr(SamePaddingConv, "forward", lambda self, x: self.conv(x) * 1.01)
    assert inline_same_padding(backbone) == 0
    assert _count(backbone) == 0


def test_rejects_what_is_not_a_backbone():
    with pytest.raises(TypeError, match="fastad Backbone"):
        inline_same_padding(nn.Conv2d(3, 3, 3))
