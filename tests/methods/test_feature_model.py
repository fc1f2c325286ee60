"""FeatureModel, the base of the backbone methods: layers by stride, the paper's input size, the
cached extractor, and the weights' identity carried in model files."""

from __future__ import annotations

import pytest
import torch

from fastad.features import FeatureExtractor, load_backbone
from fastad.methods import AnomalyModel, register_method
from fastad.methods.feature_model import FeatureModel

from ..conftest import require_lite0

require_lite0()


@register_method("toy-features")
class ToyFeatures(FeatureModel):
    """Distance of each position's features to the training mean feature of its layer."""

    default_strides = (8,)

    def _fit_batches(self, batches) -> None:
        layer = self.feature_layers()[0]
        sums = [self._features(b)[layer].mean(dim=(2, 3)).sum(0) for b in batches]
        self.centre_ = torch.stack(sums).sum(0)

    def _score_batch(self, images):
        f = self._features(images)[self.feature_layers()[0]]
        return (f - self.centre_[:, None, None]).norm(dim=1), None


def lite0(**kw):
    return ToyFeatures(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0, **kw)


def test_layers_follow_the_strides_on_every_backbone():
    assert lite0().feature_layers() == ["block2"]
    assert ToyFeatures(backbone="wide_resnet50_2").feature_layers() == ["layer2"]
    assert lite0(layers=["block4", "block2", "block2"]).feature_layers() == ["block2", "block4"]
    with pytest.raises(ValueError, match="not all layers of 'efficientnet_lite0'"):
        lite0(layers=["layer3"]).feature_layers()
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        ToyFeatures(backbone="nope").fit(torch.rand(2, 3, 32, 32))


def test_features_equal_a_directly_built_extractor(rng):
    x = torch.rand(3, 3, 64, 64, generator=rng)
    model = lite0().fit(x)
    direct = FeatureExtractor(load_backbone("efficientnet_lite0"), ["block2"])(x)["block2"]
    # channels_last (the default) sums the convolutions in another order: float32 rounding only.
    torch.testing.assert_close(model._features(x)["block2"], direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.centre_, direct.mean(dim=(2, 3)).sum(0), rtol=1e-4, atol=1e-4)


def test_the_extractor_is_cached_and_rebuilt_when_its_key_changes(rng):
    x = torch.rand(2, 3, 64, 64, generator=rng)
    model = lite0().fit(x)
    first = model._extractor()
    assert model._extractor() is first
    model.layers = ["block4"]
    assert model._extractor() is not first and model._extractor().layers == ["block4"]
    again = model._extractor()
    model.to("cpu")
    assert model._extractor() is not again  # to() drops device-bound helpers


def test_transform_is_the_papers_resize_and_crop():
    t = ToyFeatures(backbone="efficientnet_lite0").transform()
    item = t({"image": torch.rand(3, 300, 400), "mask": torch.zeros(300, 400, dtype=torch.bool)})
    assert item["image"].shape == (3, 224, 224) and item["mask"].shape == (224, 224)
    assert lite0().transform() is None


def test_model_file_records_the_backbone_and_refuses_other_weights(rng, tmp_path):
    x = torch.rand(2, 3, 64, 64, generator=rng)
    model = lite0().fit(x)
    path = model.save(tmp_path / "m.safetensors")
    from fastad import io as model_io

    _, header = model_io.load_model_file(path)
    assert header["backbone"] == "efficientnet_lite0" and header["layers"] == ["block2"]
    assert len(header["backbone_weights"]["sha256"]) == 64
    # The digest is of the weights as published, before the model folds its batch norms.
    from fastad.features import load_backbone

    published = load_backbone("efficientnet_lite0", "imagenet").stages.state_dict()
    assert header["backbone_weights"]["sha256"] == model_io.tensor_digest(published)
    loaded = AnomalyModel.load(path)
    torch.testing.assert_close(loaded.predict(x).scores, model.predict(x).scores)

    from fastad.features import build_network

    other = tmp_path / "other.pth"
    torch.manual_seed(0)
    torch.save(build_network("efficientnet_lite0", weights=None).state_dict(), other)
    loaded.weights = str(other)
    with pytest.raises(ValueError, match="weights found now .* differ"):
        loaded.predict(x)
