"""Pretrained backbones by name (``fastad.features.catalogue``), wrapped as a :class:`Backbone`:
normalisation plus named stages.

A :class:`Backbone` takes RGB images, float (B, 3, H, W) in [0, 1], applies the normalisation its
weights were trained with, and runs the network as an ordered list of named stages, stopping after
the deepest layer asked for. The classifier head is dropped; ``build_network`` gives the whole
network (with its head) when needed.

torchvision and timm are imported only when a backbone is built, so ``import fastad`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_device, check_image_batch
from .catalogue import BACKBONES, BackboneSpec, LayerInfo, backbone_spec, weights_source
from .weights import (
    WeightsFileError,
    backbone_state_dict,
    check_state_dict_matches,
    weights_file,
)

# ----------------------------------------------------------------------------------------------
# Building the network


def _construct(spec: BackboneSpec, on_meta: bool) -> nn.Module:
    """The architecture with its classifier; on the meta device when weights will replace it all
    (no time spent on a random initialisation that is thrown away)."""
    try:
        if spec.library == "torchvision":
            import torchvision

            constructor = getattr(torchvision.models, spec.constructor)
            make = lambda: constructor(weights=None)  # noqa: E731
        else:
            import timm

            make = lambda: timm.create_model(spec.constructor, pretrained=False)  # noqa: E731
    except ImportError as exc:
        raise ImportError(
            f"backbone {spec.name!r} needs {spec.library}, which is not installed: pip install 'fastad[vision]' ({exc})"
        ) from exc
    if on_meta:
        with torch.device("meta"):
            return make()
    return make()


def build_network(
    name: str, weights: str | os.PathLike | None = "imagenet", device: str | torch.device = "cpu"
) -> nn.Module:
    """The whole network of backbone ``name`` (torchvision or timm module, classifier included),
    in eval mode with every parameter frozen.

    It expects images normalised as the backbone's ``mean``/``std`` say (a :class:`Backbone` does
    that itself). ``weights``: ``"imagenet"`` (a local file, never downloaded), the path of a
    ``.pth``/``.safetensors`` state dict, or None for torchvision's/timm's random initialisation.
    Every tensor of the file must fit (``load_state_dict(strict=True)``).
    """
    return _load_network(backbone_spec(name), weights, device)[0]


def _load_network(
    spec: BackboneSpec, weights: str | os.PathLike | None, device: str | torch.device
) -> tuple[nn.Module, str]:
    """The network and a description of where its weights came from."""
    device = check_device(device)
    if weights is None:
        network, described = _construct(spec, on_meta=False), "random"
    elif isinstance(weights, (str, os.PathLike)):
        path = weights_file(spec.name, weights, weights_source)  # before building: a missing file fails fast
        network = _construct(spec, on_meta=True)
        state_dict = backbone_state_dict(path, spec.name, spec.family)
        check_state_dict_matches(state_dict, network.state_dict(), f"{path} (backbone {spec.name!r})")
        network.load_state_dict(state_dict, strict=True, assign=True)
        still_meta = [n for n, t in [*network.named_parameters(), *network.named_buffers()] if t.is_meta]
        if still_meta:  # a tensor the state dict does not cover would have no values at all
            raise WeightsFileError(f"{path} left tensors of {spec.name!r} without values: {', '.join(still_meta[:5])}")
        described = f"imagenet: {path}" if weights == "imagenet" else str(path)
    else:
        raise TypeError(f"weights must be 'imagenet', None or a file path, got {type(weights).__name__}")
    network.requires_grad_(False)
    return network.eval().to(device), described


# ----------------------------------------------------------------------------------------------
# Cutting a network into named stages


def _resnet_stages(network: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool)
    return [("stem", stem)] + [(f"layer{i}", getattr(network, f"layer{i}")) for i in range(1, 5)]


def _vgg_stages(network: nn.Module, pre_relu: bool) -> list[tuple[str, nn.Module]]:
    """convB_I (+ reluB_I when ``pre_relu``) and poolB stages from torchvision's ``features``."""
    modules = list(network.features)
    stages: list[tuple[str, nn.Module]] = []
    block, conv, i = 1, 0, 0
    while i < len(modules):
        module = modules[i]
        if isinstance(module, nn.Conv2d):
            if i + 1 >= len(modules) or not isinstance(modules[i + 1], nn.ReLU):
                raise ValueError(
                    f"VGG features[{i}] is a convolution not followed by a ReLU: not torchvision's VGG without BN"
                )
            conv += 1
            name = f"conv{block}_{conv}"
            if pre_relu:
                # torchvision's ReLU works in place, which would overwrite the returned conv output.
                stages += [(name, module), (f"relu{block}_{conv}", nn.ReLU(inplace=False))]
            else:
                stages.append((name, nn.Sequential(module, modules[i + 1])))
            i += 2
        elif isinstance(module, nn.MaxPool2d):
            stages.append((f"pool{block}", module))
            block, conv, i = block + 1, 0, i + 1
        else:
            raise ValueError(f"VGG features[{i}] is a {type(module).__name__}: not torchvision's VGG without BN")
    return stages


def _efficientnet_stages(network: nn.Module) -> list[tuple[str, nn.Module]]:
    # timm's bn1 / bn2 are BatchNormAct2d: the activation is inside them.
    stages: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(network.conv_stem, network.bn1))]
    stages += [(f"block{i}", block) for i, block in enumerate(network.blocks)]
    stages.append(("head", nn.Sequential(network.conv_head, network.bn2)))
    return stages


class Backbone(nn.Module):
    """A frozen feature network: ImageNet-style normalisation, then named stages run in order.

    ``forward(images, layers)`` takes float (B, 3, H, W) images in [0, 1] on the backbone's device
    and returns ``{layer: (B, C, h, w)}`` for the requested layers (network order), computing no
    stage past the deepest one. Attributes: ``name``; ``stages`` (``nn.ModuleDict`` in network
    order, the very modules of the underlying torchvision/timm network, some internal such as
    ``stem`` of a ResNet); ``layer_info`` (layer -> (channels, stride)); ``default_layers``;
    ``weights`` (where the weights came from); ``mean``/``std`` buffers (1, 3, 1, 1).
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[tuple[str, nn.Module]],
        *,
        layer_info: LayerInfo,
        default_layers: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        weights: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.stages = nn.ModuleDict(list(stages))
        missing = [layer for layer in layer_info if layer not in self.stages]
        if missing:
            raise ValueError(f"backbone {name!r}: layers {missing} are not stages of the network")
        self.layer_info = dict(layer_info)
        self.default_layers = tuple(default_layers)
        self.weights = weights
        # Not persistent: the normalisation belongs to the backbone's definition, not its weights.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def layer_names(self) -> list[str]:
        """The layers that can be asked for, in network order."""
        return list(self.layer_info)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def check_layers(self, layers: str | Iterable[str] | None) -> list[str]:
        """``layers`` as a list in network order without repeats (None: the default layers);
        an unknown name raises ValueError listing the valid ones."""
        if layers is None:
            layers = self.default_layers
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError(f"no layers given; backbone {self.name!r} has: {', '.join(self.layer_names)}")
        unknown = [layer for layer in layers if layer not in self.layer_info]
        if unknown:
            raise ValueError(
                f"unknown layer(s) {', '.join(map(repr, unknown))} for backbone {self.name!r}; "
                f"valid layers: {', '.join(self.layer_names)}"
            )
        return [layer for layer in self.layer_info if layer in layers]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(images - mean) / std in the backbone's dtype; images (B, 3, H, W) in [0, 1]."""
        images = images.to(self.mean.dtype)
        return (images - self.mean) / self.std

    def forward(
        self,
        images: torch.Tensor,
        layers: str | Iterable[str] | None = None,
        *,
        channels_last: bool = False,
        input_pools: Mapping[str, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Features ``{layer: (B, C, h, w)}`` of ``layers`` (default: all). ``channels_last``
        runs the stages on NHWC memory (for a backbone moved to ``memory_format=channels_last``);
        the images are normalised before the conversion, where broadcasting the per-channel
        mean and std over NCHW memory is about four times faster.

        ``input_pools`` (``{layer: factor}``, missing layers 1): a layer with a factor above 1 is
        computed from the normalised images max-pooled by that factor (kernel = stride = factor),
        one truncated pass per distinct factor. MLF-SC's authors take their levels this way, so
        that a shallow layer of a 4x smaller input lands on the grid of a deep layer of the
        whole image."""
        check_image_batch(images, check_values=False)  # the extractor checks values once
        wanted = self.check_layers(layers)
        x = self.normalize(images)
        pools = {layer: int((input_pools or {}).get(layer, 1)) for layer in wanted}
        if any(factor < 1 for factor in pools.values()):
            raise ValueError(f"input_pools must map layers to factors >= 1, got {dict(input_pools or {})}")
        largest = max(pools.values())
        if min(images.shape[-2:]) < largest:
            raise ValueError(
                f"images of {images.shape[-2]} x {images.shape[-1]} px are too small to be max-pooled by "
                f"{largest} (input_pools); give images of at least {largest} px a side"
            )
        features: dict[str, torch.Tensor] = {}
        for factor in sorted(set(pools.values())):
            pooled = F.max_pool2d(x, factor) if factor > 1 else x
            features.update(
                self._run_stages(pooled, [layer for layer in wanted if pools[layer] == factor], channels_last)
            )
        return {layer: features[layer] for layer in wanted}

    def _run_stages(self, x: torch.Tensor, wanted: list[str], channels_last: bool) -> dict[str, torch.Tensor]:
        """The stages in order on normalised ``x`` up to the deepest of ``wanted`` (network order)."""
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        deepest = wanted[-1]
        features: dict[str, torch.Tensor] = {}
        for name, stage in self.stages.items():
            x = stage(x)
            if name in wanted:
                features[name] = x
            if name == deepest:
                break  # the point of the named stages: nothing deeper is computed
        return features

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights!r}, layers={self.layer_names}"


def backbone_from_network(
    name: str, network: nn.Module, *, pre_relu: bool = False, weights: str = "custom"
) -> Backbone:
    """Wraps an already-built network of backbone ``name`` (e.g. a fine-tuned torchvision model)
    as a :class:`Backbone`; the stages are the network's own modules, which get frozen.

    ``pre_relu`` (VGG only): ``convB_I`` returns the convolution's output before its ReLU.
    """
    spec = backbone_spec(name)
    if pre_relu and spec.family != "vgg":
        raise ValueError(f"pre_relu applies to VGG backbones only, not {name!r}")
    if spec.family == "resnet":
        stages = _resnet_stages(network)
    elif spec.family == "vgg":
        stages = _vgg_stages(network, pre_relu)
    else:
        stages = _efficientnet_stages(network)
    backbone = Backbone(
        name,
        stages,
        layer_info=spec.layer_info,
        default_layers=spec.default_layers,
        mean=spec.mean,
        std=spec.std,
        weights=weights,
    )
    return backbone.to(next(network.parameters()).device)


def load_backbone(
    name: str,
    weights: str | os.PathLike | None = "imagenet",
    device: str | torch.device = "cpu",
    *,
    pre_relu: bool = False,
) -> Backbone:
    """Backbone ``name`` with its weights, frozen, in eval mode, on ``device``.

    ``weights``: ``"imagenet"`` finds the pretrained file on this machine (never downloads; a
    :class:`WeightsNotFoundError` says what to fetch and where to put it), a path loads that
    ``.pth``/``.safetensors`` file, None gives a random initialisation. ``pre_relu`` (VGG only)
    makes ``convB_I`` the convolution output before its ReLU. Unknown names raise ValueError.
    """
    spec = backbone_spec(name)
    if pre_relu and spec.family != "vgg":
        raise ValueError(f"pre_relu applies to VGG backbones only, not {name!r}")
    network, described = _load_network(spec, weights, device)
    return backbone_from_network(name, network, pre_relu=pre_relu, weights=described)


def available_backbones() -> dict[str, dict]:
    """For each known backbone: architecture, layers, default layers, and whether its ImageNet
    weights are on this machine (``available``, ``path``) or how to provide them.

    Keys of each entry: ``architecture``, ``library``, ``layers`` ({name: [channels, stride]}),
    ``default_layers``, ``weights`` (what they are), ``file``, ``available``, ``path`` (or None),
    ``searched`` (places looked at), ``downloads`` (URLs), ``how_to_provide`` (text).
    """
    report: dict[str, dict] = {}
    for name, spec in BACKBONES.items():
        entry: dict = {
            "architecture": spec.architecture,
            "library": spec.library,
            "layers": {layer: list(info) for layer, info in spec.layer_info.items()},
            "default_layers": list(spec.default_layers),
        }
        try:
            source = weights_source(name)
        except ImportError as exc:
            entry.update(
                weights=None,
                file=None,
                available=False,
                path=None,
                searched=[],
                downloads=[],
                how_to_provide=f"install {spec.library} first: pip install 'fastad[vision]' ({exc})",
            )
            report[name] = entry
            continue
        path, searched = source.find()
        target = source.preferred_cache_file()
        ways = [f"put {source.file_name} at {target}"] if target else []
        if source.install_hint:
            ways.append(source.install_hint)
        ways.append(f"pass weights='path/to/{source.file_name}'")
        entry.update(
            weights=source.description,
            file=source.file_name,
            available=path is not None,
            path=str(path) if path is not None else None,
            searched=searched,
            downloads=list(source.downloads),
            how_to_provide="; or ".join(ways),
        )
        report[name] = entry
    return report
