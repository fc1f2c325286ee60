"""The base class of the methods fitted on normal images, and their registry (what every model
shares: ``fastad.estimator``; accepted inputs: ``inputs``; the result type: ``fastad.prediction``).

A method is only its own step. It implements two hooks:

* ``_fit_batches(batches)``: consume an iterator of normal-image batches (float32 (B, 3, H, W) in
  [0, 1], already on ``self.device``) and set the learned state, in attributes ending in ``_``;
* ``_score_batch(images)``: return a patch-level anomaly map (B, h, w) and, when the method defines
  its own image score (PatchCore's reweighting, SPADE's image kNN), the image scores (B,), else None.

Everything else is shared here: accepting data sets, DataLoaders and tensors, streaming, the input
checks, upsampling and blurring the maps (``postprocess``), a decision threshold from held-back
normal images, and model files (``fastad.io``) holding the learned state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import distributed
from .. import io as model_io
from .._batching import stack_images
from ..checks import check_choice, check_float, check_int
from ..estimator import Estimator, register_estimator, registered_estimators
from ..postprocess import UPSAMPLE_MODES, anomaly_maps, good_quantile_threshold, image_scores
from ..prediction import Prediction
from . import split_files
from .inputs import iter_image_batches, same_size_runs
from .learned_state import flatten_state, part_state, rebuild_state

# ----------------------------------------------------------------------------------------------
# Registry (one with SiameseDetector's: fastad.estimator)


def register_method(name: str):
    """Class decorator: makes a method fitted on normal images available by ``name`` (CLI, model
    files, ``get_method``)."""

    def decorate(cls: type[AnomalyModel]) -> type[AnomalyModel]:
        if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)):
            raise TypeError(f"@register_method({name!r}) needs an AnomalyModel subclass, got {cls!r}")
        return register_estimator(name)(cls)

    return decorate


def get_method(name: str) -> type[AnomalyModel]:
    """The method class registered as ``name``."""
    klass = registered_estimators().get(name)
    if klass is not None and not issubclass(klass, AnomalyModel):
        raise ValueError(
            f"{name!r} ({klass.__name__}) is not fitted on normal images; "
            f"available methods: {', '.join(available_methods())}"
        )
    if klass is None:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods()) or 'none'}")
    return klass


def available_methods() -> list[str]:
    """The registered methods fitted on normal images, by name."""
    return sorted(name for name, klass in registered_estimators().items() if issubclass(klass, AnomalyModel))


# ----------------------------------------------------------------------------------------------
# The base class


# At most this many training images are held back for the threshold: enough for its 0.99
# quantile, and their memory (kept until the end of fit) does not grow with the training set.
MAX_HELD_BACK = 256


class AnomalyModel(Estimator):
    """Base class of the methods; see the module docstring for the two hooks a method writes."""

    # Whether fit merges what the processes of a torch.distributed group learned (fastad.distributed).
    fits_across_processes: ClassVar[bool] = False
    # The same for fastad.highres.fit_large (native resolution, tile by tile).
    fits_tiled_across_processes: ClassVar[bool] = False

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

    def _score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def transform(self):
        """The preprocessing a data set needs before fit/evaluate (e.g. resize and crop), as a
        ``fastad.data`` transform, or None. Methods with a fixed input size override this.

        ``fit``, ``predict`` and ``evaluate`` apply it to ``fastad.data`` data sets that have no
        transform of their own; tensors and DataLoaders are taken as they are."""
        return None

    # -- parameters ----------------------------------------------------------------------------

    def _check_params(self) -> None:
        super()._check_params()
        check_int(self.batch_size, "batch_size")
        for name in ("holdout", "threshold_quantile", "blur_sigma"):
            check_float(getattr(self, name), name)
        check_choice(self.upsample_mode, "upsample_mode", UPSAMPLE_MODES)
        if not (0.0 <= float(self.holdout) <= 0.5):
            raise ValueError(
                f"holdout must be in [0, 0.5] (the share of training images held back), got {self.holdout!r}"
            )
        if not (0.0 < float(self.threshold_quantile) <= 1.0):
            raise ValueError(f"threshold_quantile must be in (0, 1], got {self.threshold_quantile!r}")
        if float(self.blur_sigma) < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {self.blur_sigma!r}")

    # -- fit / predict ---------------------------------------------------------------------------

    def fit(self, data: Any) -> AnomalyModel:
        """Learns from normal images (tensor, data set or DataLoader), streaming; returns self.

        With ``holdout`` > 0, every round(1/holdout)-th image is held back from fitting and scored
        afterwards, up to ``MAX_HELD_BACK`` images (later ones are all fitted on, so the held
        images' memory stays bounded however large the training set); ``threshold_`` is the
        ``threshold_quantile`` of those scores (None when too
        few images were held back). The threshold thus comes from normal images only; set
        ``holdout=0`` to fit on every image, as the papers do, and go without a threshold.
        """
        self._check_params()
        self._forget_learned()
        held: list[torch.Tensor] = []
        period = round(1.0 / self.holdout) if self.holdout > 0 else 0
        data, first_index = self._prepared(data), 0
        if distributed.is_distributed():
            reason = self._cannot_fit_across_processes()
            if reason:
                raise ValueError(reason)
            data, first_index, _ = distributed.shard_data(data)
        # Images are held back by their global index, so that every process holds back the images
        # one process would (the cap counts those held before this process's block).
        held_before = min(MAX_HELD_BACK, first_index // period) if period else 0
        # How many images the processes before this one fit on (a method that draws random
        # numbers image by image skips theirs, to draw what one process would).
        self.__dict__["_fitted_before"] = first_index - held_before
        counter = {"fit": 0, "seen": first_index}

        def fit_batches() -> Iterator[torch.Tensor]:
            for images in iter_image_batches(data, self.batch_size, normal_only=True):
                first, count = counter["seen"], images.shape[0]
                counter["seen"] += count
                if period and held_before + len(held) < MAX_HELD_BACK:
                    held_back = torch.arange(first, first + count) % period == period - 1
                    held_back &= held_back.cumsum(0) <= MAX_HELD_BACK - held_before - len(held)  # the cap
                    held.extend(images[held_back].cpu())
                    images = images[~held_back]
                if images.shape[0]:
                    counter["fit"] += images.shape[0]
                    yield images.to(self.device, torch.float32)

        self._fit_batches(fit_batches())
        fitted = distributed.all_reduce_sum(counter["fit"])
        if fitted == 0:
            raise ValueError("no images were left to fit on")
        self.n_train_images_ = fitted
        self.threshold_ = None
        if self._split_state_names():
            # A split model predicts together (every process the same images): all the held-back
            # images, in the processes' order, which is the images' order.
            held = [image for part in distributed.all_gather_objects(held) for image in part]
            scores = [self.predict(group).scores.cpu() for group in same_size_runs(held)]
        else:
            scores = [self.predict(group).scores.cpu() for group in same_size_runs(held)]
            # In the processes' order, which is the images' order: the scores one process would have.
            scores = [part for parts in distributed.all_gather_objects(scores) for part in parts]
        if sum(part.shape[0] for part in scores) >= 2:
            self.threshold_ = float(good_quantile_threshold(torch.cat(scores), self.threshold_quantile))
        return self

    def _cannot_fit_across_processes(self) -> str | None:
        """Why this model cannot fit under a process group (None: it can, see fastad.distributed)."""
        if self.fits_across_processes:
            return None
        return (
            f"{type(self).__name__} does not fit across processes yet (torch.distributed has "
            f"{distributed.world()[1]}): fit it in one process"
        )

    def _check_state(self) -> None:
        """Checks the learned state read from a model file (ValueError or TypeError naming the
        attribute): a file can be edited and its checksum recomputed. The base checks what it sets
        itself; a method overrides this (calling super) to check its own state against its
        parameters (tensor shapes and dtypes), so that a wrong file fails at load, not at predict."""
        super()._check_state()
        check_int(getattr(self, "n_train_images_", None), "n_train_images_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_train_images_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit(...) first")

    def predict(self, images: Any) -> Prediction:
        """Scores images (tensor (N, 3, H, W) / (3, H, W), data set or DataLoader) and returns
        :class:`Prediction` with maps at the input resolution. All images of one call must have
        one size (a ``fastad.data`` data set is resized by the method's ``transform()``)."""
        self._check_fitted()
        scores, maps, size = [], [], None
        with torch.inference_mode():
            for batch in iter_image_batches(self._prepared(images), self.batch_size):
                if size is not None and tuple(batch.shape[-2:]) != size:
                    raise ValueError(
                        f"predict got images of different sizes ({size[0]}x{size[1]}, "
                        f"then {batch.shape[-2]}x{batch.shape[-1]}); "
                        "resize them to one size (e.g. with the method's transform()) or predict each size separately"
                    )
                size = tuple(batch.shape[-2:])
                batch = batch.to(self.device, torch.float32)
                patch_map, image_score = self._score_batch(batch)
                if patch_map is None and image_score is None:
                    raise RuntimeError(f"{type(self).__name__}._score_batch returned neither a map nor image scores")
                full = None
                if patch_map is not None:
                    full = anomaly_maps(patch_map.float(), size, mode=self.upsample_mode, sigma=self.blur_sigma)
                    maps.append(full.float().cpu())
                scores.append((image_score if image_score is not None else image_scores(full, "max")).float().cpu())
        return Prediction(
            scores=torch.cat(scores),
            maps=torch.cat(maps) if maps else None,
            threshold=getattr(self, "threshold_", None),
        )

    def _predict_items(self, items: list[dict[str, Any]]) -> tuple[torch.Tensor, Prediction]:
        images = stack_images(items)
        if images.shape[0] != len(items):
            raise TypeError("evaluate() takes a data set of single items (fastad.data), not of batches")
        return images, self.predict(images)

    def tile_geometry(self):
        """How this method's patch scores tile for :func:`fastad.highres.predict_large`
        (a :class:`fastad.highres.TileGeometry`); methods whose scores depend on where a patch sits
        or on the whole image raise a ValueError that says what they support instead."""
        raise ValueError(
            f"{type(self).__name__} does not score images tile by tile at their own resolution; "
            "predict resizes them to the training size"
        )

    def _fit_tiled(self, readers, tile: int, progress) -> int:
        """For :func:`fastad.highres.fit_large`: learn from the images ``readers`` gives (each
        read tile by tile) and return how many there were."""
        raise ValueError(
            f"{type(self).__name__} does not fit on images tile by tile at their own resolution; "
            "fit resizes them (resize=..., crop=...)"
        )

    # A method whose _fit_tiled draws random sampling keys image by image (MLF-SC) says so and
    # counts them with _tiled_keys: under torch.distributed, fit_large sums those of the images
    # before a process's block into _keys_before, and the method skips them. Others read no shapes.
    draws_tiled_keys: ClassVar[bool] = False

    def _tiled_keys(self, shape: tuple[int, int, int]) -> int:
        """How many sampling keys ``_fit_tiled`` draws for an image of ``shape`` (C, H, W)."""
        return 0

    def _tiled_scorer(self, reader, geometry, tile: int, progress):
        """For :func:`fastad.highres.predict_large`: (fn, image_score). ``fn`` maps (N, 3, h, w)
        windows to (N, C, h', w') patch outputs at ``geometry.stride`` (channel 0 the patch
        score); ``image_score(outputs, patch_valid)`` gives the image's score from the stitched
        outputs (``patch_valid``: None, or False where the image holds no data), or None for the
        final map's maximum. A method may read ``reader`` first (a pre-pass over the image)."""
        raise NotImplementedError

    # -- state and model files -----------------------------------------------------------------

    def _learned_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, list[str]]]:
        """Learned attributes (ending in ``_``) as model-file parts: tensors (a dict of tensors
        flattened to ``attr.key``, a NumPy array made a tensor), JSON values, and the names of the
        attributes to rebuild as dicts and arrays on loading."""
        return flatten_state(self._learned_attributes())

    @classmethod
    def _joined_state(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Hook: the whole model's learned attributes from every process's part (in process
        order), for a split model loaded outside its group; ValueError when they do not fit."""
        raise ValueError(f"{cls.__name__} models are never split across processes")

    def _header_extras(self) -> dict[str, Any]:
        """Hook: more header entries for the model file (e.g. the backbone and its weights)."""
        return {}

    def save(self, path: str | Path) -> Path:
        """Writes the model to ``path`` (safetensors + JSON header; atomic).

        A model split across the processes of a group (PatchCore's ``shard_bank``) is saved by
        every process together: each writes its part beside ``path``, and ``path`` names the
        parts (``fastad.methods.split_files``). A whole model is written by whichever process
        calls this (under torchrun, let rank 0 do it)."""
        self._check_fitted()
        header = self._file_header()
        tensors, values, rebuild = self._learned_state()
        header.update(state=values, rebuild=rebuild, **self._header_extras())
        split = set(self._split_state_names())
        if split:

            def in_part(name: str) -> bool:
                return name.partition(".")[0] in split

            part_header = {
                "method": self.method_name,
                "fastad_version": header["fastad_version"],
                "state": {n: v for n, v in values.items() if in_part(n)},
                "rebuild": {kind: [n for n in names if in_part(n)] for kind, names in rebuild.items()},
            }
            header["state"] = {n: v for n, v in values.items() if not in_part(n)}
            header["rebuild"] = {kind: [n for n in names if not in_part(n)] for kind, names in rebuild.items()}
            return split_files.write_split_model(
                path,
                {n: t for n, t in tensors.items() if not in_part(n)},
                header,
                {n: t for n, t in tensors.items() if in_part(n)},
                part_header,
            )
        return model_io.save_model_file(path, tensors, header)

    @classmethod
    def _from_file(
        cls, path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any], device: str | None
    ) -> AnomalyModel:
        part = header.get(split_files.PART)
        if part is not None:
            model = part.get("model") if isinstance(part, dict) else None
            raise model_io.ModelFileError(
                f"{path} is one part of a model split across processes, not a model: "
                f"load the model file it belongs to ({model!r}, beside it)"
            )
        for field in ("state", "rebuild"):  # an edited file whose checksum was recomputed
            value = header.get(field, {})
            if not isinstance(value, dict) or (
                field == "rebuild"
                and not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in value.values())
            ):
                raise model_io.ModelFileError(f"{path}: the header's {field!r} entry is malformed ({value!r:.80})")
        model = cls._constructed(path, header, device)
        try:
            state = dict(header.get("state") or {})
            state.update(rebuild_state(tensors, header.get("rebuild") or {}, path))
            if split_files.PARTS in header:  # a model saved split across processes
                parts, whole = split_files.read_parts(path, header)
                states = [part_state(part_tensors, part_header, path) for part_tensors, part_header in parts]
                state.update(cls._joined_state(states) if whole else states[0])
            for name_, value in state.items():
                if not (name_.isidentifier() and name_.endswith("_") and not name_.startswith("_")):
                    raise model_io.ModelFileError(f"{path}: {name_!r} is not a learned attribute name")
                setattr(model, name_, value)
            model._check_params()
            model._check_state()
        except model_io.ModelFileError:
            raise
        except (TypeError, ValueError) as exc:  # a parameter or learned value that cannot be right
            raise model_io.ModelFileError(f"{path} does not hold a usable {cls.method_name!r} model: {exc}") from exc
        model._check_fitted()
        return model.to(model.device)
