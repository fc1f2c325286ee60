"""Pretrained backbones and multi-layer feature extraction.

``load_backbone(name, weights="imagenet")`` gives a frozen :class:`Backbone` that normalises
[0, 1] images itself and exposes named layers with their (channels, stride) in ``layer_info``;
``FeatureExtractor(backbone, layers)`` turns image batches into float32 feature maps of those
layers, computing no deeper than it must. Weights are never downloaded: ``available_backbones()``
says which are on this machine and how to provide the others.

torchvision and timm are imported only when a backbone is built.
"""

from __future__ import annotations

from .backbones import Backbone, available_backbones, backbone_from_network, build_network, load_backbone
from .catalogue import BACKBONES, layers_at_strides, weights_source
from .extractor import FeatureExtractor
from .folding import fold_batchnorm
from .same_padding import inline_same_padding
from .weights import WeightsFileError, WeightsNotFoundError, read_state_dict

__all__ = [
    "BACKBONES",
    "Backbone",
    "FeatureExtractor",
    "WeightsFileError",
    "WeightsNotFoundError",
    "available_backbones",
    "backbone_from_network",
    "build_network",
    "fold_batchnorm",
    "inline_same_padding",
    "layers_at_strides",
    "load_backbone",
    "read_state_dict",
    "weights_source",
]
