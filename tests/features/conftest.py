"""Shared fixtures of the feature tests: randomly initialised networks, built once per session
(wide_resnet50_2 and the VGGs take about a second each to initialise on two cores), and an empty
weights cache so no test can pick up files that happen to be on the machine."""

from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture(scope="session")
def random_network():
    """``random_network(name)``: torchvision/timm network of backbone ``name`` with random weights
    and random BatchNorm statistics (so a loader that skipped buffers would be caught), cached."""
    pytest.importorskip("torchvision")
    from fastad.features import build_network

    cache: dict[str, torch.nn.Module] = {}

    def make(name: str) -> torch.nn.Module:
        if name not in cache:
            torch.manual_seed(zlib.crc32(name.encode()))  # by name: the same weights whichever tests ran first
            network = build_network(name, weights=None)
            for module in network.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 2.0)
            cache[name] = network
        return cache[name]

    return make


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Points the torch hub and Hugging Face caches at empty folders under ``tmp_path``; returns
    (torch hub checkpoints folder, Hugging Face hub cache folder)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # what torch.hub.set_dir sets; None: use TORCH_HOME
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints", tmp_path / "hf" / "hub"
