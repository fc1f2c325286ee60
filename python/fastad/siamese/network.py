"""The fully-convolutional Siamese network: one shared encoder and a per-position discriminator.

The encoder has only valid (unpadded) convolutions and 2x2 max pooling, so on an input of the
training size (``window`` x ``window``: 32 for CIFAR-10, 28 for MNIST) its output grid is 1 x 1,
and on a larger input of ``window + stride * n`` pixels it gives (n + 1) x (n + 1) positions, each
*exactly* the output of the same network on the ``window`` x ``window`` crop at that position
(pooling windows stay aligned because crops start at multiples of the stride). That identity is
what lets a network trained on small images be slid over images of any size without retraining.

Layout for a window w (a multiple of 4, at least 20), channels c0..c4, embedding dimension D::

    conv3 (3 -> c0), ReLU, conv3 (c0 -> c1), ReLU, maxpool 2      w      -> (w - 4) / 2
    conv3 (c1 -> c2), ReLU, maxpool 2                              -> (w - 8) / 4
    conv3 (c2 -> c3), ReLU, conv k (c3 -> c4), ReLU, conv1 (c4 -> D)  -> 1,   k = (w - 8) / 4 - 2

Output stride 4; receptive field = the window. The discriminator gives one logit per position, the
log-odds that the two inputs are *similar*: a 1x1 convolution, ReLU and a 1x1 convolution from
``[f1, f2, |f1 - f2|]`` (head "concat", the default) or from the element-wise ``|f1 - f2|`` (head
"abs_difference", fastad's earlier "distance"); or, from the Euclidean distance ``d = ||f1 - f2||``
of Eq. 1, one scalar per position (head "distance", the paper's), ``bias - slope * d`` with a
learned ``slope > 0`` (:class:`DistanceDiscriminator`: similarity falls with distance). Head "none"
has no discriminator; its anomaly score is the embedding distance.

Inputs are images in [0, 1]; the per-channel normalisation learned from the training data is a
pair of buffers inside the network, so callers never normalise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..checks import check_choice, check_int

__all__ = ["HEADS", "DistanceDiscriminator", "NetworkConfig", "SiameseNet", "SiameseOutput"]

HEADS = ("concat", "distance", "abs_difference", "none")
STRIDE = 4  # two 2x2 poolings


@dataclass(frozen=True)
class NetworkConfig:
    """Everything that fixes the network's shape (saved with the weights)."""

    window: int = 32
    in_channels: int = 3
    channels: tuple[int, int, int, int, int] = (16, 32, 64, 64, 128)
    embed_dim: int = 64
    head: str = "concat"
    hidden: int = 64

    def __post_init__(self) -> None:
        for name in ("window", "in_channels", "embed_dim", "hidden"):
            check_int(getattr(self, name), name)
        if self.window % STRIDE or self.window < 20:
            raise ValueError(
                f"window must be a multiple of {STRIDE} and at least 20 (the encoder's four 3x3 "
                f"convolutions and two poolings must leave a final kernel of at least 1), got {self.window}"
            )
        channels = tuple(self.channels)
        if len(channels) != 5 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"channels must be five positive ints (c0..c4), got {self.channels!r}")
        object.__setattr__(self, "channels", channels)
        check_choice(self.head, "head", HEADS)

    @property
    def final_kernel(self) -> int:
        return (self.window - 8) // 4 - 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NetworkConfig:
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


class SiameseOutput(NamedTuple):
    """Embeddings (B, D, h, w) of both inputs and the similarity logits (B, h, w), or None for
    head "none"."""

    f1: Tensor
    f2: Tensor
    logits: Tensor | None

    def distance(self) -> Tensor:
        """The embedding distance ||f1 - f2|| per position, (B, h, w)."""
        return (self.f1 - self.f2).pow(2).sum(1).sqrt()


class DistanceDiscriminator(nn.Module):
    """Head "distance": (B, 1, h, w) distances ``d`` -> log-odds ``bias - softplus(raw_slope) * d``.

    A discriminator that sees one scalar can do no more than place a threshold on it, so its only
    real freedom is the direction, and that must be "farther is less similar". Left free (a small
    MLP on ``d``, as this head was first built), the direction is a coin toss at initialisation;
    the embeddings start close together (``d`` about 0.01 on MNIST), so the discriminator's weights,
    whose gradient scales with ``d``, hardly move while the encoder, pushed the wrong way by the
    many dissimilar pairs, collapses to one point (``d = 0`` for every pair) and never recovers:
    the loss stayed at the class prior's for balanced and for random MNIST pairs alike. With the
    sign fixed the same training separates the digits."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_slope = nn.Parameter(torch.zeros(1))  # slope = softplus(0) = log 2 at the start
        self.bias = nn.Parameter(torch.zeros(1))

    @property
    def slope(self) -> Tensor:
        return F.softplus(self.raw_slope)

    def forward(self, distance: Tensor) -> Tensor:
        return self.bias - self.slope * distance


class SiameseNet(nn.Module):
    """See the module docstring. ``forward(x1, x2)`` takes two (B, C, H, W) batches in [0, 1] of
    the same size, H and W at least ``window``."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or NetworkConfig()
        c0, c1, c2, c3, c4 = config.channels
        self.encoder = nn.Sequential(
            nn.Conv2d(config.in_channels, c0, 3),
            nn.ReLU(inplace=True),
            nn.Conv2d(c0, c1, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, config.final_kernel),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, config.embed_dim, 1),
        )
        self.discriminator: nn.Module | None
        if config.head == "none":
            self.discriminator = None
        elif config.head == "distance":
            self.discriminator = DistanceDiscriminator()
        else:
            width = {"concat": 3 * config.embed_dim, "abs_difference": config.embed_dim}[config.head]
            self.discriminator = nn.Sequential(
                nn.Conv2d(width, config.hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(config.hidden, 1, 1)
            )
        # Per-channel normalisation of [0, 1] inputs; train() sets it from the training images.
        self.register_buffer("input_mean", torch.full((config.in_channels,), 0.5))
        self.register_buffer("input_std", torch.full((config.in_channels,), 0.25))

    @property
    def window(self) -> int:
        """Receptive field (square, in input pixels) = the training image size."""
        return self.config.window

    @property
    def stride(self) -> int:
        """Input pixels between neighbouring output positions."""
        return STRIDE

    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        """Sets the per-channel mean and standard deviation of [0, 1] inputs."""
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != self.config.in_channels or std.numel() != self.config.in_channels:
            raise ValueError(f"mean and std need {self.config.in_channels} values each")
        if not bool((std > 0).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("std must be positive and mean finite")
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)

    def embed(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> embeddings (B, D, (H - w) // 4 + 1, (W - w) // 4 + 1)."""
        self._check_input(x, "x")
        mean = self.input_mean.to(x.dtype).view(1, -1, 1, 1)
        std = self.input_std.to(x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
        if x.device.type == "cpu" and x.dtype == torch.float32:
            # oneDNN's channels-last float32 convolutions and poolings run this encoder 2-2.5x
            # faster on the CPU than the default layout (same values up to float rounding);
            # float64 has no oneDNN path and is slower channels-last, so it keeps its layout.
            x = x.contiguous(memory_format=torch.channels_last)
        return self.encoder(x)

    def similarity_logits(self, f1: Tensor, f2: Tensor) -> Tensor | None:
        """Per-position log-odds that the inputs are similar, (B, h, w); None for head "none"."""
        if self.discriminator is None:
            return None
        difference = (f1 - f2).abs()
        if self.config.head == "concat":
            features = torch.cat([f1, f2, difference], 1)
        elif self.config.head == "distance":  # Eq. 1: one scalar per position
            features = torch.linalg.vector_norm(difference, dim=1, keepdim=True)
        else:
            features = difference
        return self.discriminator(features).squeeze(1)

    def forward(self, x1: Tensor, x2: Tensor) -> SiameseOutput:
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        # One encoder call for both inputs: the same weights, half the kernel launches.
        f = self.embed(torch.cat([x1, x2]))
        f1, f2 = f.split(x1.shape[0])
        return SiameseOutput(f1, f2, self.similarity_logits(f1, f2))

    def anomaly(self, x1: Tensor, x2: Tensor) -> Tensor:
        """Per-position anomaly score (B, h, w): 1 - P(similar) for heads with a discriminator,
        the embedding distance ||f1 - f2|| for head "none" (then not bounded by 1)."""
        out = self(x1, x2)
        if out.logits is None:
            return out.distance()
        return torch.sigmoid(-out.logits)  # = 1 - sigmoid(logits), without cancellation

    def _check_input(self, x: object, name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        c, w = self.config.in_channels, self.config.window
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"{name} must be (B, {c}, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point in [0, 1], got {x.dtype}")
        if x.shape[-2] < w or x.shape[-1] < w:
            raise ValueError(
                f"{name} is {x.shape[-2]}x{x.shape[-1]} pixels, smaller than the network's {w}x{w} receptive field"
            )
