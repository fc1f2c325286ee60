"""The argument checks every fastad model shares, public so that a method of your own
(``fastad.register_method``) fails the way the built-in ones do: image batches, devices,
choices, numbers, generators and learned-state tensors.

One convention, Python's own: a value of the wrong type raises TypeError, a value of the right
type that is out of range raises ValueError; both name the parameter, say what it must be and
what it got. The C++ operators word their checks the same way (``csrc/include/fastad/checks.h``).

Images entering fastad are float (B, 3, H, W) RGB with values in [0, 1]: each backbone applies
its own normalisation, so an image normalised already, or left in 0..255, is a mistake worth a
clear message rather than silently poor features.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

RANGE_TOLERANCE = 1e-3  # resizing filters overshoot [0, 1] by rounding; real mistakes are far off


def check_image_batch(images: object, what: str = "images", *, check_values: bool = True) -> torch.Tensor:
    """Validates a floating (B, 3, H, W) tensor, B, H, W > 0, and (with ``check_values``, which
    costs one device sync) finite values in [0, 1]. Returns ``images`` unchanged."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        hint = " (a single image: add the batch axis with images.unsqueeze(0))" if images.dim() == 3 else ""
        raise ValueError(f"{what} must be 4-D (B, 3, H, W), got shape {tuple(images.shape)}{hint}")
    if images.shape[1] != 3:
        raise ValueError(f"{what} must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        hint = ": scale uint8 images to [0, 1] with images.float() / 255" if images.dtype == torch.uint8 else ""
        raise TypeError(f"{what} must be floating point with values in [0, 1], got {images.dtype}{hint}")
    if images.numel() == 0:
        raise ValueError(f"{what} is empty: shape {tuple(images.shape)}")
    if check_values:
        check_pixel_values(images, what)
    return images


def check_pixel_values(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """ValueError unless every value is finite and in [0, 1] (one device sync). Returns ``images``."""
    # One pass: aminmax propagates NaN to both ends, and an infinity is an end itself.
    low, high = (float(v) for v in torch.aminmax(images.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{what} must hold finite values in [0, 1], got NaN or infinite values")
    if not (low >= -RANGE_TOLERANCE and high <= 1.0 + RANGE_TOLERANCE):
        hint = " (divide 0..255 images by 255)" if high > 2.0 else ""
        raise ValueError(
            f"{what} must hold values in [0, 1] (the networks normalise them themselves), "
            f"got values in [{low:.4g}, {high:.4g}]{hint}"
        )
    return images


def check_device(device: object) -> torch.device:
    """A valid torch device that can be used here: ValueError naming it otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a valid torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r} was asked for but CUDA is not available")
    return dev


def check_choice(value: object, name: str, choices) -> object:
    """``value`` if it is one of ``choices``, else a ValueError naming the parameter and every choice."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(
    value: object, name: str, *, minimum: int | None = 1, maximum: int | None = None, meaning: str = ""
) -> int:
    """``value`` as an int: TypeError unless it is an int (a NumPy integer counts; a bool does
    not), ValueError unless ``minimum <= value <= maximum`` (None: unbounded). ``meaning`` (e.g.
    "the number of neighbours") goes into the message."""
    what = f" ({meaning})" if meaning else ""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{what}, got {type(value).__name__} {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is not None:
            kind = f"an int in [{'-inf' if minimum is None else minimum}, {maximum}]"
        else:
            kind = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {kind}{what}, got {value}")
    return value


def check_float(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: bool = False,
    meaning: str = "",
) -> float:
    """``value`` as a float: TypeError unless it is a real number (not a bool), ValueError unless
    it is finite and within [``minimum``, ``maximum``] (``above``: strictly above ``minimum``).
    ``meaning`` goes into the message."""
    what = f" ({meaning})" if meaning else ""
    if minimum is None and maximum is None:
        kind = "a finite number"
    elif minimum == 0 and above and maximum is None:
        kind = "a positive finite number"
    elif maximum is None:
        kind = f"a finite number {'>' if above else '>='} {minimum:g}"
    else:
        kind = f"a number in {'(' if above else '['}{-math.inf if minimum is None else minimum:g}, {maximum:g}]"
    if not _is_real(value):
        raise TypeError(f"{name} must be a number{what}, got {type(value).__name__} {value!r}")
    number = float(value)
    low_ok = minimum is None or (number > minimum if above else number >= minimum)
    if not math.isfinite(number) or not low_ok or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {kind}{what}, got {value!r}")
    return number


def check_positive_float(value: object, name: str) -> float:
    """``value`` as a float if it is a finite number > 0 (TypeError / ValueError otherwise)."""
    if not _is_real(value):  # said as the range is, for the parameters (lr, margin, scale) that use it
        raise TypeError(f"{name} must be a positive finite number, got {type(value).__name__} {value!r}")
    return check_float(value, name, minimum=0.0, above=True)


def check_fraction(value: object, name: str) -> float:
    """``value`` as a float in [0, 1] (TypeError / ValueError otherwise)."""
    return check_float(value, name, minimum=0.0, maximum=1.0)


def check_generator(generator: object) -> torch.Generator:
    """A CPU ``torch.Generator`` (the random draws fastad makes on the host)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    return generator


def check_state_tensor(name: str, value: object, dtype, shape: tuple) -> torch.Tensor:
    """``value`` if it is a tensor of ``dtype`` (one dtype, or a tuple of those allowed) and
    ``shape`` (an int: that size; a str: a named size, any >= 1) whose floating values are finite,
    else a ValueError naming ``name`` with what was expected and what was found. For learned
    state read from a model file; reads the values once, with no temporary of their size."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    kinds = " or ".join(str(d) for d in dtypes)
    want = f"{kinds} tensor of shape ({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''})"
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a {want}, got {'nothing' if value is None else type(value).__name__}")
    got = tuple(value.shape)
    if (
        value.dtype not in dtypes
        or len(got) != len(shape)
        or any(n != s if isinstance(s, int) else n < 1 for n, s in zip(got, shape, strict=True))
    ):
        raise ValueError(f"{name} must be a {want}, got a {value.dtype} tensor of shape {got}")
    if value.is_floating_point() and value.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(value)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return value


def keys_of(value: object) -> str:
    """How a state check names what it found where a dict was expected: its keys, or its type."""
    return str(list(value)) if isinstance(value, dict) else f"a {type(value).__name__}"
