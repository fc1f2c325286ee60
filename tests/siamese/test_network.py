"""The Siamese network: shapes, the fully-convolutional identity, the receptive field, the heads."""

from __future__ import annotations

import math

import pytest
import torch

from fastad.siamese import NetworkConfig, SiameseNet
from fastad.siamese.network import DistanceDiscriminator

SMALL = (4, 6, 8, 8, 12)  # channel widths that keep the tests fast


def _net(seed: int, **kw) -> SiameseNet:
    torch.manual_seed(seed)
    kw.setdefault("channels", SMALL)
    kw.setdefault("embed_dim", 5)
    net = SiameseNet(NetworkConfig(**kw)).double().eval()
    # Non-trivial normalisation, so that the identity tests see it applied everywhere.
    net.set_normalization(torch.rand(net.config.in_channels) * 0.5 + 0.2, torch.rand(net.config.in_channels) + 0.2)
    return net


@pytest.mark.parametrize("window,channels", [(32, 3), (28, 1), (20, 3), (44, 2)])
def test_training_size_gives_one_position(window, channels, rng):
    net = _net(rng.initial_seed(), window=window, in_channels=channels)
    x = torch.rand(3, channels, window, window, generator=rng, dtype=torch.float64)
    out = net(x, x.flip(0))
    assert out.f1.shape == (3, 5, 1, 1) and out.f2.shape == (3, 5, 1, 1)
    assert out.logits.shape == (3, 1, 1)
    assert net.stride == 4 and net.window == window


@pytest.mark.parametrize("window", [32, 28])
def test_larger_input_equals_every_window_crop(window, rng):
    """Output (i, j) on a large input is exactly the network on the window crop at (4i, 4j)."""
    net = _net(rng.initial_seed(), window=window)
    rows, cols = 5, 3
    h, w = window + 4 * (rows - 1), window + 4 * (cols - 1)
    x1 = torch.rand(2, 3, h + 3, w + 2, generator=rng, dtype=torch.float64)  # extra pixels: no full window
    x2 = torch.rand_like(x1)
    with torch.no_grad():
        whole = net(x1, x2)
        assert whole.f1.shape[-2:] == (rows, cols)
        for i in range(rows):
            for j in range(cols):
                crop = (..., slice(4 * i, 4 * i + window), slice(4 * j, 4 * j + window))
                part = net(x1[crop], x2[crop])
                torch.testing.assert_close(part.f1[..., 0, 0], whole.f1[..., i, j], rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(part.logits[..., 0, 0], whole.logits[..., i, j], rtol=1e-10, atol=1e-12)


def test_receptive_field_is_the_window(rng):
    """The gradient of output (0, 0) reaches exactly the window x window corner of the input."""
    net = _net(rng.initial_seed(), window=32)
    # Over 32 inputs: on one, max pooling and ReLU may leave a border row without gradient
    # (seen once in CI: rows 0-3 unreached), which says nothing about the field's extent.
    x = torch.rand(32, 3, 48, 48, generator=rng, dtype=torch.float64, requires_grad=True)
    net.embed(x)[:, :, 0, 0].square().sum().backward()
    reached = x.grad.abs().sum((0, 1)) > 0
    rows = reached.any(1).nonzero().flatten()
    cols = reached.any(0).nonzero().flatten()
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (0, 31, 0, 31)


def test_heads(rng):
    x1 = torch.rand(2, 3, 32, 32, generator=rng, dtype=torch.float64)
    x2 = torch.rand(2, 3, 32, 32, generator=rng, dtype=torch.float64)
    concat = _net(1, head="concat")
    distance = _net(1, head="distance")
    absolute = _net(1, head="abs_difference")
    none = _net(1, head="none")
    assert concat.discriminator[0].in_channels == 15 and absolute.discriminator[0].in_channels == 5
    assert isinstance(distance.discriminator, DistanceDiscriminator)  # Eq. 1's distance, one scalar
    assert none.discriminator is None and none(x1, x2).logits is None
    with torch.no_grad():
        out = concat(x1, x2)
        manual = concat.discriminator(torch.cat([out.f1, out.f2, (out.f1 - out.f2).abs()], 1))[:, 0]
        torch.testing.assert_close(out.logits, manual)
        torch.testing.assert_close(concat.anomaly(x1, x2), 1 - torch.sigmoid(manual))
        # The distance head sees only ||f1 - f2||: swapping the inputs changes nothing.
        out = distance(x1, x2)
        norm = (out.f1 - out.f2).pow(2).sum(1, keepdim=True).sqrt()
        torch.testing.assert_close(out.logits, distance.discriminator(norm)[:, 0])
        torch.testing.assert_close(out.logits, distance(x2, x1).logits)
        torch.testing.assert_close(absolute(x1, x2).logits, absolute(x2, x1).logits)
        f = none.embed(torch.cat([x1, x2]))
        torch.testing.assert_close(none.anomaly(x1, x2), (f[:2] - f[2:]).norm(dim=1))


def test_the_distance_head_calls_farther_pairs_less_similar(rng):
    # Whatever its parameters, similarity must fall with the distance (else training can
    # collapse the embeddings; see test_detector's test_every_head_learns_the_pair_rule).
    head = DistanceDiscriminator().double()
    d = torch.rand(64, generator=rng, dtype=torch.float64).sort().values.view(-1, 1, 1, 1) * 10
    for raw_slope, bias in [(0.0, 0.0), (-8.0, 2.0), (5.0, -1.0)]:
        with torch.no_grad():
            head.raw_slope.fill_(raw_slope)
            head.bias.fill_(bias)
            logits = head(d).flatten()
        expected = bias - math.log1p(math.exp(raw_slope)) * d.flatten()
        torch.testing.assert_close(logits, expected)
        assert bool((logits.diff() < 0).all()) and float(head.slope.detach()) > 0


def test_normalisation_is_inside_the_network(rng):
    net = _net(3)
    x = torch.rand(1, 3, 32, 32, generator=rng, dtype=torch.float64)
    mean, std = net.input_mean.view(1, -1, 1, 1), net.input_std.view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net.embed(x), net.encoder((x - mean) / std))
    assert set(net.state_dict()) >= {"input_mean", "input_std"}


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"window": 30}, "multiple of 4"),
        ({"window": 16}, "at least 20"),
        ({"head": "cosine"}, "head must be one of"),
        ({"channels": (4, 4, 4)}, "five positive"),
        ({"embed_dim": 0}, "embed_dim"),
    ],
)
def test_bad_configuration(kw, match):
    with pytest.raises(ValueError, match=match):
        NetworkConfig(**kw)


def test_bad_inputs():
    net = _net(0)
    with pytest.raises(ValueError, match="smaller than the network's 32x32"):
        net.embed(torch.rand(1, 3, 31, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net.embed(torch.rand(3, 32, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating point"):
        net.embed(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="same shape"):
        net(torch.rand(1, 3, 32, 32, dtype=torch.float64), torch.rand(1, 3, 36, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="std must be positive"):
        net.set_normalization(torch.zeros(3), torch.zeros(3))


def test_config_round_trip():
    config = NetworkConfig(window=28, in_channels=1, embed_dim=3, head="distance")
    assert NetworkConfig.from_dict(config.to_dict()) == config
