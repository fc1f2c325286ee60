"""FeatureExtractor: float32 features of the asked layers equal the backbone's, in any batching,
from tensors, data set items and iterables; bad inputs and options are refused clearly; the CUDA
options (half, channels_last) agree with float32."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")

from fastad.features import FeatureExtractor, backbone_from_network, load_backbone  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture
def resnet18(random_network):
    return backbone_from_network("resnet18", random_network("resnet18"))


def test_features_equal_the_backbone_and_are_float32_without_grad(resnet18):
    extractor = FeatureExtractor(resnet18, ["layer3", "layer1"])
    images = torch.rand(3, 3, 64, 48)
    features = extractor(images)
    assert list(features) == ["layer1", "layer3"]  # network order
    with torch.no_grad():
        expected = resnet18(images, ["layer1", "layer3"])
    for name, value in features.items():
        assert value.dtype == torch.float32 and not value.requires_grad and value.is_inference()
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    assert extractor.layer_info == {"layer1": (64, 4), "layer3": (256, 16)}


def test_default_layers_when_none_given(resnet18):
    assert FeatureExtractor(resnet18).layers == ["layer1", "layer2", "layer3"]


def test_early_stop_through_the_extractor(resnet18):
    calls = []
    handle = resnet18.stages["layer4"].register_forward_hook(lambda *args: calls.append(1))
    try:
        FeatureExtractor(resnet18, ["layer2"])(torch.rand(1, 3, 32, 32))
        assert calls == []
    finally:
        handle.remove()


def test_large_batches_are_split_without_changing_results(resnet18):
    images = torch.rand(5, 3, 32, 32)
    whole = FeatureExtractor(resnet18, ["layer2"], batch_size=8)(images)["layer2"]
    split = FeatureExtractor(resnet18, ["layer2"], batch_size=2)(images)["layer2"]
    assert split.shape == whole.shape == (5, 128, 4, 4)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


class _ItemDataset:
    """Map-style data set like fastad.data's: items are dicts, no __iter__."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        if index >= len(self.images):
            raise IndexError(index)
        return {"image": self.images[index], "label": 0}


def test_extract_groups_single_items_into_batches(resnet18):
    images = torch.rand(5, 3, 32, 32)
    extractor = FeatureExtractor(resnet18, ["layer1"], batch_size=2)
    expected = extractor(images)["layer1"]
    batches = list(extractor.extract(_ItemDataset(images), progress=False))
    assert [b["layer1"].shape[0] for b in batches] == [2, 2, 1]
    torch.testing.assert_close(torch.cat([b["layer1"] for b in batches]), expected, rtol=1e-5, atol=1e-5)


def test_extract_passes_batches_and_tuples_through(resnet18):
    images = torch.rand(4, 3, 32, 32)
    extractor = FeatureExtractor(resnet18, ["layer1"], batch_size=8)
    source = iter([images[:3], (images[3:], torch.zeros(1))])  # no len: unknown total
    batches = list(extractor.extract(source, progress=False))
    assert [b["layer1"].shape[0] for b in batches] == [3, 1]
    torch.testing.assert_close(
        torch.cat([b["layer1"] for b in batches]), extractor(images)["layer1"], rtol=1e-5, atol=1e-5
    )
    assert list(extractor.extract([], progress=False)) == []


def test_progress_bar_only_when_asked_or_on_a_terminal(resnet18, capsys):
    extractor = FeatureExtractor(resnet18, ["layer1"], batch_size=1)
    data = [torch.rand(1, 3, 32, 32) for _ in range(6)]
    list(extractor.extract(data))  # pytest's stderr is not a terminal: quiet
    assert capsys.readouterr().err == ""
    list(extractor.extract(data, progress=True))
    err = capsys.readouterr().err
    assert "6/6" in err and "features resnet18" in err


# ----------------------------------------------------------------------------------------------
# Bad inputs and options


def test_bad_images_are_refused_with_what_was_wrong(resnet18):
    extractor = FeatureExtractor(resnet18, ["layer1"])
    with pytest.raises(TypeError, match=r"uint8.*\[0, 1\].*255"):
        extractor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        extractor([[0.5]])
    with pytest.raises(ValueError, match="unsqueeze"):
        extractor(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        extractor(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\].*255"):
        extractor(torch.rand(1, 3, 32, 32) * 255)
    normalised = (torch.rand(1, 3, 32, 32) - 0.45) / 0.225
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extractor(normalised)
    with_nan = torch.rand(1, 3, 32, 32)
    with_nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        extractor(with_nan)
    with pytest.raises(ValueError, match="empty"):
        extractor(torch.rand(0, 3, 32, 32))
    with pytest.raises(TypeError, match="extractor directly"):
        list(extractor.extract(torch.rand(2, 3, 32, 32)))
    with pytest.raises(ValueError, match="'image'"):
        list(extractor.extract([{"picture": torch.rand(3, 32, 32)}]))


def test_extract_starts_a_new_batch_when_the_image_size_changes(resnet18):
    extractor = FeatureExtractor(resnet18, ["layer1"], batch_size=4)
    images = [torch.rand(3, 32, 32), torch.rand(3, 32, 32), torch.rand(3, 64, 48), torch.rand(3, 32, 32)]
    out = [f["layer1"] for f in extractor.extract(images)]
    assert [tuple(f.shape) for f in out] == [(2, 64, 8, 8), (1, 64, 16, 12), (1, 64, 8, 8)]
    torch.testing.assert_close(out[1], extractor(images[2][None])["layer1"])


def test_bad_options_are_refused(resnet18):
    with pytest.raises(ValueError) as caught:
        FeatureExtractor(resnet18, ["layer2", "layer9"])
    assert "layer9" in str(caught.value) and "layer1, layer2, layer3, layer4" in str(caught.value)
    with pytest.raises(ValueError, match="no layers"):
        FeatureExtractor(resnet18, [])
    with pytest.raises(ValueError, match="half=True needs a CUDA device"):
        FeatureExtractor(resnet18, ["layer1"], half=True)
    with pytest.raises(ValueError, match="batch_size"):
        FeatureExtractor(resnet18, ["layer1"], batch_size=0)
    with pytest.raises(TypeError, match="Backbone"):
        FeatureExtractor(torch.nn.Identity(), ["layer1"])
    with pytest.raises(ValueError, match="not a valid torch device"):
        FeatureExtractor(resnet18, ["layer1"], device="gpu:zero")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            FeatureExtractor(resnet18, ["layer1"], device="cuda")


def test_channels_last_on_cpu_gives_the_same_features(resnet18):
    images = torch.rand(2, 3, 32, 32)
    expected = FeatureExtractor(resnet18, ["layer2"])(images)["layer2"]
    backbone = load_backbone("resnet18", weights=None)
    backbone.load_state_dict(resnet18.state_dict())
    got = FeatureExtractor(backbone, ["layer2"], channels_last=True)(images)["layer2"]
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# CUDA options


@pytest.mark.skipif(not CUDA, reason="no CUDA device available")
@pytest.mark.parametrize("half, channels_last", [(True, False), (False, True), (True, True)])
def test_cuda_half_and_channels_last_agree_with_float32(half, channels_last):
    torch.manual_seed(0)
    reference = load_backbone("resnet18", weights=None)
    images = torch.rand(4, 3, 64, 64)
    expected = FeatureExtractor(reference, ["layer1", "layer3"])(images)  # float32 on the CPU
    backbone = load_backbone("resnet18", weights=None)
    backbone.load_state_dict(reference.state_dict())
    extractor = FeatureExtractor(backbone, ["layer1", "layer3"], device="cuda", half=half, channels_last=channels_last)
    got = extractor(images)
    for name, value in got.items():
        assert value.device.type == "cuda" and value.dtype == torch.float32 and value.is_contiguous()
        scale = expected[name].abs().max()
        error = (value.cpu() - expected[name]).abs().max() / scale
        assert error < (2e-2 if half else 5e-3), f"{name}: relative error {error:.2e}"
