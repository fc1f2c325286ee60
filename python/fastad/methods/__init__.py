"""Anomaly-detection methods: one module per method on the shared base classes.

``base.AnomalyModel`` is every method's base (inputs, predict, thresholds, model files);
``feature_model.FeatureModel`` adds a pretrained backbone. ``get_method(name)`` returns a
registered method class; ``available_methods()`` lists them.
"""

from ..prediction import Prediction
from .base import AnomalyModel, available_methods, get_method, register_method
from .feature_model import FeatureModel
from .gaussian_ad import GaussianAD
from .mlfsc import MLFSC
from .padim import PaDiM
from .patchcore import PatchCore
from .spade import SPADE

__all__ = [
    "AnomalyModel",
    "FeatureModel",
    "GaussianAD",
    "MLFSC",
    "PaDiM",
    "PatchCore",
    "Prediction",
    "SPADE",
    "available_methods",
    "get_method",
    "register_method",
]
