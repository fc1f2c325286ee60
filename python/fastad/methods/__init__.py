"""Anomaly-detection methods: one module per method on the shared base class (base.py).

``get_method(name)`` returns a registered method class; ``available_methods()`` lists them.
"""

from .base import AnomalyModel, Prediction, available_methods, get_method, register_method

__all__ = ["AnomalyModel", "Prediction", "available_methods", "get_method", "register_method"]
