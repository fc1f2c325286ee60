"""Model files that are consistent (checksum recomputed over the edit) but wrong: a learned tensor
whose shape, dtype or values do not fit the parameters or the other tensors, or a parameter that
no longer fits the tensors. Loading refuses them, naming the attribute (each method's
``_check_state``), instead of returning a model that crashes or misleads at predict; every file
``fit`` writes still loads and predicts as before. Also the Siamese detector's header entries."""

from __future__ import annotations

import pytest
import torch

from fastad.io import ModelFileError, load_model_file, save_model_file
from fastad.methods import MLFSC, SPADE, AnomalyModel, GaussianAD, PaDiM, PatchCore

from ..conftest import require_lite0
from ..toy_method import ToyMean

require_lite0()

OPTIONS = {"backbone": "efficientnet_lite0", "resize": None, "crop": None, "holdout": 0}
METHODS = {"patchcore": PatchCore, "spade": SPADE, "padim": PaDiM, "gaussian_ad": GaussianAD, "mlfsc": MLFSC}
# MLF-SC's 8 x 8 patches need a 12-cell grid; these 48-px images give 6 cells at stride 8.
EXTRA = {"mlfsc": {"patch_size": 4, "patch_stride": 1, "cutoff": 1, "dictionary_steps": 4}}
WRITTEN_BY_SAVE = ("format", "format_version", "digest")  # save_model_file adds these itself


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fitted(images, tmp_path_factory):
    """``fitted(name)``: (model, path of its file) for a method fitted once on ``images``, or the
    toy method (no backbone) for "toy-mean"."""
    folder = tmp_path_factory.mktemp("models")
    cache = {}

    def get(name: str):
        if name not in cache:
            model = (
                ToyMean(pool=8, holdout=0) if name == "toy-mean" else METHODS[name](**OPTIONS, **EXTRA.get(name, {}))
            )
            model.fit(images)
            cache[name] = model, model.save(folder / f"{name}.safetensors")
        return cache[name]

    return get


def forge(src, dst, edit):
    """``src`` with ``edit(tensors, header)`` applied and written by fastad's own writer, so that
    the checksum matches the edited content."""
    tensors, header = load_model_file(src)
    for key in WRITTEN_BY_SAVE:
        header.pop(key)
    edit(tensors, header)
    return save_model_file(dst, tensors, header)


def tensor(name, change):
    def edit(tensors, header):
        tensors[name] = change(tensors[name])

    return edit


def params(**changes):
    def edit(tensors, header):
        header["params"].update(changes)

    return edit


def state(**changes):
    def edit(tensors, header):
        header["state"].update(changes)

    return edit


def drop(name):
    def edit(tensors, header):
        del tensors[name]

    return edit


def with_nan(t):
    t = t.clone()
    t.view(-1)[t.numel() // 2] = float("nan")
    return t


def zero_diagonal(t):
    t = t.clone()
    t[0].diagonal().zero_()
    return t


FORGED = [
    # PatchCore: bank_ (K, min(feature channels, embed_dim)) in bank_dtype, K <= n_patches_.
    ("patchcore", "bank-narrower", tensor("bank_", lambda t: t[:, :-1].contiguous()), "bank_"),
    ("patchcore", "bank-float64", tensor("bank_", lambda t: t.double()), "bank_"),
    ("patchcore", "bank-flat", tensor("bank_", lambda t: t.flatten()), "bank_"),
    ("patchcore", "bank-nan", tensor("bank_", with_nan), "bank_"),
    ("patchcore", "embed-dim", params(embed_dim=64), "bank_"),
    ("patchcore", "fewer-patches", state(n_patches_=1), "n_patches_"),
    ("patchcore", "negative-radius", state(coreset_radius_=-1.0), "coreset_radius_"),
    ("patchcore", "no-bank", drop("bank_"), "bank_"),
    # SPADE: pooled_ (N, C_image) float32, features_ {map layer: (N, C, h, w)} in bank_dtype.
    ("spade", "layer-narrower", tensor("features_.block2", lambda t: t[:, :-1].contiguous()), "features_['block2']"),
    ("spade", "layer-float16", tensor("features_.block1", lambda t: t.half()), "features_['block1']"),
    ("spade", "layer-3d", tensor("features_.block4", lambda t: t[0].contiguous()), "features_['block4']"),
    ("spade", "pooled-fewer-rows", tensor("pooled_", lambda t: t[:-1].contiguous()), "pooled_"),
    ("spade", "pooled-inf", tensor("pooled_", lambda t: t.clone().fill_(float("inf"))), "pooled_"),
    ("spade", "layer-missing", drop("features_.block4"), "features_"),
    ("spade", "layers-param", params(layers=["block1", "block2"]), "features_"),
    ("spade", "image-count", state(n_train_images_=3), "pooled_"),
    # PaDiM: channels_ (D,) increasing int64, mean_ (P, D), precision_factor_ (P, D, D), P = h * w.
    ("padim", "mean-float64", tensor("mean_", lambda t: t.double()), "mean_"),
    (
        "padim",
        "factor-narrower",
        tensor("precision_factor_", lambda t: t[:, :-1, :-1].contiguous()),
        "precision_factor_",
    ),
    ("padim", "factor-not-cholesky", tensor("precision_factor_", zero_diagonal), "precision_factor_"),
    ("padim", "channels-float", tensor("channels_", lambda t: t.float()), "channels_"),
    ("padim", "channels-out-of-range", tensor("channels_", lambda t: t + 1000), "channels_"),
    ("padim", "channels-reversed", tensor("channels_", lambda t: t.flip(0).contiguous()), "channels_"),
    ("padim", "grid", state(grid_=[6, 6]), "mean_"),
    ("padim", "grid-text", state(grid_="12x12"), "grid_"),
    # Gaussian AD: mean_ {level: (1, C)}, precision_factor_ {level: (1, C, C)}, shrinkage_ in [0, 1].
    ("gaussian_ad", "level-missing", drop("mean_.head"), "mean_"),
    (
        "gaussian_ad",
        "factor-wrong-shape",
        tensor("precision_factor_.stem", lambda t: t[0].contiguous()),
        "precision_factor_['stem']",
    ),
    ("gaussian_ad", "mean-float16", tensor("mean_.block0", lambda t: t.half()), "mean_['block0']"),
    ("gaussian_ad", "factor-nan", tensor("precision_factor_.block3", with_nan), "precision_factor_['block3']"),
    ("gaussian_ad", "shrinkage", state(shrinkage_={"stem": 2.0}), "shrinkage_"),
    ("gaussian_ad", "layers-param", params(layers=["head"]), "mean_"),
    # MLF-SC: dictionary_ (C, n_atoms, patch_size**2) float32 of unit-norm atoms.
    ("mlfsc", "fewer-atoms", tensor("dictionary_", lambda t: t[:, :-1].contiguous()), "dictionary_"),
    ("mlfsc", "bfloat16", tensor("dictionary_", lambda t: t.bfloat16()), "dictionary_"),
    ("mlfsc", "not-unit-norm", tensor("dictionary_", lambda t: t * 2), "dictionary_"),
    ("mlfsc", "n-atoms-param", params(n_atoms=4), "dictionary_"),
    ("mlfsc", "patch-size-param", params(patch_size=6), "dictionary_"),
    # The toy method of the shared tests: its own parameters and state.
    ("toy-mean", "pool", params(pool=0), "pool"),
    ("toy-mean", "image-score", params(image_score="median"), "image_score"),
    ("toy-mean", "mean-shape", tensor("mean_", lambda t: t[:2].contiguous()), "mean_"),
    ("toy-mean", "spread-text", state(spread_="wide"), "spread_"),
]


@pytest.mark.parametrize("method, edit, named", [pytest.param(m, e, n, id=f"{m}-{i}") for m, i, e, n in FORGED])
def test_consistent_but_wrong_files_are_refused_naming_the_attribute(fitted, tmp_path, method, edit, named):
    _, good = fitted(method)
    path = forge(good, tmp_path / "forged.safetensors", edit)
    load_model_file(path)  # the checksum is right: the content itself must be checked
    with pytest.raises(ModelFileError) as info:
        AnomalyModel.load(path)
    message = str(info.value)
    assert str(path) in message, message
    reason = message.replace(str(path), "")
    assert named in reason and "checksum" not in reason, message


@pytest.mark.parametrize("method", [*METHODS, "toy-mean"])
def test_an_unedited_round_trip_loads_and_predicts_the_same(fitted, images, tmp_path, method):
    model, good = fitted(method)
    assert type(AnomalyModel.load(good)) is type(model)
    # Rewritten as the forged files are, unedited: only the edits can make those fail.
    loaded = AnomalyModel.load(forge(good, tmp_path / "rewritten.safetensors", lambda tensors, header: None))
    assert type(loaded) is type(model)
    want, got = model.predict(images), loaded.predict(images)
    assert torch.equal(got.scores, want.scores)
    assert (got.maps is None) == (want.maps is None)
    if want.maps is not None:
        assert torch.equal(got.maps, want.maps)


@pytest.mark.parametrize(
    "method,change",
    [("patchcore", {"bank_dtype": "float16"}), ("spade", {"bank_dtype": "bfloat16"}), ("padim", {"n_features": 7})],
)
def test_parameters_changed_after_fit_still_save_and_load(fitted, images, tmp_path, method, change):
    """set_params after fit changes a parameter, not the learned state (the bank keeps its dtype,
    PaDiM its channel subset): the file a user saves then must load, and score as before."""
    model, good = fitted(method)
    changed = AnomalyModel.load(good).set_params(**change)
    loaded = AnomalyModel.load(changed.save(tmp_path / "changed.safetensors"))
    assert loaded.get_params() == changed.get_params()
    assert torch.equal(loaded.predict(images).scores, model.predict(images).scores)


def test_spade_map_layers_out_of_name_order_load_and_predict(images, tmp_path):
    """A model file gives a dict's tensors in name order ("block1" before "stem"), not in the
    network order of the map layers; the loaded model must score all the same."""
    model = SPADE(layers=["stem", "block1"], **OPTIONS).fit(images)
    loaded = AnomalyModel.load(model.save(tmp_path / "spade.safetensors"))
    want, got = model.predict(images), loaded.predict(images)
    assert torch.equal(got.scores, want.scores) and torch.equal(got.maps, want.maps)


# ----------------------------------------------------------------------------------------------
# The Siamese detector's header: the training history and record are read into objects too


@pytest.fixture(scope="module")
def siamese_file(tmp_path_factory):
    from fastad.siamese import SiameseDetector
    from fastad.siamese.pairs import RectanglePairs

    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    detector = SiameseDetector(channels=(4, 8, 8, 8, 16), embed_dim=8, hidden=8, batch_size=64, epochs=1, seed=0)
    detector.train(RectanglePairs(images, seed=0), training_info={"data": "random"})
    return detector.save(tmp_path_factory.mktemp("siamese") / "siamese.safetensors")


@pytest.mark.parametrize(
    "entry, value",
    [
        ("history", "not a dict"),
        ("history", [1.0, 2.0]),
        ("history", {"train_loss": "abc"}),
        ("history", {"train_loss": 3}),
        ("history", {"seconds": [1]}),
        ("training", [1, 2]),
        ("training", "data"),
    ],
)
def test_siamese_malformed_history_or_training_is_refused(siamese_file, tmp_path, entry, value):
    from fastad.siamese import SiameseDetector

    assert SiameseDetector.load(siamese_file).training_info_ == {"data": "random"}

    def edit(tensors, header):
        header[entry] = value

    path = forge(siamese_file, tmp_path / "forged.safetensors", edit)
    with pytest.raises(ModelFileError) as info:
        SiameseDetector.load(path)
    message = str(info.value)
    assert str(path) in message and f"'{entry}' entry is malformed" in message.replace(str(path), ""), message
