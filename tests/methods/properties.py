"""Generated inputs for the methods' public API: ``fit`` and ``predict`` on empty, single-image,
mixed-size, wrongly typed and non-finite data either work (finite scores, maps at the input
size, each image's score independent of its batch) or raise one clear ValueError/TypeError.

Run in a worker process by tests/methods/test_generated_inputs.py (tests/isolation.py), on
EfficientNet-Lite0 (the one backbone whose weights install offline) at the images' own size, so
that every example costs a few tens of milliseconds.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastad.methods import get_method

from .. import hypothesis_profiles  # noqa: F401  (profiles in the worker process too)

METHODS = ["patchcore", "spade", "padim", "gaussian_ad", "mlfsc"]
# Small and quick, otherwise the defaults: the images' own size, every image fitted on.
OPTIONS = {"backbone": "efficientnet_lite0", "resize": None, "crop": None, "holdout": 0}
TRAIN_SIZE = 48
# MLF-SC's 8 x 8 patches after a 2-cell cut-off need 96 px; valid inputs here start at 17 px (2 cells).
EXTRA = {
    "mlfsc": {"patch_size": 2, "patch_stride": 1, "cutoff": 0, "n_atoms": 3, "n_nonzero": 2, "dictionary_steps": 4}
}
_FITTED: dict[str, object] = {}
TALLY: dict[str, int] = {}


def _count(outcome: str) -> None:
    TALLY[outcome] = TALLY.get(outcome, 0) + 1


def _fitted(method: str):
    if method not in _FITTED:
        train = torch.rand(6, 3, TRAIN_SIZE, TRAIN_SIZE, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
        _FITTED[method] = get_method(method)(**OPTIONS, **EXTRA.get(method, {})).fit(train)
    return _FITTED[method]


def _clear_error(exc: BaseException, context: str) -> None:
    assert isinstance(exc, (ValueError, TypeError)), f"{context}: {type(exc).__name__}: {exc}"
    message = str(exc)
    assert message and "\n" not in message and len(message) < 400, f"{context}: message {message!r}"


# Inputs that must be refused, and those that may work or be refused (a 1-pixel image may be too
# small for a backbone or the blur; mixed sizes fit where the method has no fixed grid).
MUST_RAISE = {"empty", "grey", "rgba", "uint8", "0-255", "negative", "nan", "inf", "numpy"}
FLAWS = sorted(MUST_RAISE) + ["tiny", "mixed-sizes"]


@st.composite
def image_inputs(draw, fixed_size: int | None = None):
    """What a user might pass: a batch tensor, one image, a list of images or a dict; most are
    valid, the others carry one flaw. ``fixed_size``: valid images have this size (PaDiM)."""
    flaw = draw(st.sampled_from(["none"] * len(FLAWS) + FLAWS))
    count = 0 if flaw == "empty" else draw(st.integers(2, 3) if flaw == "mixed-sizes" else st.integers(1, 5))
    size = st.just(fixed_size) if fixed_size else st.integers(17, 80)  # the blur needs more than 16 px
    if flaw == "tiny":
        size = st.integers(1, 16)
    first = (draw(size), draw(size))
    shapes = [first] + [
        first if flaw != "mixed-sizes" else (first[0] + 1 + i, first[1]) for i in range(max(0, count - 1))
    ]
    return dict(
        flaw=flaw,
        count=count,
        shapes=shapes,
        channels={"grey": 1, "rgba": 4}.get(flaw, 3),
        dtype=torch.uint8
        if flaw == "uint8"
        else draw(st.sampled_from([torch.float32] * 4 + [torch.float64, torch.float16])),
        values=flaw
        if flaw in ("0-255", "negative", "nan", "inf")
        else draw(st.sampled_from(["unit"] * 4 + ["zeros", "ones"])),
        container="numpy"
        if flaw == "numpy"
        else draw(st.sampled_from(["list"] if flaw == "mixed-sizes" else ["batch", "batch", "single", "list", "dict"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _make_images(spec: dict) -> tuple[object, list[torch.Tensor]]:
    """(what to pass, the (3, H, W) float images it holds when it is valid)."""
    gen = torch.Generator().manual_seed(spec["seed"])
    images = []
    for h, w in spec["shapes"][: spec["count"]]:
        t = torch.rand(spec["channels"], h, w, generator=gen, dtype=torch.float64)
        kind = spec["values"]
        if kind == "0-255":
            t = t * 255
        elif kind == "negative":
            t = t - 0.5
        elif kind == "zeros":
            t = torch.zeros_like(t)
        elif kind == "ones":
            t = torch.ones_like(t)
        elif kind in ("nan", "inf"):
            t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=gen))] = float(kind)
        images.append(t.to(spec["dtype"]) if spec["dtype"] != torch.uint8 else (t * 255).clamp(0, 255).to(torch.uint8))
    container = spec["container"]
    if container == "single":
        return (images[0] if images else torch.empty(spec["channels"], 0, 0)), images[:1]
    if container == "list":
        return images, images
    if container == "dict":
        return {"image": images[0] if images else torch.empty(0)}, images[:1]
    batch = (
        torch.stack(images)
        if images and len({tuple(i.shape) for i in images}) == 1
        else (torch.empty(0, spec["channels"], *spec["shapes"][0], dtype=spec["dtype"]) if not images else None)
    )
    if batch is None:  # mixed sizes cannot be one tensor: pass the list
        return images, images
    return (batch.numpy() if container == "numpy" else batch), images


# Fewer training images than a Gaussian needs: a clear refusal, not a flaw of the input.
MIN_FIT_IMAGES = {"padim": 2, "gaussian_ad": 3}


def _must_raise(spec: dict) -> bool:
    return spec["flaw"] in MUST_RAISE


def _may_raise(spec: dict, method: str, fitting: bool, n_images: int) -> bool:
    """Whether a refusal is allowed: a flawed input, or a fit on too few images for the method,
    or on identical constant images, whose covariance no shrinkage makes invertible."""
    if spec["flaw"] != "none":
        return True
    if not fitting:
        return False
    return n_images < MIN_FIT_IMAGES.get(method, 1) or (method == "gaussian_ad" and spec["values"] != "unit")


def run_predict_case(method: str, spec: dict) -> None:
    model = _fitted(method)
    passed, images = _make_images(spec)
    context = f"{method}.predict({spec})"
    try:
        pred = model.predict(passed)
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions
        _clear_error(exc, context)
        assert _may_raise(spec, method, False, len(images)), f"{context}: a valid input was refused: {exc}"
        _count("raised")
        return
    assert not _must_raise(spec), f"{context}: accepted an invalid input"
    n = len(images)
    assert pred.scores.shape == (n,) and pred.scores.dtype == torch.float32, context
    assert bool(torch.isfinite(pred.scores).all()), f"{context}: non-finite scores {pred.scores}"
    if pred.maps is not None:
        h, w = images[0].shape[-2:]
        assert pred.maps.shape == (n, h, w) and bool(torch.isfinite(pred.maps).all()), context
    # An image's score does not depend on the images scored with it: the others replaced by their
    # complements (1 - x), in a batch of the same size and type. Not the image alone: oneDNN rounds by batch
    # size, and a rounding of 1e-7 can flip a near-tie (an OMP support, a nearest neighbour) and
    # so move a score by far more than any tolerance a real dependence would hide behind. (At one
    # batch size the scores agreed to the bit in about 3,700 generated cases on Zen 4.)
    if n > 1:
        others = [1 - image for image in images[:-1]]
        swapped = torch.stack([*others, passed[-1]]) if isinstance(passed, torch.Tensor) else [*others, images[-1]]
        again = model.predict(swapped).scores
        torch.testing.assert_close(pred.scores[-1:], again[-1:], rtol=1e-5, atol=1e-6, msg=context)
    _count("scored")


def check_predict(method: str) -> dict[str, int]:
    TALLY.clear()
    fixed = TRAIN_SIZE if method == "padim" else None  # one Gaussian per position of a fixed grid
    runs = min(settings.default.max_examples, 300)  # ~0.1 s each: the long run stays under an hour
    given(spec=image_inputs(fixed))(settings(max_examples=runs)(lambda spec: run_predict_case(method, spec)))()
    return dict(TALLY)


def run_fit_case(method: str, spec: dict) -> None:
    passed, images = _make_images(spec)
    context = f"{method}.fit({spec})"
    try:
        model = get_method(method)(**OPTIONS, **EXTRA.get(method, {})).fit(passed)
    except Exception as exc:  # noqa: BLE001
        _clear_error(exc, context)
        assert _may_raise(spec, method, True, len(images)), f"{context}: a valid input was refused: {exc}"
        _count("raised")
        return
    assert not _must_raise(spec), f"{context}: fitted on an invalid input"
    probe = images[0].float().unsqueeze(0)
    try:
        pred = model.predict(probe)
    except Exception as exc:  # noqa: BLE001 - e.g. an image too small for the blur: clear, not a crash
        _clear_error(exc, context + " then predict")
        assert spec["flaw"] in ("tiny", "mixed-sizes"), f"{context}: predict after fit refused a valid image: {exc}"
        _count("fitted, predict raised")
        return
    assert bool(torch.isfinite(pred.scores).all()), f"{context}: non-finite score after fit"
    _count("fitted")


def check_fit(method: str) -> dict[str, int]:
    TALLY.clear()
    # A fit costs ~0.1-1 s: a fifth of the profile's examples, at most 60.
    runs = max(5, min(settings.default.max_examples // 5, 60))
    given(spec=image_inputs())(settings(max_examples=runs)(lambda spec: run_fit_case(method, spec)))()
    return dict(TALLY)
