"""Learned state as model-file parts and back: plain tensors, dicts of tensors (stored as
``attr.key``), NumPy arrays (stored as tensors) and JSON values; the header names the attributes to
rebuild as dicts and arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import io as model_io
from ..estimator import is_tensor_dict

# Learned state that is not a tensor or a JSON value is stored as tensors named "<attr>.<key>"
# (a dict of tensors) or "<attr>" (a NumPy array); the header says which attributes to rebuild.
_DICT_STATE, _NUMPY_STATE = "tensor_dicts", "numpy_arrays"


def flatten_state(attributes: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, list[str]]]:
    """Learned attributes as model-file parts: tensors (a dict of tensors flattened to
    ``attr.key``, a NumPy array made a tensor), JSON values, and the names of the attributes to
    rebuild as dicts and arrays on loading."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    rebuild: dict[str, list[str]] = {_DICT_STATE: [], _NUMPY_STATE: []}
    for name, value in attributes.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, np.ndarray):
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
            rebuild[_NUMPY_STATE].append(name)
        elif is_tensor_dict(value):
            for key, t in value.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(
                        f"learned state {name!r} is a dict of tensors whose keys must be non-empty strings, got {key!r}"
                    )
                tensors[f"{name}.{key}"] = t
            rebuild[_DICT_STATE].append(name)
        else:
            values[name] = value
    return tensors, values, rebuild


def part_state(tensors: dict[str, torch.Tensor], header: dict[str, Any], path: Any) -> dict[str, Any]:
    """The learned attributes in one part file of a split model."""
    state, rebuild = header.get("state", {}), header.get("rebuild", {})
    if (
        not isinstance(state, dict)
        or not isinstance(rebuild, dict)
        or not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in rebuild.values())
    ):
        raise model_io.ModelFileError(f"{path}: a part file's header is malformed")
    return {**state, **rebuild_state(tensors, rebuild, path)}


def rebuild_state(tensors: dict[str, torch.Tensor], rebuild: dict[str, list[str]], path: Any) -> dict[str, Any]:
    """Learned attributes from a model file's tensors: plain tensors, dicts of tensors
    (``attr.key``) and NumPy arrays, as ``flatten_state`` wrote them."""
    dict_names = set(rebuild.get(_DICT_STATE) or [])
    numpy_names = set(rebuild.get(_NUMPY_STATE) or [])
    state: dict[str, Any] = {name: {} for name in dict_names}
    for key, t in tensors.items():
        attr, dot, sub = key.partition(".")
        if dot:
            if attr not in dict_names or not sub:
                raise model_io.ModelFileError(f"{path}: tensor {key!r} belongs to no learned dict")
            state[attr][sub] = t
        else:
            state[attr] = t.numpy() if attr in numpy_names else t
    return state
