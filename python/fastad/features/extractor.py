"""Multi-layer feature extraction: images in, float32 feature maps of chosen layers out.

The early stop lives in :class:`~fastad.features.backbones.Backbone`, which runs its named stages
in order and breaks after the deepest requested one. Of the ways to stop a network early, that
explicit truncated sequence was chosen because it is plain code: no exception thrown through
the network's forward by a hook (hooks that raise leave no trace in a profile and break
``torch.compile`` graphs), and no FX tracing (``create_feature_extractor`` has to trace timm's
dynamic "same" padding and renames the outputs to graph-node names). The stages are the original
modules, so weights and hooks on them are shared with the torchvision/timm network.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from .._batching import group_by_size, images_of, iterate, stack_images
from ..checks import check_device, check_image_batch, check_int
from .backbones import Backbone

# Below this many batches a progress bar is noise rather than help.
_PROGRESS_MIN_BATCHES = 4


class FeatureExtractor:
    """Feature maps of ``layers`` of a :class:`Backbone`, batch by batch, without gradients.

    ``layers``: layer names of the backbone (``backbone.layer_names``), or None for its default
    layers. ``device``: where to compute (None: where the backbone is); the backbone is moved
    there, in place, not copied (a second copy of a large network would double its memory).
    ``half`` (float16 compute) and ``channels_last`` (NHWC memory, faster convolutions on tensor
    cores) are CUDA options; ``half`` on the CPU raises ValueError. ``batch_size`` bounds how many
    images go through the network at once. ``input_pools`` (``{layer: factor}``): layers computed
    from the input max-pooled by a factor (see :meth:`Backbone.forward`).

    ``extractor(images)`` returns ``{layer: float32 (B, C, h, w)}`` on the extractor's device, in
    network order; only the stages up to the deepest requested layer are computed. They are made
    under ``torch.inference_mode``, so they are inference tensors: reading them anywhere is fine,
    changing them in place outside inference mode raises (``.clone()`` them first).
    """

    def __init__(
        self,
        backbone: Backbone,
        layers: str | Sequence[str] | None = None,
        *,
        device: str | torch.device | None = None,
        half: bool = False,
        channels_last: bool = False,
        batch_size: int = 32,
        input_pools: dict[str, int] | None = None,
    ) -> None:
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be a fastad Backbone (see load_backbone), got {type(backbone).__name__}")
        check_int(batch_size, "batch_size")
        self.layers = backbone.check_layers(layers)
        self.device = _resolve_device(device, backbone)
        if half and self.device.type != "cuda":
            raise ValueError(
                "half=True needs a CUDA device (float16 convolutions are slow or missing on the CPU); "
                f"device is {self.device}"
            )
        self.half = bool(half)
        self.channels_last = bool(channels_last)
        self.batch_size = batch_size
        self.input_pools = dict(input_pools) if input_pools else None
        self.dtype = torch.float16 if self.half else torch.float32
        backbone = backbone.to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone = backbone.eval()

    @property
    def layer_info(self) -> dict[str, tuple[int, int]]:
        """(channels, stride) of the extracted layers."""
        return {layer: self.backbone.layer_info[layer] for layer in self.layers}

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of one batch of images, float (B, 3, H, W) in [0, 1], on any device."""
        images = check_image_batch(images)
        chunks = [
            self._run(images[start : start + self.batch_size]) for start in range(0, images.shape[0], self.batch_size)
        ]
        if len(chunks) == 1:
            return chunks[0]
        return {layer: torch.cat([chunk[layer] for chunk in chunks]) for layer in self.layers}

    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            images = images.to(self.device, non_blocking=True).to(self.dtype)
            features = self.backbone(
                images, self.layers, channels_last=self.channels_last, input_pools=self.input_pools
            )
            return {layer: value.float().contiguous() for layer, value in features.items()}

    def extract(self, data: Iterable[Any], progress: bool | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yields the features of each batch of ``data``.

        ``data`` yields image batches (B, 3, H, W), single images (3, H, W) (grouped into batches
        of ``batch_size``), dicts holding ``"image"`` (fastad.data items, batched or not) or
        tuples whose first element is the images; a map-style data set is read in index order.
        ``progress``: True or False forces the tqdm bar on or off; None shows it when stderr is
        a terminal and there are several batches (or their number is unknown).
        """
        if isinstance(data, torch.Tensor):
            raise TypeError("extract() takes an iterable of batches or items; call the extractor directly on a tensor")
        groups = group_by_size(iterate(data), self.batch_size)
        first = next(groups, None)
        if first is None:
            return
        total = _batch_count(data, images_of(first[0]), self.batch_size)
        if progress is None:
            progress = sys.stderr.isatty() and (total is None or total >= _PROGRESS_MIN_BATCHES)
        from tqdm import tqdm

        with tqdm(
            total=total, disable=not progress, desc=f"features {self.backbone.name}", unit="batch", file=sys.stderr
        ) as bar:
            for group in itertools.chain([first], groups):
                yield self(stack_images(group))
                bar.update(1)


def _resolve_device(device: str | torch.device | None, backbone: Backbone) -> torch.device:
    return backbone.device if device is None else check_device(device)


def _batch_count(data: Any, first: torch.Tensor, batch_size: int) -> int | None:
    try:
        n = len(data)
    except TypeError:
        return None
    if first.dim() == 3:  # single images are grouped (more groups when sizes change)
        return -(-n // batch_size)
    return n  # batches pass through one to one (a large one is split inside __call__)
