"""fold_batchnorm: folded networks compute the original features; anything it cannot prove equal
is left as it was."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from fastad.features import Backbone, backbone_from_network, fold_batchnorm


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _features(backbone: Backbone, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return backbone(images, backbone.layer_names)


def _norm_after_conv(backbone: Backbone) -> int:
    count = 0
    for parent in backbone.stages.modules():
        children = list(parent.children())
        for first, second in itertools.pairwise(children):
            count += isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d)
    return count


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0", "efficientnet_b4"])
def test_folded_backbone_computes_the_same_features(random_network, name, rng):
    network = copy.deepcopy(random_network(name))
    backbone = backbone_from_network(name, network)
    images = torch.rand(2, 3, 96, 80, generator=rng)
    before = _features(backbone, images)
    pairs = _norm_after_conv(backbone)
    assert pairs > 0
    assert fold_batchnorm(backbone) >= pairs
    assert _norm_after_conv(backbone) == 0
    after = _features(backbone, images)
    for layer in backbone.layer_names:
        assert _relative(after[layer], before[layer]) < 1e-5, layer


def _single_stage_backbone(module: nn.Module, channels: int) -> Backbone:
    return Backbone(
        "custom",
        [("out", module)],
        layer_info={"out": (channels, 1)},
        default_layers=["out"],
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        weights="test",
    )


def _randomise_norms(module: nn.Module, gen: torch.Generator) -> None:
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            c = norm.num_features
            norm.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            norm.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            norm.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            norm.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)


def test_fold_keeps_a_convolution_bias(rng):
    module = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU())
    _randomise_norms(module, rng)
    backbone = _single_stage_backbone(module, 6).eval()
    images = torch.rand(1, 3, 20, 20, generator=rng)
    before = _features(backbone, images)["out"]
    assert fold_batchnorm(backbone) == 1
    assert isinstance(module[1], nn.Identity)
    assert _relative(_features(backbone, images)["out"], before) < 1e-6


class _NotASequence(nn.Module):
    """A convolution registered next to a batch norm that is not applied to its output alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + self.norm(y)


def test_a_fold_that_changes_the_features_is_undone(rng):
    module = _NotASequence()
    _randomise_norms(module, rng)
    backbone = _single_stage_backbone(module, 4).eval()
    images = torch.rand(1, 3, 16, 16, generator=rng)
    before = _features(backbone, images)["out"]
    weight = module.conv.weight
    assert fold_batchnorm(backbone) == 0
    assert module.conv.weight is weight and isinstance(module.norm, nn.BatchNorm2d)
    torch.testing.assert_close(_features(backbone, images)["out"], before, rtol=0, atol=0)


def test_fold_batchnorm_rejects_bad_input():
    module = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    with pytest.raises(TypeError, match="fastad Backbone"):
        fold_batchnorm(module)
    backbone = _single_stage_backbone(module, 2).train()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(backbone)


def test_no_pairs_means_nothing_changes():
    backbone = _single_stage_backbone(nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU()), 2).eval()
    assert fold_batchnorm(backbone) == 0
