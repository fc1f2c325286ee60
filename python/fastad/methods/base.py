"""The base class every anomaly-detection method derives from, and the registry of methods.

A method is only its own step. It implements two hooks:

* ``_fit_batches(batches)``: consume an iterator of normal-image batches (float32 (B, 3, H, W) in
  [0, 1], already on ``self.device``) and set the learned state, in attributes ending in ``_``;
* ``_score_batch(images)``: return a patch-level anomaly map (B, h, w) and, when the method defines
  its own image score (PatchCore's reweighting, SPADE's image kNN), the image scores (B,), else None.

Everything else is shared here: accepting data sets, DataLoaders and tensors, streaming, the input
checks, upsampling and blurring the maps (``postprocess``), a decision threshold from held-back
normal images, model files (``fastad.io``) and parameters in the scikit-learn manner (the
constructor stores them, ``get_params`` reads them back, learned state ends in ``_``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import io as model_io
from .._checks import check_device, check_image_batch

# ----------------------------------------------------------------------------------------------
# Registry


_REGISTRY: dict[str, type[AnomalyModel]] = {}


def register_method(name: str):
    """Class decorator: makes a method available by ``name`` (CLI, model files, ``get_method``)."""

    def decorate(cls: type[AnomalyModel]) -> type[AnomalyModel]:
        if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)):
            raise TypeError(f"@register_method({name!r}) needs an AnomalyModel subclass, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"a method named {name!r} is already registered ({known.__qualname__})")
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_method(name: str) -> type[AnomalyModel]:
    """The method class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods()) or 'none'}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


# ----------------------------------------------------------------------------------------------
# Inputs


def check_images(images: Any, what: str = "images") -> torch.Tensor:
    """A batch (B, 3, H, W), or one image (3, H, W) made a batch of one, checked as every image
    entering fastad is (``fastad._checks``)."""
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        images = images.unsqueeze(0)
    return check_image_batch(images, what)


def _is_dataset(data: Any) -> bool:
    return hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (torch.Tensor, list, tuple, dict))


def _batch_images(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images (and labels, when given) of one element of a DataLoader or iterable."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"a batch dict must hold 'image', got keys {sorted(batch)}")
        labels = batch.get("label")
        return batch["image"], torch.as_tensor(labels) if labels is not None else None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], None
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(f"cannot read images from a batch of type {type(batch).__name__}")


def iter_image_batches(data: Any, batch_size: int, *, normal_only: bool = False) -> Iterator[torch.Tensor]:
    """Streams ``data`` as checked image batches (B, 3, H, W).

    ``data`` is an image tensor (N, 3, H, W) or (3, H, W), a map-style data set whose items are
    dicts with ``image`` (fastad.data) or tensors, or any iterable of batches (a DataLoader): a
    tensor, a dict with ``image`` or a tuple whose first element is the images. With
    ``normal_only`` an item labelled anomalous is an error (fitting must see normal images only).
    """
    if isinstance(data, dict):  # one item or one batch, e.g. test_set[0]
        data = check_images(_batch_images(data)[0])
    if isinstance(data, torch.Tensor):
        images = check_images(data)
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    if _is_dataset(data):
        from torch.utils.data import DataLoader

        if len(data) == 0:
            raise ValueError("the data set is empty")
        data = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    elif not isinstance(data, Iterable):
        raise TypeError(f"expected images, a data set or a DataLoader, got {type(data).__name__}")
    seen = 0
    for batch in data:
        images, labels = _batch_images(batch)
        if normal_only and labels is not None and bool((labels != 0).any()):
            raise ValueError("fit expects normal images only, but the data holds images labelled anomalous")
        seen += 1
        yield check_images(images)
    if seen == 0:
        raise ValueError("the data yielded no images")


# ----------------------------------------------------------------------------------------------
# The base class


@dataclass
class Prediction:
    """What ``predict`` returns. ``scores`` (N,) and ``maps`` (N, H, W) at the input resolution,
    float32, higher = more anomalous; ``threshold`` the model's decision threshold (None when it
    has none)."""

    scores: torch.Tensor
    maps: torch.Tensor
    threshold: float | None = None

    @property
    def is_anomalous(self) -> torch.Tensor | None:
        return None if self.threshold is None else self.scores > self.threshold


class AnomalyModel:
    """Base class of the methods; see the module docstring for the two hooks a method writes."""

    method_name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        upsample_mode: str = "bilinear",
        blur_sigma: float = 4.0,
        holdout: float = 0.1,
        threshold_quantile: float = 0.99,
    ) -> None:
        self.device = device
        self.batch_size = batch_size
        self.upsample_mode = upsample_mode
        self.blur_sigma = blur_sigma
        self.holdout = holdout
        self.threshold_quantile = threshold_quantile

    # -- hooks ---------------------------------------------------------------------------------

    def _fit_batches(self, batches: Iterator[torch.Tensor]) -> None:
        raise NotImplementedError

    def _score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def transform(self):
        """The preprocessing a data set needs before fit/evaluate (e.g. resize and crop), as a
        ``fastad.data`` transform, or None. Methods with a fixed input size override this."""
        return None

    # -- parameters ----------------------------------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names:
                    names.append(p.name)
        return names

    def get_params(self) -> dict[str, Any]:
        """The constructor's parameters and their current values."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> AnomalyModel:
        valid = set(self._param_names())
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {name!r}; parameters: {', '.join(sorted(valid))}")
            setattr(self, name, value)
        return self

    def _check_params(self) -> None:
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not (0.0 <= float(self.holdout) <= 0.5):
            raise ValueError(f"holdout must be in [0, 0.5] (the share of training images held back), got {self.holdout!r}")
        if not (0.0 < float(self.threshold_quantile) <= 1.0):
            raise ValueError(f"threshold_quantile must be in (0, 1], got {self.threshold_quantile!r}")
        if float(self.blur_sigma) < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {self.blur_sigma!r}")
        self.device = str(check_device(self.device))

    # -- fit / predict ---------------------------------------------------------------------------

    def fit(self, data: Any) -> AnomalyModel:
        """Learns from normal images (tensor, data set or DataLoader), streaming; returns self.

        With ``holdout`` > 0, every round(1/holdout)-th image is held back from fitting and scored
        afterwards; ``threshold_`` is the ``threshold_quantile`` of those scores (None when too
        few images were held back). The threshold thus comes from normal images only.
        """
        self._check_params()
        for name in [n for n in vars(self) if n.endswith("_") and not n.startswith("_")]:
            delattr(self, name)  # a failed re-fit must not leave a half-old model that looks fitted
        held: list[torch.Tensor] = []
        period = round(1.0 / self.holdout) if self.holdout > 0 else 0
        counter = {"fit": 0, "seen": 0}

        def fit_batches() -> Iterator[torch.Tensor]:
            for images in iter_image_batches(data, self.batch_size, normal_only=True):
                first, count = counter["seen"], images.shape[0]
                counter["seen"] += count
                if period:
                    held_back = torch.arange(first, first + count) % period == period - 1
                    held.extend(images[held_back].cpu())
                    images = images[~held_back]
                if images.shape[0]:
                    counter["fit"] += images.shape[0]
                    yield images.to(self.device, torch.float32)

        self._fit_batches(fit_batches())
        if counter["fit"] == 0:
            raise ValueError("no images were left to fit on")
        self.n_train_images_ = counter["fit"]
        self.threshold_ = None
        if len(held) >= 2:
            scores = self.predict(torch.stack(held)).scores
            from ..postprocess import good_quantile_threshold

            self.threshold_ = float(good_quantile_threshold(scores, self.threshold_quantile))
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_train_images_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit(...) first")

    def predict(self, images: Any) -> Prediction:
        """Scores images (tensor (N, 3, H, W) / (3, H, W), data set or DataLoader) and returns
        :class:`Prediction` with maps at the input resolution."""
        from ..postprocess import anomaly_maps, image_scores

        self._check_fitted()
        scores, maps = [], []
        with torch.inference_mode():
            for batch in iter_image_batches(images, self.batch_size):
                batch = batch.to(self.device, torch.float32)
                patch_map, image_score = self._score_batch(batch)
                full = anomaly_maps(patch_map.float(), tuple(batch.shape[-2:]), mode=self.upsample_mode, sigma=self.blur_sigma)
                scores.append((image_score if image_score is not None else image_scores(full, "max")).float().cpu())
                maps.append(full.float().cpu())
        if len({m.shape[-2:] for m in maps}) > 1:
            raise ValueError("predict needs images of one size per call; resize them first (see transform())")
        return Prediction(scores=torch.cat(scores), maps=torch.cat(maps), threshold=getattr(self, "threshold_", None))

    # -- state and model files -----------------------------------------------------------------

    def _learned_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Learned attributes (ending in ``_``): tensors, and everything else (JSON values)."""
        tensors, values = {}, {}
        for name, value in vars(self).items():
            if not name.endswith("_") or name.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            else:
                values[name] = value
        return tensors, values

    def to(self, device: str) -> AnomalyModel:
        """Moves the learned tensors to ``device`` and makes it the device for later calls."""
        self.device = str(device)
        tensors, _ = self._learned_state()
        for name, t in tensors.items():
            setattr(self, name, t.to(device))
        return self

    def save(self, path: str | Path) -> Path:
        """Writes the model to ``path`` (safetensors + JSON header; atomic)."""
        import fastad

        self._check_fitted()
        tensors, values = self._learned_state()
        params = self.get_params()
        header = {
            "method": self.method_name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "params": params,
            "state": values,
            "backbone": params.get("backbone"),
            "layers": params.get("layers"),
            "fastad_version": fastad.__version__,
            "torch_version": torch.__version__,
        }
        return model_io.save_model_file(path, tensors, header)

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> AnomalyModel:
        """Reads a model file; ``AnomalyModel.load`` returns whichever method wrote it, a
        subclass's ``load`` insists on that subclass. ``device`` overrides the saved one."""
        tensors, header = model_io.load_model_file(path)
        name = header.get("method")
        try:
            klass = get_method(name)
        except ValueError as exc:
            raise model_io.ModelFileError(f"{path} holds a {name!r} model, which is not available here: {exc}") from None
        if cls is not AnomalyModel and not issubclass(klass, cls):
            raise model_io.ModelFileError(f"{path} holds a {name!r} model, not a {cls.__name__}")
        params = dict(header.get("params") or {})
        if device is not None:
            params["device"] = device
        unknown = set(params) - set(klass._param_names())
        if unknown:
            raise model_io.ModelFileError(
                f"{path} was written with parameters this {klass.__name__} does not have: {', '.join(sorted(unknown))}"
            )
        model = klass(**params)
        state = dict(header.get("state") or {}, **tensors)
        for name_, value in state.items():
            if not (name_.isidentifier() and name_.endswith("_") and not name_.startswith("_")):
                raise model_io.ModelFileError(f"{path}: {name_!r} is not a learned attribute name")
            setattr(model, name_, value)
        model._check_fitted()
        model._check_params()
        return model.to(model.device)

