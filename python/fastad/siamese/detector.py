"""``SiameseDetector``: train, save, load and apply the Siamese network to template / inspected pairs.

It is a ``fastad.estimator.Estimator`` like the methods fitted on normal images: parameters in
the scikit-learn manner (``train`` sets the learned state: ``network_``, ``history_``,
``threshold_``), model files read by ``fastad.load_model``, ``to``, and :meth:`SiameseDetector.predict`
returning the shared :class:`fastad.prediction.Prediction`, so that ``fastad.evaluation.evaluate``,
the report and ``fastad evaluate`` take it on a data set of pairs (``fastad.data.ChangePairs``).
:meth:`SiameseDetector.detect` gives one pair's map at the network's cell resolution, tile by tile
for pairs beyond memory (:class:`Detection`). The shipped detector (:meth:`SiameseDetector.pretrained`) was
trained on CIFAR-10 pairs with synthetic blue rectangles; the command that produced it is in its
file's header (``training["command"]``) and in the package README.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import io as model_io
from .._batching import stack_images
from ..checks import check_choice, check_int, check_pixel_values, check_positive_float
from ..data import load_image
from ..estimator import Estimator, register_estimator
from ..postprocess import upsample
from ..prediction import Prediction
from ..tiling import ArrayReader, open_reader
from .losses import LOSSES
from .network import STRIDE, NetworkConfig, SiameseNet
from .sliding import PADDINGS, MapGeometry, detect_tiled, map_geometry, score_map
from .training import PairSource, TrainingHistory, input_statistics, train_network

__all__ = ["Detection", "SiameseDetector", "PRETRAINED_PATH", "PRETRAINED_COMMAND"]

METHOD = "siamese"
PRETRAINED_PATH = Path(__file__).with_name("weights") / "siamese_cifar10.safetensors"
PRETRAINED_COMMAND = (
    "fastad siamese train --data ../shared/data/cifar10.zip --model "
    "python/fastad/siamese/weights/siamese_cifar10.safetensors"
)


@dataclass
class Detection:
    """A map of anomaly scores for one pair.

    ``cells``: float32 (ceil(H/step), ceil(W/step)) array, cell (i, j) = score of the windows
    centred on input pixels [i*step, (i+1)*step) x [j*step, (j+1)*step) (see
    :mod:`fastad.siamese.sliding`); ``step``: input pixels per cell; ``image_size``: (H, W).
    Scores are 1 - P(similar) in [0, 1] (the embedding distance for head "none").
    """

    cells: np.ndarray
    step: int
    image_size: tuple[int, int]

    def full_resolution(self, mode: str = "bilinear") -> np.ndarray:
        """The map upsampled to (H, W) (half-pixel bilinear by default; ``postprocess.upsample``)."""
        if self.step == 1:
            return np.asarray(self.cells[: self.image_size[0], : self.image_size[1]], dtype=np.float32)
        # Upsample the cells to ceil(H/step)*step pixels, then crop: a partial last cell keeps
        # its place instead of being stretched over the whole image.
        rows, cols = self.cells.shape
        full = upsample(
            torch.from_numpy(np.ascontiguousarray(self.cells, dtype=np.float32))[None],
            (rows * self.step, cols * self.step),
            mode,
        )[0]
        return full[: self.image_size[0], : self.image_size[1]].numpy()


@register_estimator(METHOD)
class SiameseDetector(Estimator):
    scores_pairs = True

    """Template-vs-inspected detector on the fully-convolutional Siamese network.

    Network: ``window`` (training image size = receptive field), ``in_channels``, ``channels``
    (five encoder widths), ``embed_dim``, ``head`` ("concat" = [f1, f2, |f1 - f2|], "distance" =
    ||f1 - f2|| (Eq. 1, a scalar per position), "abs_difference" = |f1 - f2|, "none" = embedding only),
    ``hidden`` (discriminator width; head "distance" is ``bias - slope * d`` with a learned
    ``slope > 0`` and has no hidden layer).
    Training: ``loss``: "bce" (the paper's loss for the defect detector, whose discriminator gives
    the score), "contrastive" (the embedding alone, with head "none"), "both" (their sum, the
    shipped weights' loss before 2026-12); ``margin`` (contrastive margin r),
    ``epochs``, ``batch_size``, ``lr`` (Adam), ``seed`` (weights' initialisation and batch order).
    Inference: ``dense`` (1: map step 4 px; 2: step 2 at 4x the cost; 4: per-pixel at 16x),
    ``padding`` of windows past the border ("reflect", "replicate", "zeros"), ``device``.

    ``threshold_`` is the discriminator's own decision, 0.5 on 1 - P(similar): a pair is anomalous
    when one window of it is more likely changed than not (None for head "none", whose embedding
    distance has no calibrated scale).
    """

    def __init__(
        self,
        *,
        window: int = 32,
        in_channels: int = 3,
        channels: tuple[int, ...] = (16, 32, 64, 64, 128),
        embed_dim: int = 64,
        head: str = "concat",
        hidden: int = 64,
        loss: str = "bce",
        margin: float = 1.0,
        epochs: int = 20,
        batch_size: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
        dense: int = 1,
        padding: str = "reflect",
        device: str = "cpu",
    ) -> None:
        self.window, self.in_channels, self.channels = window, in_channels, tuple(channels)
        self.embed_dim, self.head, self.hidden = embed_dim, head, hidden
        self.loss, self.margin, self.epochs, self.batch_size, self.lr, self.seed = (
            loss,
            margin,
            epochs,
            batch_size,
            lr,
            seed,
        )
        self.dense, self.padding, self.device = dense, padding, device
        self._check_params()

    # -- parameters ---------------------------------------------------------------------------

    def _network_config(self) -> NetworkConfig:
        return NetworkConfig(
            window=self.window,
            in_channels=self.in_channels,
            channels=tuple(self.channels),
            embed_dim=self.embed_dim,
            head=self.head,
            hidden=self.hidden,
        )

    def _check_params(self) -> None:
        super()._check_params()
        config = self._network_config()  # validates the network's parameters
        check_choice(self.loss, "loss", LOSSES)
        if self.loss != "contrastive" and config.head == "none":
            raise ValueError("head 'none' has no discriminator to train with BCE: use loss='contrastive'")
        self.margin = check_positive_float(self.margin, "margin")
        self.lr = check_positive_float(self.lr, "lr")
        check_int(self.epochs, "epochs", minimum=1)
        check_int(self.batch_size, "batch_size", minimum=1)
        check_int(self.seed, "seed", minimum=0)
        MapGeometry(self.window, STRIDE, self.dense)  # validates dense against the stride
        check_choice(self.padding, "padding", PADDINGS)

    def _decision_threshold(self) -> float | None:
        return None if self.head == "none" else DECISION_THRESHOLD

    # -- training -----------------------------------------------------------------------------

    def train(
        self,
        train_pairs: PairSource,
        heldout_pairs: PairSource | None = None,
        *,
        normalization_images: Tensor | None = None,
        progress: bool | None = None,
        log=None,
        training_info: dict | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> SiameseDetector:
        """Trains a fresh network on ``train_pairs`` (see :mod:`fastad.siamese.training`) and
        returns ``self``. ``normalization_images`` (uint8 or [0, 1] (N, C, H, W)) give the input
        normalisation; ``training_info`` (data, command...) is stored in the model file.
        ``checkpoint``: a file written after every epoch, which a training started again with the
        same parameters and pairs resumes from (:func:`fastad.siamese.train_network`)."""
        self._check_params()
        self._forget_learned()
        with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's RNG alone
            # Only the CPU generator (the network is built on the CPU): torch.manual_seed would
            # also reseed every CUDA generator, which fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(self.seed)
            net = SiameseNet(self._network_config())
        if normalization_images is not None:
            net.set_normalization(*input_statistics(normalization_images))
        history = train_network(
            net,
            train_pairs,
            heldout_pairs,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            loss=self.loss,
            margin=self.margin,
            seed=self.seed,
            device=self.device,
            progress=progress,
            log=log,
            checkpoint=checkpoint,
        )
        self.network_ = net.eval()
        self.history_ = history
        self.training_info_ = dict(training_info or {})
        self.threshold_ = self._decision_threshold()
        return self

    def _check_trained(self) -> SiameseNet:
        net = getattr(self, "network_", None)
        if net is None:
            raise RuntimeError("this SiameseDetector is not trained: call train(), load() or pretrained() first")
        return net

    # -- files --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the network, parameters, threshold and training history (safetensors + JSON header)."""
        net = self._check_trained()
        header = self._file_header()
        header.update(
            network=net.config.to_dict(),
            history=self.history_.to_dict(),
            training=self.training_info_,
            state={"threshold_": self.threshold_},  # learned state beside the network, as the methods keep it
        )
        return model_io.save_model_file(path, dict(net.state_dict()), header)

    @classmethod
    def _from_file(
        cls, path: str | os.PathLike, tensors: dict[str, Tensor], header: dict[str, Any], device: str | None
    ) -> SiameseDetector:
        detector = cls._constructed(path, header, device)
        try:
            config = NetworkConfig.from_dict(header.get("network") or {})
        except (TypeError, ValueError) as exc:
            raise model_io.ModelFileError(f"{path}: the header's network description is not valid: {exc}") from exc
        if config != detector._network_config():
            raise model_io.ModelFileError(f"{path}: the network description does not match its parameters")
        net = SiameseNet(config)
        try:
            net.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise model_io.ModelFileError(f"{path}: the tensors do not fit the network: {exc}") from exc
        # An edited file whose checksum was recomputed can hold anything in these two entries.
        for entry in ("history", "training"):
            if not isinstance(header.get(entry) or {}, dict):
                raise model_io.ModelFileError(
                    f"{path}: the header's {entry!r} entry is malformed ({header[entry]!r:.80})"
                )
        try:
            history = TrainingHistory.from_dict(header.get("history") or {})
        except (TypeError, ValueError) as exc:
            raise model_io.ModelFileError(f"{path}: the header's 'history' entry is malformed: {exc}") from exc
        detector.network_ = net.to(detector.device).eval()
        detector.history_ = history
        detector.training_info_ = dict(header.get("training") or {})
        # Files written before the detector had a threshold get the one it would have had.
        state = header.get("state") or {}
        if not isinstance(state, dict):
            raise model_io.ModelFileError(f"{path}: the header's 'state' entry is malformed ({state!r:.80})")
        detector.threshold_ = state.get("threshold_", detector._decision_threshold())
        try:
            detector._check_state()
        except (TypeError, ValueError) as exc:
            raise model_io.ModelFileError(f"{path}: {exc}") from exc
        return detector

    @classmethod
    def pretrained(cls, *, device: str | None = None) -> SiameseDetector:
        """The detector shipped with fastad (CIFAR-10 pairs with synthetic blue rectangles)."""
        if not PRETRAINED_PATH.is_file():
            raise FileNotFoundError(
                f"the shipped Siamese weights are missing ({PRETRAINED_PATH}); "
                f"reinstall fastad or recreate them with: {PRETRAINED_COMMAND}"
            )
        return cls.load(PRETRAINED_PATH, device=device)

    # -- inference ----------------------------------------------------------------------------

    def detect(
        self,
        template: Any,
        inspected: Any,
        *,
        dense: int | None = None,
        tile: int | None = None,
        out: np.ndarray | None = None,
        progress: bool | None = None,
    ) -> Detection:
        """The anomaly map of ``inspected`` against ``template``.

        Both are (C, H, W) float tensors in [0, 1], or paths of image files (PNG, JPEG, TIFF...,
        grey or RGBA converted as :func:`fastad.data.load_image` does) or ``.npy`` arrays.
        ``tile`` (pixels) runs the exact tiled inference in bounded memory (the result equals the
        untiled map up to float rounding); ``.npy`` and uncompressed TIFF files are then read tile
        by tile, never whole. Pairs above 16 megapixels are tiled (512 px) even without ``tile``.
        ``out``: an optional float array or ``np.memmap`` of the map's shape to write into.
        ``dense`` overrides the map step (4 / dense pixels, at dense² the cost).
        """
        net = self._check_trained()
        dense = self.dense if dense is None else dense
        geometry = map_geometry(net, dense)
        lazy = tile is not None
        pair = [
            _open_input(x, name, self.in_channels, lazy)
            for x, name in ((template, "template"), (inspected, "inspected"))
        ]
        sizes = [tuple(x.shape[-2:]) for x in pair]
        if sizes[0] != sizes[1]:
            raise ValueError(
                f"template and inspected must have the same size, got {sizes[0][0]}x{sizes[0][1]} "
                f"and {sizes[1][0]}x{sizes[1][1]} pixels"
            )
        height, width = sizes[0]
        if tile is None and height * width > AUTO_TILE_PIXELS:
            tile = AUTO_TILE  # exact either way; bounds the activations of a large in-memory pair
        if tile is None:
            cells = score_map(net, pair[0], pair[1], dense=dense, padding=self.padding).cpu().numpy()
            if out is not None:
                _check_out(out, cells.shape)
                out[...] = cells
                cells = out
        else:
            readers = [x if isinstance(x, _ChannelAdapter) else ArrayReader(x, channels_last=False) for x in pair]
            cells = detect_tiled(
                net, readers[0], readers[1], tile=tile, dense=dense, padding=self.padding, out=out, progress=progress
            )
        return Detection(cells, geometry.step, (int(height), int(width)))

    def predict(self, template: Any, inspected: Any, *, dense: int | None = None) -> Prediction:
        """Scores pairs: ``template`` and ``inspected`` are one image each ((C, H, W) tensors in
        [0, 1] or file paths), a batch (N, C, H, W), or lists of images, pair i = (template[i],
        inspected[i]). Returns :class:`fastad.prediction.Prediction`: ``maps`` (N, H, W) at the
        input resolution (every pair of one call has one size), ``scores`` the largest cell score
        of each pair (the most changed window), ``threshold`` the detector's ``threshold_``."""
        templates, inspecteds = _as_image_list(template, "template"), _as_image_list(inspected, "inspected")
        if len(templates) != len(inspecteds):
            raise ValueError(f"got {len(templates)} template(s) for {len(inspecteds)} inspected image(s)")
        if not templates:
            raise ValueError("predict got no pairs")
        scores, maps = [], []
        for n, pair in enumerate(zip(templates, inspecteds, strict=True)):
            found = self.detect(*pair, dense=dense)
            if maps and found.image_size != tuple(maps[0].shape):
                raise ValueError(
                    f"predict got pairs of different sizes ({maps[0].shape[0]}x{maps[0].shape[1]}, then "
                    f"{found.image_size[0]}x{found.image_size[1]} at pair {n}); predict each size separately"
                )
            scores.append(float(np.max(found.cells)))
            maps.append(torch.from_numpy(found.full_resolution()))
        return Prediction(
            scores=torch.tensor(scores, dtype=torch.float32),
            maps=torch.stack(maps),
            threshold=getattr(self, "threshold_", None),
        )

    def tile_geometry(self):
        raise ValueError("a Siamese detector scores large pairs tile by tile with: fastad siamese detect --tile")

    def _predict_items(self, items: list[dict[str, Any]]) -> tuple[Tensor, Prediction]:
        missing = [item.get("path", "?") for item in items if "template" not in item]
        if missing:
            raise TypeError(
                f"a SiameseDetector scores template / inspected pairs; {missing[0]} has no template "
                "(evaluate it on pairs: fastad.data.ChangePairs)"
            )
        pred = self.predict([item["template"] for item in items], [item["image"] for item in items])
        return stack_images(items), pred


# The discriminator's decision: 1 - P(similar) above one half.
DECISION_THRESHOLD = 0.5

# Above this many pixels a pair held in memory is still run tile by tile (the activations of the
# first layers would take several GB); the map is the same to float rounding.
AUTO_TILE_PIXELS = 16_000_000
AUTO_TILE = 512
_LAZY_SUFFIXES = (".npy", ".tif", ".tiff")


def _open_input(x: Any, name: str, channels: int, lazy: bool):
    """What :meth:`SiameseDetector.detect` accepts, as a checked (C, H, W) tensor in [0, 1] with the
    network's channels, or (``lazy``, for .npy / TIFF files) a tile reader that adapts channels."""
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        if not path.exists():
            raise FileNotFoundError(f"{name}: no such file: {path}")
        if not path.is_file():
            raise ValueError(f"{name}: {path} is a folder, not an image file")
        suffix = path.suffix.lower()
        if suffix in _LAZY_SUFFIXES and (lazy or suffix == ".npy"):
            reader = _ChannelAdapter(open_reader(path), channels, name)
            if lazy:
                return reader
            x = reader.read(0, reader.shape[1], 0, reader.shape[2])
        else:  # any image file, compressed TIFF included, read whole
            x = load_image(path)
    return _in_memory(x, name, channels)


def _as_image_list(x: Any, name: str) -> list:
    """``predict``'s pairs side as a list of single images (tensors or paths)."""
    if isinstance(x, Tensor) and x.dim() == 4:
        return list(x.unbind(0))
    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, (Tensor, str, os.PathLike)):
        return [x]
    raise TypeError(
        f"{name} must be an image tensor (C, H, W), a batch (N, C, H, W), a file path or a list of them, "
        f"got {type(x).__name__}"
    )


def _check_out(out: Any, shape: tuple[int, int]) -> None:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array or np.memmap, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have the map's shape {tuple(shape)}, got {tuple(out.shape)}")
    if not np.issubdtype(out.dtype, np.floating):
        raise TypeError(f"out must have a floating-point dtype (scores lie in [0, 1]), got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only (an np.memmap opened with mode='r'?)")


def _in_memory(x: Any, name: str, channels: int) -> Tensor:
    """A (C, H, W) float tensor in [0, 1] with the network's channels."""
    if isinstance(x, np.ndarray):
        raise TypeError(
            f"{name} must be a torch.Tensor (C, H, W) or a file path, got a numpy array "
            "(wrap it with torch.from_numpy and put the channels first)"
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (C, H, W) or a file path, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be one (C, H, W) image, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point in [0, 1], got {x.dtype}")
    if x.shape[0] > 4 and x.shape[-1] <= 4:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, which looks like (H, W, C): put the channels "
            "first with .permute(2, 0, 1)"
        )
    check_pixel_values(x, name)
    return _match_channels(x, channels, name)


def _match_channels(x: Tensor, channels: int, name: str) -> Tensor:
    if x.shape[0] == channels:
        return x
    if channels == 1 and x.shape[0] == 3:
        return x.mean(0, keepdim=True)  # an RGB file for a grey network
    if channels == 3 and x.shape[0] == 1:
        return x.expand(3, -1, -1)
    raise ValueError(f"{name} has {x.shape[0]} channels; the network takes {channels}")


class _ChannelAdapter:
    """A tile reader whose regions are brought to the network's channel count (grey <-> RGB)."""

    def __init__(self, reader, channels: int, name: str) -> None:
        c = reader.shape[0]
        if c != channels and (channels, c) not in ((1, 3), (3, 1)):
            raise ValueError(f"{name} has {c} channels; the network takes {channels}")
        self.reader, self.channels, self.name = reader, channels, name

    @property
    def shape(self) -> tuple[int, int, int]:
        _, h, w = self.reader.shape
        return (self.channels, h, w)

    @property
    def dtype(self):
        return self.reader.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        return _match_channels(self.reader.read(y0, y1, x0, x1), self.channels, self.name)
