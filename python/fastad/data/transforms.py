"""Geometric transforms on item dicts that keep an image and its mask aligned pixel for pixel.

Pure torch (``torch.nn.functional.interpolate``), no torchvision: the CPU-only build of fastad has
no torchvision, and the data sets must work there too. The sizes and the crop position follow
torchvision's ``resize`` / ``center_crop`` conventions, so the results match
``torchvision.transforms.v2.functional`` on float images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .datasets import Item

__all__ = ["ResizeCrop"]

Size = int | tuple[int, int]


def _check_size(value: object, name: str) -> int | tuple[int, int] | None:
    """None, a positive int, or a pair of positive ints (height, width); anything else raises."""
    if value is None:
        return None

    def positive_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    if positive_int(value):
        return value  # type: ignore[return-value]
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        if all(positive_int(x) for x in value):
            return (value[0], value[1])  # type: ignore[index]
    raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, got {value!r}")


def _resized_size(height: int, width: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resize, tuple):
        return resize
    # An int sets the shorter side; the longer one keeps the aspect ratio, truncated the way
    # torchvision does it so that both give the same shape.
    if height <= width:
        return resize, max(1, int(resize * width / height))
    return max(1, int(resize * height / width)), resize


class ResizeCrop:
    """Resize, then centre-crop, the ``image`` and ``mask`` of an item dict.

    Args:
        resize: None (keep the size), an int (the shorter side, aspect ratio kept) or a
            (height, width) pair.
        crop: None (no crop), an int (a square) or a (height, width) pair, taken from the centre
            of the resized image; it must fit inside it.

    The image (float (C, H, W)) is resized bilinearly with antialiasing (a triangle filter with
    non-negative weights) and kept within the input's range, so [0, 1] stays [0, 1]. The mask
    (bool (H, W)) is resized by "nearest-exact", which samples the input under each output
    pixel's centre, the point the bilinear resize is centred on too. Plain "nearest" would
    sample under each output pixel's top-left corner, shifting the mask half an output pixel
    against the image. Other keys of the item pass through unchanged; a missing
    ``mask`` is fine.

    Raises ValueError for sizes that are not positive ints, or a crop larger than the resized
    image (at construction when both sizes are fixed, else when called).
    """

    def __init__(self, resize: Size | None = None, crop: Size | None = None) -> None:
        self.resize = _check_size(resize, "resize")
        self.crop = _check_size(crop, "crop")
        if isinstance(self.resize, tuple) and self.crop is not None:
            self._crop_box(*self.resize)  # fail now rather than on the first image

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the result for an input of (height, width)."""
        if self.resize is not None:
            height, width = _resized_size(height, width, self.resize)
        if self.crop is None:
            return height, width
        _, _, crop_height, crop_width = self._crop_box(height, width)
        return crop_height, crop_width

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the centre crop of a (height, width) image."""
        crop_height, crop_width = (self.crop, self.crop) if isinstance(self.crop, int) else self.crop
        if crop_height > height or crop_width > width:
            raise ValueError(
                f"crop {crop_height}x{crop_width} (HxW) is larger than the image it is taken from, "
                f"{height}x{width} after resize={self.resize!r}"
            )
        # Same rounding as torchvision's center_crop, so both take the same pixels.
        top = int(round((height - crop_height) / 2.0))
        left = int(round((width - crop_width) / 2.0))
        return top, left, crop_height, crop_width

    def __call__(self, item: Item) -> Item:
        image = item["image"]
        if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.is_floating_point()):
            raise ValueError(f"item['image'] must be a float (C, H, W) tensor, got {_describe(image)}")
        mask = item.get("mask")
        image_size = tuple(image.shape[1:])
        if mask is not None and not (
            isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == image_size
        ):
            raise ValueError(
                f"item['mask'] must be a bool tensor of the image's size {image_size}, got {_describe(mask)}"
            )
        out = dict(item)
        height, width = image.shape[1:]
        if self.resize is not None:
            size = _resized_size(height, width, self.resize)
            if size != (height, width):
                low, high = torch.aminmax(image)
                image = F.interpolate(
                    image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
                )[0]
                # The filter weights are non-negative and sum to 1 only up to rounding, which can
                # put a value a few ulp outside the input's range (above 1.0): clamp back into it.
                image = image.clamp_(low, high)
                if mask is not None:
                    mask_u8 = mask[None, None].to(torch.uint8)  # interpolate takes no bool
                    mask = F.interpolate(mask_u8, size=size, mode="nearest-exact")[0, 0].bool()
            height, width = size
        if self.crop is not None:
            top, left, crop_height, crop_width = self._crop_box(height, width)
            image = image[:, top : top + crop_height, left : left + crop_width]
            if mask is not None:
                mask = mask[top : top + crop_height, left : left + crop_width]
        out["image"] = image.contiguous()
        if mask is not None:
            out["mask"] = mask.contiguous()
        return out

    def __repr__(self) -> str:
        return f"ResizeCrop(resize={self.resize!r}, crop={self.crop!r})"


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
