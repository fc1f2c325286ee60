"""The contract every registered method keeps, run over all of them (the per-method test files
test what is particular to each): fit returns the model and sets its learned state; parameters
round-trip through the constructor; a saved and loaded model predicts identically; a re-fit
forgets the old fit, and a failed one leaves no half-old model; a defect scores above the same
image without it; bad input raises a ValueError naming what was wrong, and predicting before
fitting a RuntimeError.

Each method runs on EfficientNet-Lite0 (the one backbone whose weights install offline) at the
images' own size. A method registered without an entry in ``OPTIONS`` fails the suite: give it
one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastad.methods as methods
from fastad.methods import AnomalyModel, available_methods, get_method

from ..conftest import require_lite0

require_lite0()

COMMON = {"backbone": "efficientnet_lite0", "resize": None, "crop": None, "holdout": 0}
OPTIONS = {
    "patchcore": {},
    "spade": {"k_images": 2},
    "padim": {"n_features": 24},
    "gaussian_ad": {},
    # MLF-SC's 8 x 8 patches need more cells than 64 px give at stride 8.
    "mlfsc": {"patch_size": 4, "patch_stride": 1, "cutoff": 1, "dictionary_steps": 4},
}
SIZE = 64


def _library_methods() -> list[str]:
    """The methods fastad itself registers (tests may register toys of their own)."""
    return sorted(name for name in available_methods() if get_method(name).__module__.startswith(methods.__name__))


def _texture(n: int, seed: int) -> torch.Tensor:
    """The normal class, (n, 3, SIZE, SIZE) in [0, 1]: one smooth texture, each image with its own
    fine noise."""
    coarse = torch.rand(1, 3, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    base = 0.25 + 0.5 * F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    noise = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1)) - 0.5
    return (base + 0.05 * noise).clamp(0, 1)


def _model(name: str) -> AnomalyModel:
    return get_method(name)(**COMMON, **OPTIONS[name])


@pytest.fixture(scope="module")
def fitted():
    cache: dict[str, AnomalyModel] = {}

    def get(name: str) -> AnomalyModel:
        if name not in cache:
            cache[name] = _model(name).fit(_texture(8, 0))
        return cache[name]

    return get


def test_every_registered_method_is_in_the_contract():
    assert set(_library_methods()) == set(OPTIONS), "give a new method its OPTIONS entry"


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_fit_returns_the_model_with_its_learned_state(name, fitted):
    model = _model(name)
    assert model.fit(_texture(4, 1)) is model
    assert model.n_train_images_ == 4 and model._learned_attributes()
    assert model.method_name == name and isinstance(fitted(name), get_method(name))


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_parameters_round_trip_through_the_constructor(name):
    model = _model(name)
    params = model.get_params()
    assert type(model)(**params).get_params() == params
    assert model.set_params(**params) is model and model.get_params() == params
    with pytest.raises(ValueError, match="has no parameter 'no_such_parameter'"):
        model.set_params(no_such_parameter=1)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_saved_and_loaded_model_predicts_identically(name, fitted, tmp_path):
    model, test = fitted(name), _texture(3, 2)
    loaded = AnomalyModel.load(model.save(tmp_path / f"{name}.safetensors"))
    assert type(loaded) is type(model) and loaded.get_params() == model.get_params()
    want, got = model.predict(test), loaded.predict(test)
    assert torch.equal(got.scores, want.scores) and got.threshold == want.threshold
    assert (got.maps is None) == (want.maps is None)
    if want.maps is not None:
        assert torch.equal(got.maps, want.maps)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_refit_forgets_the_old_fit(name):
    first, second, test = _texture(6, 3).flip(-1), _texture(6, 4), _texture(2, 5)
    refitted = _model(name).fit(first).fit(second)
    fresh = _model(name).fit(second)
    assert torch.equal(refitted.predict(test).scores, fresh.predict(test).scores)
    # A re-fit that fails leaves no model that looks fitted (no mix of the old and the new).
    broken = second.clone()
    broken[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError):
        refitted.fit(broken)
    with pytest.raises(RuntimeError, match="not fitted yet"):
        refitted.predict(test)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_defect_scores_above_the_same_image_without_it(name, fitted):
    model = fitted(name)
    normal = _texture(4, 6)
    defective = normal.clone()
    defective[:, :, 20:40, 24:44] = torch.tensor([0.05, 0.95, 0.05])[:, None, None]  # a green patch
    scores_normal, scores_defective = model.predict(normal).scores, model.predict(defective).scores
    assert bool((scores_defective > scores_normal).all()), (scores_normal, scores_defective)
    maps = model.predict(defective).maps
    if maps is not None:  # the map is highest where the defect is
        inside = maps[:, 20:40, 24:44].amax(dim=(1, 2))
        outside = maps.clone()
        outside[:, 16:44, 20:48] = -float("inf")
        assert bool((inside > outside.amax(dim=(1, 2))).all())


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_bad_input_is_refused_by_name(name, fitted):
    model = fitted(name)
    test = _texture(2, 7)
    nan = test.clone()
    nan[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN|finite"):
        model.predict(nan)
    with pytest.raises(ValueError, match="3"):
        model.predict(test[:, :1])  # one channel
    with pytest.raises((ValueError, TypeError), match="dtype|float|uint8"):
        model.predict(test.to(torch.int32))
    with pytest.raises(RuntimeError, match="not fitted yet"):
        _model(name).predict(test)
