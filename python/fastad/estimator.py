"""What every fastad model shares, whatever it learns from, and the registry that finds a model
file's class.

* Parameters in the scikit-learn manner: the constructor stores them, ``get_params`` reads them
  back (from the constructor's signature, so a subclass lists them once), ``set_params`` sets them.
* Learned state in attributes ending in ``_``; ``to`` moves its tensors and modules.
* ``threshold_``: the decision threshold on image scores, None when the model has none.
* The model file's header (method, class, parameters, versions) and :meth:`Estimator.load`,
  which returns whichever registered class wrote a file (:func:`load_model`).
* :meth:`Estimator._predict_items`: how ``fastad.evaluation.evaluate`` scores a group of data-set
  items, so that every model is evaluated and reported the same way.

Two families derive from it: ``fastad.methods.AnomalyModel`` (fitted on normal images: PatchCore,
SPADE, PaDiM, Gaussian AD, MLF-SC) and ``fastad.siamese.SiameseDetector`` (trained on template /
inspected pairs). Both return :class:`fastad.prediction.Prediction`.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import io as model_io
from ._batching import is_map_dataset
from .build import __version__
from .checks import check_device
from .prediction import Prediction

__all__ = ["Estimator", "load_model", "register_estimator", "registered_estimators"]

_REGISTRY: dict[str, type[Estimator]] = {}


def register_estimator(name: str):
    """Class decorator: ``name`` is how model files and the CLI name the class (its header's
    ``method``). ``fastad.register_method`` is this for methods fitted on normal images."""

    def decorate(cls: type[Estimator]) -> type[Estimator]:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise TypeError(f"registering {name!r} needs an Estimator subclass, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"a method named {name!r} is already registered ({known.__qualname__})")
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_estimators() -> dict[str, type[Estimator]]:
    """Every registered class by name (a copy)."""
    return dict(_REGISTRY)


def load_model(path: str | Path, *, device: str | None = None) -> Estimator:
    """The model a file holds, whichever registered class wrote it (an ``AnomalyModel`` method or
    a ``SiameseDetector``); ``device`` overrides the saved one."""
    return Estimator.load(path, device=device)


def is_tensor_dict(value: Any) -> bool:
    """Learned state held as a dict of tensors (saved as ``attr.key`` tensors): non-empty, every
    value a tensor."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


class Estimator:
    """Base of every fastad model; see the module docstring."""

    method_name: ClassVar[str] = ""
    # True for a model that scores an image against a template (items carry a "template").
    scores_pairs: ClassVar[bool] = False

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

    def set_params(self, **params: Any) -> Estimator:
        valid = set(self._param_names())
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"{type(self).__name__} has no parameter {name!r}; parameters: {', '.join(sorted(valid))}"
                )
            setattr(self, name, value)
        return self

    def _check_params(self) -> None:
        """Checks (and normalises) the parameters; a subclass extends it."""
        self.device = str(check_device(self.device))

    # -- learned state -------------------------------------------------------------------------

    def _learned_attributes(self) -> dict[str, Any]:
        return {name: value for name, value in vars(self).items() if name.endswith("_") and not name.startswith("_")}

    def _forget_learned(self) -> None:
        """Removes the learned state, so that a failed re-fit cannot leave a half-old model that
        looks fitted."""
        for name in self._learned_attributes():
            delattr(self, name)

    def _check_state(self) -> None:
        """Checks learned state read from a model file (ValueError or TypeError naming what is
        wrong): a file can be edited and its checksum recomputed. Subclasses extend it."""
        threshold = getattr(self, "threshold_", None)
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
        ):
            raise ValueError(f"threshold_ must be None or a finite number, got {threshold!r}")

    def to(self, device: str) -> Estimator:
        """Moves the learned tensors and modules (also tensors inside dicts) to ``device`` and
        makes it the device for later calls."""
        self.device = str(check_device(device))
        for name, value in self._learned_attributes().items():
            if isinstance(value, (torch.Tensor, torch.nn.Module)):
                setattr(self, name, value.to(self.device))
            elif is_tensor_dict(value):
                setattr(self, name, {key: t.to(self.device) for key, t in value.items()})
        self._moved_to(self.device)
        return self

    def _moved_to(self, device: str) -> None:
        """Hook for a model that caches device-bound helpers (a feature extractor)."""

    # -- evaluation ----------------------------------------------------------------------------

    def transform(self):
        """The preprocessing a data set needs before fit / evaluate (a ``fastad.data``
        transform), or None for models that take any size."""
        return None

    def _prepared(self, data: Any) -> Any:
        """``data`` with the model's transform applied, when it is a ``fastad.data`` data set
        that has none of its own."""
        transform = self.transform()
        if (
            transform is not None
            and is_map_dataset(data)
            and hasattr(data, "with_transform")
            and data.transform is None
        ):
            return data.with_transform(transform)
        return data

    def tile_geometry(self):
        """How this model's scores tile for ``fastad.highres.predict_large``; a model that does
        not score that way raises a ValueError saying what it offers instead."""
        raise ValueError(f"{type(self).__name__} does not score images tile by tile")

    def _split_state_names(self) -> tuple[str, ...]:
        """The learned attributes this process holds only its part of (a bank split across the
        processes of a group); empty when the model is whole, as it is by default."""
        return ()

    def _predict_items(self, items: list[dict[str, Any]]) -> tuple[torch.Tensor, Prediction]:
        """Scores a group of same-size data-set items (dicts as ``fastad.data`` gives them):
        the images to show in a report (N, C, H, W) and the prediction, one entry per item."""
        raise NotImplementedError

    # -- model files ---------------------------------------------------------------------------

    def _file_header(self) -> dict[str, Any]:
        """The header entries every model file has; a subclass adds its own."""
        registered = _REGISTRY.get(self.method_name)
        if registered is not type(self):
            raise TypeError(
                f"{type(self).__qualname__} is not a registered method, so a model file could not be loaded back; "
                "decorate the class with @fastad.register_method('name')"
            )
        return {
            "method": self.method_name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "params": self.get_params(),
            "fastad_version": __version__,
            "torch_version": torch.__version__,
        }

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> Estimator:
        """Reads a model file: the base classes (``Estimator``, ``AnomalyModel``) return whichever
        of their registered subclasses wrote it, a concrete class insists on itself. ``device``
        overrides the saved one."""
        tensors, header = model_io.load_model_file(path)
        name = header.get("method")
        klass = _REGISTRY.get(name) if isinstance(name, str) else None
        if klass is None:
            available = ", ".join(sorted(_REGISTRY)) or "none"
            raise model_io.ModelFileError(
                f"{path} holds a {name!r} model, which is not available here (available: {available})"
            )
        if not issubclass(klass, cls):
            raise model_io.ModelFileError(
                f"{path} holds a {name!r} model ({klass.__name__}), not a {cls.__name__}; "
                "fastad.load_model reads any model file"
            )
        return klass._from_file(path, tensors, header, device)

    @classmethod
    def _constructed(cls, path: str | Path, header: dict[str, Any], device: str | None) -> Estimator:
        """An instance with a file's parameters (``device`` overriding the saved one): what every
        ``_from_file`` starts with; ModelFileError when they cannot be this class's."""
        params = header.get("params") or {}
        if not isinstance(params, dict):  # an edited file whose checksum was recomputed
            raise model_io.ModelFileError(f"{path}: the header's 'params' entry is malformed ({params!r:.80})")
        params = dict(params)
        if device is not None:
            params["device"] = device
        unknown = set(params) - set(cls._param_names())
        if unknown:
            raise model_io.ModelFileError(
                f"{path} was written with parameters this {cls.__name__} does not have: {', '.join(sorted(unknown))}"
            )
        try:
            return cls(**params)
        except (TypeError, ValueError) as exc:
            raise model_io.ModelFileError(f"{path} does not hold a usable {cls.method_name!r} model: {exc}") from exc

    @classmethod
    def _from_file(
        cls, path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any], device: str | None
    ) -> Estimator:
        """The model in a file already read and checked against its digest (``cls`` is the
        class that wrote it); ModelFileError when its contents cannot be this model."""
        raise NotImplementedError
