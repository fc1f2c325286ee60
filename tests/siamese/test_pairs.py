"""fastad.siamese.pairs: rectangle statistics against their exact distributions, the pair-labelling
rules, per-epoch determinism and batch() == stacked items."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fastad.siamese.pairs import DigitPairs, RectanglePairs
from fastad.siamese.rectangles import BLUE, Box, paint_rectangle, sample_rectangle
from fastad.siamese.sources import LabelledImages

from .rectangles import P_MIN, as_box, boxes_of, random_uint8_images


def _binomial_ok(successes: int, trials: int, p: float) -> bool:
    return stats.binomtest(successes, trials, p).pvalue > P_MIN


def _size_law(height: int, width: int, area=(0.01, 0.99), aspect=(0.5, 1.5), grid: int = 2048):
    """The exact law of the returned (h, w), as the docstring of sample_rectangle defines it, by
    midpoint quadrature over the two uniforms: area fraction and aspect uniform in their ranges,
    h = round(sqrt(A / r)), w = round(sqrt(A r)) for A pixels, kept when the whole-pixel box is in
    the ranges and fits. Returns (sizes (K, 2) int64, probabilities (K,)). The sides are whole
    pixels, so this law is discrete; its continuous limit differs from it by about 0.01 in CDF at
    these image sizes, which 3,000 samples detect."""
    u = (np.arange(grid) + 0.5) / grid
    pixels = (area[0] + (area[1] - area[0]) * u[:, None]) * (height * width)
    ratio = aspect[0] + (aspect[1] - aspect[0]) * u[None, :]
    h = np.rint(np.sqrt(pixels / ratio)).astype(np.int64).ravel()
    w = np.rint(np.sqrt(pixels * ratio)).astype(np.int64).ravel()
    fraction, r = h * w / (height * width), w / h
    kept = (
        (h <= height)
        & (w <= width)
        & (fraction >= area[0])
        & (fraction <= area[1])
        & (r >= aspect[0])
        & (r <= aspect[1])
    )
    sizes, counts = np.unique(np.stack([h[kept], w[kept]], 1), axis=0, return_counts=True)
    return sizes, counts / counts.sum()


def _discrete_pit(
    values: np.ndarray, support: np.ndarray, probabilities: np.ndarray, np_rng: np.random.Generator
) -> np.ndarray:
    """Randomised probability integral transform: F(x-) + V (F(x) - F(x-)) with V ~ U(0, 1) is
    exactly U(0, 1) when x follows the discrete law (support, probabilities), so a KS test on it
    is exact where one on x itself (ties at the atoms) is not."""
    atoms, inverse = np.unique(support, return_inverse=True)
    mass = np.bincount(inverse, weights=probabilities)
    below = np.concatenate([[0.0], np.cumsum(mass)[:-1]])
    at = np.searchsorted(atoms, values)
    assert np.all(at < len(atoms)) and np.allclose(atoms[at], values), "a value outside the law's support"
    return below[at] + np_rng.random(values.shape[0]) * mass[at]


def _check_box_statistics(boxes: torch.Tensor, height: int, width: int, np_rng: np.random.Generator) -> None:
    """Ranges, the exact area distribution and uniform positions of (B, 4) boxes."""
    top, left, h, w = (boxes[:, k].numpy() for k in range(4))
    fraction = h * w / (height * width)
    assert np.all((fraction >= 0.01) & (fraction <= 0.99))
    assert np.all((w / h >= 0.5) & (w / h <= 1.5))
    assert np.all((top + h <= height) & (left + w <= width))
    sizes, probabilities = _size_law(height, width)
    law_h, law_w = sizes[:, 0], sizes[:, 1]
    # the same float expressions on both sides, so equal sizes give bit-equal values
    for values, support in ((h * w / (height * width), law_h * law_w / (height * width)), (w / h, law_w / law_h)):
        pit = _discrete_pit(values, support, probabilities, np_rng)
        assert stats.kstest(pit, "uniform").pvalue > P_MIN
    # positions: uniform on {0 .. H - h}; adding an independent U(0, 1) makes that exactly U(0, 1) after scaling
    for first, room in ((top, height - h + 1), (left, width - w + 1)):
        assert stats.kstest((first + np_rng.random(first.shape[0])) / room, "uniform").pvalue > P_MIN
        assert (first == 0).any() and (first == room - 1).any()  # both ends of the valid range occur


# ---------------------------------------------------------------------------------------------
# sample_rectangle


def test_rectangle_statistics(rng: torch.Generator, np_rng: np.random.Generator) -> None:
    height, width = (int(v) for v in np_rng.integers(96, 257, 2))
    boxes = [sample_rectangle(height, width, rng) for _ in range(3000)]
    _check_box_statistics(torch.tensor([[b.top, b.left, b.height, b.width] for b in boxes]), height, width, np_rng)
    assert min(b.area_fraction(height, width) for b in boxes) < 0.03  # the small end is reached


def test_rectangle_ranges_hold_after_rounding_on_tinyrandom_uint8_images(rng: torch.Generator) -> None:
    for height, width, area, aspect in (
        (3, 3, (0.1, 0.5), (0.5, 1.5)),
        (5, 2, (0.2, 0.6), (0.3, 1.0)),
        (32, 32, (0.25, 0.25), (0.5, 1.5)),
        (1, 1, (0.5, 1.0), (1.0, 1.0)),
    ):
        for _ in range(200):
            box = sample_rectangle(height, width, rng, area=area, aspect=aspect)
            assert area[0] <= box.area / (height * width) <= area[1]
            assert aspect[0] <= box.width / box.height <= aspect[1]
            assert box.fits(height, width)


def _exists(height: int, width: int, area, aspect) -> bool:
    """Brute force: some whole-pixel box inside the image satisfies both ranges."""
    return any(
        area[0] <= h * w / (height * width) <= area[1] and aspect[0] <= w / h <= aspect[1]
        for h in range(1, height + 1)
        for w in range(1, width + 1)
    )


def test_impossible_ranges_raise_up_front(rng: torch.Generator, np_rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="no rectangle of whole pixels inside a 1x1 image"):
        sample_rectangle(1, 1, rng, area=(0.01, 0.5))
    with pytest.raises(ValueError, match="no rectangle"):
        sample_rectangle(4, 4, rng, area=(0.01, 0.05))  # the smallest box already covers 1/16
    with pytest.raises(ValueError, match="no rectangle"):
        sample_rectangle(2, 2, rng, aspect=(3.0, 4.0))
    for _ in range(60):
        height, width = (int(v) for v in np_rng.integers(1, 9, 2))
        area = tuple(sorted(np_rng.uniform(0.001, 1.0, 2)))
        aspect = tuple(sorted(np_rng.uniform(0.2, 3.0, 2)))
        if _exists(height, width, area, aspect):
            try:
                box = sample_rectangle(height, width, rng, area=area, aspect=aspect)
            except ValueError as err:
                assert "rounding" in str(err)  # satisfiable, but too rarely reached: told so
            else:
                assert area[0] <= box.area / (height * width) <= area[1] and aspect[0] <= box.aspect <= aspect[1]
        else:
            with pytest.raises(ValueError, match="no rectangle of whole pixels"):
                sample_rectangle(height, width, rng, area=area, aspect=aspect)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"height": 0}, ValueError, "height"),
        ({"width": 2.0}, TypeError, "width"),
        ({"generator": 3}, TypeError, "torch.Generator"),
        ({"area": (0.5, 0.2)}, ValueError, "area"),
        ({"area": (0.0, 0.5)}, ValueError, "area"),
        ({"area": (0.5, 1.5)}, ValueError, "area"),
        ({"area": 0.5}, TypeError, "area"),
        ({"aspect": (-1, 2)}, ValueError, "aspect"),
        ({"aspect": (1, float("inf"))}, ValueError, "aspect"),
    ],
)
def test_sample_rectangle_bad_arguments(kwargs: dict, error: type, message: str) -> None:
    arguments = {"height": 8, "width": 8, "generator": torch.Generator().manual_seed(0)} | kwargs
    positional = [arguments.pop(k) for k in ("height", "width", "generator")]
    with pytest.raises(error, match=message):
        sample_rectangle(*positional, **arguments)


def test_box_checks_and_helpers() -> None:
    box = Box(2, 3, 4, 6)
    assert (box.bottom, box.right, box.area, box.aspect) == (6, 9, 24, 1.5)
    assert box.area_fraction(8, 12) == 0.25 and box.fits(6, 9) and not box.fits(5, 9)
    assert box.slices() == (slice(2, 6), slice(3, 9))
    for bad in ((-1, 0, 1, 1), (0, 0, 0, 1)):
        with pytest.raises(ValueError, match="Box"):
            Box(*bad)
    for bad in ((0, 0, 1, 1.5), (0, True, 1, 1)):
        with pytest.raises(TypeError, match="Box"):
            Box(*bad)


# ---------------------------------------------------------------------------------------------
# paint_rectangle


@pytest.mark.parametrize("channels", [3, 1])
def test_paint_rectangle(channels: int, rng: torch.Generator) -> None:
    image = torch.rand(channels, 9, 11, generator=rng)
    before = image.clone()
    box = Box(2, 5, 4, 3)
    painted, mask = paint_rectangle(image, box, (0.2, 0.4, 0.9))
    assert torch.equal(image, before)  # input untouched
    expected_mask = torch.zeros(9, 11, dtype=torch.bool)
    expected_mask[2:6, 5:8] = True
    assert mask.dtype == torch.bool and torch.equal(mask, expected_mask)
    fill = torch.tensor([0.2, 0.4, 0.9]) if channels == 3 else torch.tensor([0.5])  # grey: the colour's mean
    assert torch.allclose(painted[:, mask], fill[:, None].expand(-1, int(mask.sum())))
    assert torch.equal(painted[:, ~mask], image[:, ~mask])
    default, _ = paint_rectangle(image, box)
    assert torch.equal(default[:, 2, 5], torch.tensor(BLUE) if channels == 3 else torch.tensor([1 / 3]))


def test_paint_rectangle_bad_arguments(rng: torch.Generator) -> None:
    image = torch.rand(3, 8, 8, generator=rng)
    with pytest.raises(ValueError, match="does not fit"):
        paint_rectangle(image, Box(5, 0, 4, 2))
    with pytest.raises(TypeError, match="floating"):
        paint_rectangle((image * 255).to(torch.uint8), Box(0, 0, 2, 2))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        paint_rectangle(image[None], Box(0, 0, 2, 2))
    with pytest.raises(TypeError, match="Box"):
        paint_rectangle(image, (0, 0, 2, 2))
    with pytest.raises(ValueError, match="color"):
        paint_rectangle(image, Box(0, 0, 2, 2), (0, 0, 255))
    with pytest.raises(TypeError, match="color"):
        paint_rectangle(image, Box(0, 0, 2, 2), (0, 1))


# ---------------------------------------------------------------------------------------------
# RectanglePairs


@pytest.mark.parametrize("channels", [3, 1])
def test_rectangle_pairs_follow_the_labelling_rule(channels: int, rng: torch.Generator) -> None:
    images = random_uint8_images(rng, 200, channels)
    pairs = RectanglePairs(images, 4000, seed=int(torch.randint(0, 2**31, (), generator=rng)))
    b = pairs.batch(range(len(pairs)))
    has1, has2 = b["mask1"].any((1, 2)), b["mask2"].any((1, 2))
    assert torch.equal(b["similar"], (has1 == has2).float())
    assert _binomial_ok(int(has1.sum()), 4000, 0.5) and _binomial_ok(int(has2.sum()), 4000, 0.5)
    assert _binomial_ok(int((b["similar"] == 0).sum()), 4000, 0.5)  # dissimilar half of the time
    # second image uniform over the images
    counts = torch.bincount(b["index2"], minlength=200).numpy()
    assert stats.chisquare(counts).pvalue > P_MIN
    fill = torch.tensor(BLUE) if channels == 3 else torch.tensor([1 / 3])
    for k in range(300):
        for slot in ("1", "2"):
            x, mask = b[f"x{slot}"][k], b[f"mask{slot}"][k]
            source = images[b[f"index{slot}"][k]].float() / 255
            assert torch.equal(x[:, ~mask], source[:, ~mask])
            if mask.any():
                box = as_box(mask)
                assert 0.01 <= box.area_fraction(12, 10) <= 0.99 and 0.5 <= box.aspect <= 1.5
                assert torch.equal(x[:, mask], fill[:, None].expand(-1, box.area))
    boxes_of(b["mask1"][has1])  # every mask is one filled rectangle


def test_rectangle_pairs_boxes_have_the_training_distribution(
    rng: torch.Generator, np_rng: np.random.Generator
) -> None:
    height, width = (int(v) for v in np_rng.integers(96, 161, 2))
    pairs = RectanglePairs(
        random_uint8_images(rng, 16, 1, height, width), 1500, seed=int(np_rng.integers(0, 2**40)), p_defect=1.0
    )
    batch = pairs.batch(range(1500))
    boxes = torch.cat([boxes_of(batch["mask1"]), boxes_of(batch["mask2"])])
    _check_box_statistics(boxes, height, width, np_rng)


def test_each_image_is_first_once_per_epoch(rng: torch.Generator) -> None:
    images = random_uint8_images(rng, 97)
    pairs = RectanglePairs(images)
    assert len(pairs) == 97
    for epoch in (0, 1, 5):
        pairs.set_epoch(epoch)
        assert sorted(pairs.batch(range(97))["index1"].tolist()) == list(range(97))
    longer = RectanglePairs(images, 250, seed=3)
    first = longer.batch(range(250))["index1"]
    assert sorted(first[:97].tolist()) == list(range(97)) and sorted(first[97:194].tolist()) == list(range(97))
    assert set(torch.bincount(first, minlength=97).tolist()) == {2, 3}


def test_rectangle_pairs_are_pure_functions_of_seed_epoch_and_index(rng: torch.Generator) -> None:
    images = random_uint8_images(rng, 64)
    pairs, twin = RectanglePairs(images, seed=11), RectanglePairs(images, seed=11)
    order = torch.randperm(64, generator=rng).tolist()
    a = pairs.batch(range(64))
    b = twin.batch(order)  # another order, another object: the same items
    for key in a:
        assert torch.equal(a[key][order], b[key]), key
    pairs.set_epoch(1)
    c = pairs.batch(range(64))
    assert not torch.equal(a["index1"], c["index1"]) and not torch.equal(a["mask1"], c["mask1"])
    pairs.set_epoch(0)
    assert all(torch.equal(a[key], pairs.batch(range(64))[key]) for key in a)
    other_seed = RectanglePairs(images, seed=12).batch(range(64))
    assert not torch.equal(a["index1"], other_seed["index1"])


@pytest.mark.parametrize("channels", [3, 1])
def test_rectangle_batch_equals_stacked_items(channels: int, rng: torch.Generator) -> None:
    pairs = RectanglePairs(random_uint8_images(rng, 40, channels), 90, seed=5, color=(0.3, 0.6, 0.1))
    pairs.set_epoch(2)
    indices = torch.randint(0, 90, (50,), generator=rng).tolist()  # repeats included
    batch = pairs.batch(indices)
    items = [pairs[i] for i in indices]
    assert set(batch) == set(items[0]) == {"x1", "x2", "similar", "mask1", "mask2", "index1", "index2"}
    for key in batch:
        assert torch.equal(batch[key], torch.stack([item[key] for item in items])), key
    assert batch["x1"].dtype == torch.float32 and batch["similar"].dtype == torch.float32
    assert batch["mask1"].dtype == torch.bool and batch["similar"].shape == (50,)
    assert float(batch["x1"].min()) >= 0.0 and float(batch["x1"].max()) <= 1.0
    empty = pairs.batch([])
    assert empty["x1"].shape == (0, channels, 12, 10)


def test_rectangle_pairs_defect_probability_extremes(rng: torch.Generator) -> None:
    images = random_uint8_images(rng, 30)
    never = RectanglePairs(images, p_defect=0.0).batch(range(30))
    assert not never["mask1"].any() and not never["mask2"].any() and bool((never["similar"] == 1).all())
    always = RectanglePairs(images, p_defect=1).batch(range(30))
    assert bool(always["mask1"].any((1, 2)).all() and always["mask2"].any((1, 2)).all())
    assert bool((always["similar"] == 1).all())


def test_rectangle_pairs_bad_arguments(rng: torch.Generator) -> None:
    images = random_uint8_images(rng, 5)
    with pytest.raises(TypeError, match="uint8"):
        RectanglePairs(images.float())
    with pytest.raises(TypeError, match=r"pass images\.images"):
        RectanglePairs(LabelledImages(images, torch.zeros(5, dtype=torch.int64), ("a",)))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        RectanglePairs(images[:, :2])
    with pytest.raises(ValueError, match="N >= 1"):
        RectanglePairs(images[:0])
    with pytest.raises(ValueError, match="n_pairs"):
        RectanglePairs(images, 0)
    with pytest.raises(ValueError, match="p_defect"):
        RectanglePairs(images, p_defect=1.5)
    with pytest.raises(ValueError, match="seed"):
        RectanglePairs(images, seed=-1)
    with pytest.raises(ValueError, match="no rectangle of whole pixels inside a 12x10"):
        RectanglePairs(images, area=(0.001, 0.005))
    with pytest.raises(ValueError, match="color"):
        RectanglePairs(images, color=(0, 0, 2))
    pairs = RectanglePairs(images)
    with pytest.raises(ValueError, match="epoch"):
        pairs.set_epoch(-1)
    with pytest.raises(IndexError):
        pairs[5]
    with pytest.raises(IndexError):
        pairs.batch([0, 5])
    with pytest.raises(TypeError):
        pairs.batch([0.5])
    with pytest.raises(TypeError):
        pairs["0"]
    assert len(list(iter(pairs))) == 5  # the sequence protocol ends on IndexError


# ---------------------------------------------------------------------------------------------
# DigitPairs


def _labelled(rng: torch.Generator, n: int, n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randperm(n, generator=rng) % n_labels  # every label present, shuffled
    return random_uint8_images(rng, n, 1, 6, 6), labels


@pytest.mark.parametrize("similar_fraction", [0.5, 0.2])
def test_digit_pairs_rule_and_balance(similar_fraction: float, rng: torch.Generator) -> None:
    images, labels = _labelled(rng, 60, 6)
    labels = labels * 7 + 3  # labels need not be 0 .. K - 1
    pairs = DigitPairs(
        images, labels, 20_000, seed=int(torch.randint(0, 2**31, (), generator=rng)), similar_fraction=similar_fraction
    )
    b = pairs.batch(range(len(pairs)))
    assert torch.equal(b["similar"], (b["label1"] == b["label2"]).float())
    assert torch.equal(b["label1"], labels[b["index1"]]) and torch.equal(b["label2"], labels[b["index2"]])
    assert not bool((b["index1"] == b["index2"]).any())  # never an image with itself
    assert _binomial_ok(int(b["similar"].sum()), 20_000, similar_fraction)
    # first image uniform; similar partners uniform too (first uniform, partner uniform among the others of its label)
    assert stats.chisquare(torch.bincount(b["index1"], minlength=60).numpy()).pvalue > P_MIN
    similar = b["similar"] == 1
    assert stats.chisquare(torch.bincount(b["index2"][similar], minlength=60).numpy()).pvalue > P_MIN
    # labels are equally frequent here, so dissimilar partners are uniform as well
    assert stats.chisquare(torch.bincount(b["index2"][~similar], minlength=60).numpy()).pvalue > P_MIN
    assert torch.equal(b["x1"], images[b["index1"]].float() / 255)


def test_digit_pairs_by_default_are_random_pairs(rng: torch.Generator) -> None:
    # The paper's pairs: a partner uniform over the other images, similar when the labels agree,
    # so with ten equally frequent labels about 10 % are similar.
    images, labels = _labelled(rng, 100, 10)
    pairs = DigitPairs(images, labels, 20_000, seed=int(torch.randint(0, 2**31, (), generator=rng)))
    assert pairs.similar_fraction is None
    b = pairs.batch(range(len(pairs)))
    assert torch.equal(b["similar"], (b["label1"] == b["label2"]).float())
    assert not bool((b["index1"] == b["index2"]).any())
    assert _binomial_ok(int(b["similar"].sum()), 20_000, 9 / 99)  # 9 of the 99 others share a label
    assert stats.chisquare(torch.bincount(b["index2"], minlength=100).numpy()).pvalue > P_MIN


def test_digit_pairs_batch_items_and_epochs(rng: torch.Generator) -> None:
    images, labels = _labelled(rng, 30, 3)
    pairs = DigitPairs(images, labels, 100, seed=2)
    pairs.set_epoch(3)
    indices = torch.randint(0, 100, (40,), generator=rng).tolist()
    batch = pairs.batch(indices)
    items = [pairs[i] for i in indices]
    assert set(batch) == set(items[0]) == {"x1", "x2", "similar", "label1", "label2", "index1", "index2"}
    for key in batch:
        assert torch.equal(batch[key], torch.stack([item[key] for item in items])), key
    again = DigitPairs(images, labels, 100, seed=2)
    again.set_epoch(3)
    assert torch.equal(again.batch(indices)["index2"], batch["index2"])
    again.set_epoch(4)
    assert not torch.equal(again.batch(range(100))["index1"], pairs.batch(range(100))["index1"])


def test_digit_pairs_extremes_and_bad_arguments(rng: torch.Generator) -> None:
    images, labels = _labelled(rng, 12, 3)
    all_similar = DigitPairs(images, labels, 200, similar_fraction=1.0).batch(range(200))
    assert bool((all_similar["similar"] == 1).all())
    none_similar = DigitPairs(images, labels, 200, similar_fraction=0.0).batch(range(200))
    assert bool((none_similar["similar"] == 0).all())
    lonely = labels.clone()
    lonely[0] = 99
    with pytest.raises(ValueError, match="label.*99.*single image"):
        DigitPairs(images, lonely, similar_fraction=0.5)
    DigitPairs(images, lonely)  # random pairs (the default) need no second image of a label
    DigitPairs(images, lonely, similar_fraction=0.0)  # fine: no similar pair needed
    with pytest.raises(ValueError, match="two labels"):
        DigitPairs(images, torch.zeros(12, dtype=torch.int64), similar_fraction=0.5)
    DigitPairs(images, torch.zeros(12, dtype=torch.int64), similar_fraction=1.0)
    with pytest.raises(TypeError, match="int64"):
        DigitPairs(images, labels.int())
    with pytest.raises(TypeError, match=r"shape \(12,\)"):
        DigitPairs(images, labels[:5])
    with pytest.raises(ValueError, match="similar_fraction"):
        DigitPairs(images, labels, similar_fraction=-0.1)
    with pytest.raises(ValueError, match="n_pairs"):
        DigitPairs(images, labels, -3)
