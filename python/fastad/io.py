"""Model files: safetensors tensors plus a JSON header, written atomically, never unpickled.

A model file is one safetensors file. Its tensors are the model's learned tensors; its metadata
holds one entry, ``fastad``, a JSON document with the method's name and parameters, the learned
non-tensor state, the versions that wrote it and a SHA-256 digest of the rest of the header and of
every tensor's name, dtype, shape and bytes. safetensors itself guards against a malformed header and truncated data; the
digest catches edited bytes that still parse, so a tampered file is refused rather than trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

FORMAT = "fastad-model"
FORMAT_VERSION = 1
_METADATA_KEY = "fastad"


class ModelFileError(ValueError):
    """A model file that cannot be used: unreadable, truncated, tampered with or mismatched."""


def tensor_digest(tensors: dict[str, torch.Tensor], header: dict[str, Any] | None = None) -> str:
    """SHA-256 over the header (canonical JSON, without its digest) and the tensors' names,
    dtypes, shapes and bytes, in name order; the bytes are hashed in place, without a copy."""
    h = hashlib.sha256()
    if header is not None:
        h.update(json.dumps({k: v for k, v in header.items() if k != "digest"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to write into; when the block succeeds it is flushed to
    disk and renamed over ``path`` (readable like any new file), when it fails it is removed. A
    reader thus sees the old file or the complete new one, never a half-written one."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON at ``path``, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    return Path(path)


def save_model_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Writes ``tensors`` and ``header`` (JSON-serialisable) to ``path`` atomically.

    The file appears complete or not at all: it is written to a temporary file in the same folder,
    flushed to disk and then renamed over ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"model path {path} is a folder; give a file name such as model.safetensors")
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {path.parent} for the model file does not exist")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model state {name!r} is a {type(t).__name__}, not a tensor")
    clean = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    document = dict(header, format=FORMAT, format_version=FORMAT_VERSION)
    document["digest"] = tensor_digest(clean, document)
    try:
        text = json.dumps(document, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model header is not JSON-serialisable: {exc}") from exc

    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata={_METADATA_KEY: text})
    return path


def load_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a model file written by :func:`save_model_file`: ``(tensors, header)``.

    Raises FileNotFoundError for a missing file and :class:`ModelFileError` naming the file for
    anything else that is wrong with it.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise ModelFileError(f"{path} is not a readable model file (truncated or not safetensors): {exc}") from exc

    if _METADATA_KEY not in metadata:
        raise ModelFileError(f"{path} is a safetensors file but not a fastad model (no '{_METADATA_KEY}' header)")
    try:
        header = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: the model header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: the header does not describe a fastad model")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model-file format version {version!r}; this fastad reads up to "
            f"{FORMAT_VERSION}: upgrade fastad to load it"
        )
    if header.get("digest") != tensor_digest(tensors, header):
        raise ModelFileError(f"{path}: the header and tensors do not match their checksum; the file was modified or damaged")
    return tensors, header
