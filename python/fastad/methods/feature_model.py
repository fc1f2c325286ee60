"""The base of every method on a pretrained backbone: its parameters, a cached feature extractor,
the paper's input size, and the identity of the backbone's weights in model files.

A method derived from :class:`FeatureModel` calls ``self._features(images)`` for
``{layer: (B, C, h, w)}`` and never builds a backbone itself. Layers are given by name, or left
None for the method's own choice, which it states as output strides (``default_strides``) so that
one definition holds on every backbone (``fastad.features.layers_at_strides``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import io as model_io
from ..checks import check_choice
from ..data import ResizeCrop
from ..features import (
    BACKBONES,
    FeatureExtractor,
    fold_batchnorm,
    inline_same_padding,
    layers_at_strides,
    load_backbone,
)
from ..highres import measured_halo
from .base import AnomalyModel

# Storage types a method may keep its training features in (``bank_dtype``); the ops widen them to
# float32 when computing, so the choice trades memory against rounding only.
BANK_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bank_dtype_of(name: Any) -> torch.dtype:
    """The torch dtype of a ``bank_dtype`` parameter; ValueError naming the choices otherwise."""
    check_choice(name, "bank_dtype", tuple(BANK_DTYPES))
    return BANK_DTYPES[name]


class FeatureModel(AnomalyModel):
    """Parameters shared by the feature-based methods (the rest are :class:`AnomalyModel`'s):

    * ``backbone``: a name of ``fastad.features.BACKBONES``;
    * ``layers``: its layer names, or None for the method's default (``default_strides``);
    * ``weights``: ``"imagenet"`` (a local file, never downloaded), a weights file path, or None
      (random weights: for tests only; such a model cannot be saved meaningfully);
    * ``resize``, ``crop``: the input size, as in the papers (shorter side 256, centre crop 224);
      None keeps the images' size. Applied by ``transform()`` to ``fastad.data`` data sets;
    * ``half`` (CUDA only) and ``channels_last`` (NHWC convolutions, on by default: Lite0's
      forward on the CPU takes 8.8 ms instead of 14.8 ms at batch 1, and the features differ by
      float32 rounding only): speed options of the extractor.

    Learned: ``backbone_weights_``, a SHA-256 digest of the weights the features came from; a model
    file loaded where the backbone's weights differ refuses to score rather than mislead.
    """

    default_strides: ClassVar[tuple[int, ...]] = (8, 16)

    def __init__(
        self,
        *,
        backbone: str = "wide_resnet50_2",
        layers: list[str] | None = None,
        weights: str | None = "imagenet",
        resize: int | None = 256,
        crop: int | None = 224,
        half: bool = False,
        channels_last: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.resize = resize
        self.crop = crop
        self.half = half
        self.channels_last = channels_last

    # -- inputs and layers ---------------------------------------------------------------------

    def transform(self):
        if self.resize is None and self.crop is None:
            return None

        return ResizeCrop(self.resize, self.crop)

    def feature_layers(self) -> list[str]:
        """The layers this model extracts, in network order."""
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {', '.join(BACKBONES)}")
        if self.layers is None:
            return layers_at_strides(self.backbone, self.default_strides)
        names = [self.layers] if isinstance(self.layers, str) else list(self.layers)
        order = list(BACKBONES[self.backbone].layer_info)
        unknown = [n for n in names if n not in order]
        if unknown or not names:
            raise ValueError(f"layers {names} are not all layers of {self.backbone!r} (its layers: {', '.join(order)})")
        return sorted(dict.fromkeys(names), key=order.index)

    def feature_channels(self) -> int:
        """Channels of the extracted layers together, from the backbone's layer table (no forward)."""
        info = BACKBONES[self.backbone].layer_info
        return sum(info[layer][0] for layer in self.feature_layers())

    def _layer_strides(self) -> dict[str, int]:
        """``{layer: output stride}`` of the extracted layers."""
        info = BACKBONES[self.backbone].layer_info
        return {layer: info[layer][1] for layer in self.feature_layers()}

    def _check_params(self) -> None:
        super()._check_params()
        self.feature_layers()  # a bad backbone or layer name fails before any work

    # -- the extractor ---------------------------------------------------------------------------

    def _backbone_options(self) -> dict[str, Any]:
        """Keyword options of ``load_backbone`` this method needs (e.g. ``pre_relu``)."""
        return {}

    def _extractor_options(self) -> dict[str, Any]:
        """Keyword options of :class:`~fastad.features.FeatureExtractor` this method needs
        (e.g. ``input_pools``); values must be hashable after ``repr``."""
        return {}

    def _feature_identity(self) -> tuple:
        """Everything the extracted features depend on besides the images (backbone, layers,
        weights, device, precision, options): the key of the cached extractor, and a part of the
        key of what is derived from the features alone, such as a measured halo."""
        return (
            self.backbone,
            tuple(self.feature_layers()),
            str(self.weights),
            self.device,
            bool(self.half),
            bool(self.channels_last),
            tuple(sorted(self._backbone_options().items())),
            repr(self._extractor_options()),
        )

    def _measured_halo(self, fn, stride: int, align: int, *pipeline: Any) -> int:
        """``fastad.highres.measured_halo`` of ``fn`` (a function of this model's features), kept
        once per process for this method, feature identity and ``pipeline`` (the method's own
        options that change the reach of ``fn``)."""
        return measured_halo(fn, stride, align, self.device, (type(self).__name__, self._feature_identity(), *pipeline))

    def _cached_extractor(self) -> tuple[Any, dict[str, str]]:
        """The :class:`~fastad.features.FeatureExtractor` for the current backbone, layers,
        weights and device, and the record of its weights (source, SHA-256); built once and
        rebuilt only when one of those changed."""
        options = self._backbone_options()
        key = self._feature_identity()
        cached = self.__dict__.get("_extractor_cache")
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]

        network = load_backbone(self.backbone, self.weights, self.device, **options)
        # Every parameter and buffer of the stages, before a half cast changes them: the identity
        # of the weights, whichever file or cache they came from.
        record = {"source": network.weights, "sha256": model_io.tensor_digest(network.stages.state_dict())}
        expected = self.__dict__.get("backbone_weights_")
        if expected is not None and expected.get("sha256") != record["sha256"]:
            raise ValueError(
                f"this model was fitted on {self.backbone!r} weights with SHA-256 "
                f"{expected.get('sha256', '?')[:16]}... "
                f"({expected.get('source')}), but the weights found now ({network.weights}) "
                f"differ ({record['sha256'][:16]}...); "
                "provide the same weights file (weights=...) or fit again"
            )
        # The network is this model's own: batch norms fold into their convolutions (40 % off
        # Lite0's CPU forward; features change by float32 rounding only), and TF "same" depthwise
        # convolutions pad inside conv2d instead of copying their input (another 10 %; same bits).
        fold_batchnorm(network)
        inline_same_padding(network)
        extractor = FeatureExtractor(
            network,
            list(key[1]),
            device=self.device,
            half=self.half,
            channels_last=self.channels_last,
            batch_size=self.batch_size,
            **self._extractor_options(),
        )
        self.__dict__["_extractor_cache"] = (key, extractor, record)
        return extractor, record

    def _extractor(self):
        return self._cached_extractor()[0]

    def _features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{layer: float32 (B, C, h, w)}`` of a batch on the model's device."""
        return self._extractor()(images)

    def fit(self, data: Any) -> FeatureModel:
        super().fit(data)
        self.backbone_weights_ = dict(self._cached_extractor()[1])
        return self

    def _moved_to(self, device: str) -> None:
        self.__dict__.pop("_extractor_cache", None)  # rebuilt on the new device when next needed

    def _header_extras(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "layers": self.feature_layers(), "backbone_weights": self.backbone_weights_}
