"""Model files: safetensors tensors plus a JSON header, written atomically, never unpickled.

A model file is one safetensors file. Its tensors are the model's learned tensors; its metadata
holds one entry, ``fastad``, a JSON document with the method's name and parameters, the learned
non-tensor state, the versions that wrote it and a SHA-256 digest of the rest of the header and of
every tensor's name, dtype, shape and bytes. safetensors itself guards against a malformed header
and truncated data; the digest catches edited bytes that still parse, so a tampered file is
refused rather than trusted.

Every file fastad writes (model files, JSON, pictures, reports) goes through :func:`atomic_path`:
a reader, or a process that was killed while writing, sees the old file or the complete new one,
and a killed writer leaves no temporary file behind (see :func:`atomic_path`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

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


# ----------------------------------------------------------------------------------------------
# Atomic writes

# Where the OS offers it (Linux: ext4, xfs, btrfs, tmpfs...), the new file is first an unnamed
# inode (O_TMPFILE) in the target's folder, so a writer killed before the end leaves nothing; it
# gets a name only once complete. Elsewhere it is a named temporary, recognisable by its name:
#   .<target name>.fastad-<host tag>-<pid>-<random>.tmp
# and a later write to the same folder removes those whose process (on this host) is gone. The
# tests switch this off to exercise the named fallback.
_USE_O_TMPFILE = True
_TEMP_RE = re.compile(r"\A\..*\.fastad-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[0-9a-f]{12}\.tmp\Z", re.DOTALL)
_NO_O_TMPFILE = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL}
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_swept_folders: set[str] = set()
_host: str | None = None


def _host_tag() -> str:
    """Eight hex digits naming this machine, so that a temporary of another host sharing the
    folder (a network file system) is never taken for a dead process's."""
    global _host
    if _host is None:
        _host = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
    return _host


def _temporary_name(path: Path) -> str:
    stem = path.name[:120]  # the whole name must stay under the usual 255-byte limit
    return f".{stem}.fastad-{_host_tag()}-{os.getpid()}-{secrets.token_hex(6)}.tmp"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except (OverflowError, ValueError):
        return False  # no such pid can exist
    except OSError:
        return True  # unsure: keep the file
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Removes the temporary files that fastad writers on this machine left in ``folder`` when
    they were killed (SIGKILL, power loss) before renaming them; returns what it removed.

    Only names fastad makes are touched, only those of this host, and only when the process named
    in them no longer runs (a zombie not yet reaped still counts as running). Runs on POSIX only.
    """
    if os.name != "posix":
        return []  # os.kill(pid, 0) is not a harmless probe on Windows
    removed: list[Path] = []
    try:
        entries = os.scandir(folder)
    except OSError:
        return removed
    with entries:
        for entry in entries:
            match = _TEMP_RE.match(entry.name)
            if match is None or match["host"] != _host_tag():
                continue
            pid = int(match["pid"])
            if pid == os.getpid() or _process_alive(pid):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:
                pass  # gone already, or not ours to remove
    return removed


def _write_error(exc: OSError, path: Path, during: str = "write") -> OSError:
    """``exc`` as an OSError of the same errno (so the same subclass) whose message names the
    file the caller asked for, not the temporary, and says what went wrong."""
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL:
        reason += " (the disk is full, or a quota or file-size limit was reached)"
    message = f"could not {during} {path}: {reason}"
    return OSError(exc.errno, message) if exc.errno else OSError(message)


class _Temporary:
    """The file being written for ``path``: an unnamed inode (``name`` None) or a named file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.folder = path.parent
        self.dirfd: int | None = None
        self.fd: int | None = None
        self.name: str | None = None
        try:
            if os.name == "posix":
                try:
                    self.dirfd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except PermissionError:
                    pass  # a folder we may write but not list: paths, a named temporary, no folder fsync
            self.fd = self._unnamed()
            if self.fd is None:
                self.name = _temporary_name(path)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
                self.fd = os.open(self._at(self.name), flags, 0o666, **self._dir_fd())
        except OSError as exc:
            self.discard()
            raise _write_error(exc, path) from exc
        except BaseException:
            self.discard()
            raise

    def _dir_fd(self) -> dict[str, int]:
        return {} if self.dirfd is None else {"dir_fd": self.dirfd}

    def _at(self, name: str) -> str:
        """``name`` as the path argument of a call made relative to the folder's descriptor."""
        return name if self.dirfd is not None else str(self.folder / name)

    def _unnamed(self) -> int | None:
        if not (_USE_O_TMPFILE and hasattr(os, "O_TMPFILE") and self.dirfd is not None):
            return None
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666, dir_fd=self.dirfd)
        except OSError as exc:
            if exc.errno in _NO_O_TMPFILE:
                return None  # this file system (or kernel) has no O_TMPFILE
            raise
        if not os.path.exists(f"/proc/self/fd/{fd}"):  # no /proc: the inode could not be linked
            os.close(fd)
            return None
        return fd

    @property
    def shown(self) -> Path:
        """The path a caller writes to: the unnamed inode through /proc, or the named file."""
        return Path(f"/proc/self/fd/{self.fd}") if self.name is None else self.folder / self.name

    def commit(self) -> None:
        """Flushes the file to disk, gives it its name and fsyncs the folder."""
        assert self.fd is not None
        try:
            os.fsync(self.fd)
            if self.name is None:
                name = _temporary_name(self.path)
                # linkat(..., AT_SYMLINK_FOLLOW): a dir_fd makes Python call linkat, not link
                os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=self.dirfd, follow_symlinks=True)
                self.name = name
            os.close(self.fd)
            self.fd = None
            if self.dirfd is not None:
                os.replace(self.name, self.path.name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
            else:
                os.replace(self.folder / self.name, self.path)
            self.name = None
        except OSError as exc:
            raise _write_error(exc, self.path) from exc
        if self.dirfd is not None:
            try:
                os.fsync(self.dirfd)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
                    raise _write_error(exc, self.path, "record the new name of") from exc

    def discard(self) -> None:
        """Removes what was written (an unnamed inode goes with its descriptor) and closes."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.name is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._at(self.name), **self._dir_fd())
            self.name = None
        self.close()

    def close(self) -> None:
        if self.dirfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.dirfd)
            self.dirfd = None


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike, *, sweep: bool = False) -> Iterator[_Temporary]:
    """The machinery of :func:`atomic_path`, also giving the open descriptor. ``sweep`` removes
    stale temporaries from the folder on every call (else once per folder and process)."""
    path = Path(path)
    folder = os.path.abspath(path.parent)
    if sweep or folder not in _swept_folders:
        remove_stale_temporaries(folder)
        _swept_folders.add(folder)
    tmp = _Temporary(path)
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.filename is None or exc.filename == str(tmp.shown):
                raise _write_error(exc, path) from exc
            raise  # about some other file the block used
        tmp.commit()
    except BaseException:
        tmp.discard()
        raise
    finally:
        tmp.close()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A path to write the new contents of ``path`` into; when the block succeeds the file is
    flushed to disk and renamed over ``path`` (readable like any new file: mode 0666 less the
    umask), when it fails nothing is left. A reader thus sees the old file or the complete new
    one, never a half-written one, and a writer killed half-way leaves no temporary file.

    On Linux the yielded path is ``/proc/self/fd/N``, an unnamed file in ``path``'s folder: open
    it (``open``, ``Path.write_bytes``, ``numpy.save``, PIL, matplotlib) but do not rename, delete
    or hand it to another process. Elsewhere it is a hidden named file beside ``path``, which a
    later write to the folder removes if its writer was killed. An OSError about writing it is
    raised again naming ``path``.
    """
    with _atomic_file(path) as tmp:
        yield tmp.shown


def output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """The folder ``path``, made (with its parents) if missing. A path that exists as something
    else raises NotADirectoryError naming the option it came from, instead of mkdir's bare
    "File exists"."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{option} {folder} exists and is not a folder; give a folder for the output files")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON at ``path``, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------------------------
# The safetensors layout, written here so that no library writes a temporary file of its own
# (safetensors' save_file writes its own ".tmpXXXX" beside the target, which a killed process
# leaves behind) and the tensors stream to disk without a copy. Files are read by safetensors.

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _attr, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _attr):
        _DTYPES[getattr(torch, _attr)] = _code
del _attr, _code


def _write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` (contiguous, on the CPU) in the safetensors layout: the header's byte count
    (u64 little-endian), the JSON header padded with spaces to a multiple of 8, then the tensors'
    bytes, largest element size first and by name (the order safetensors itself writes)."""
    if sys.byteorder != "little":
        raise NotImplementedError(
            "model files are little-endian; writing them on a big-endian machine is not supported"
        )
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for name in order:
        t = tensors[name]
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def save_model_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Writes ``tensors`` and ``header`` (JSON-serialisable) to ``path`` atomically.

    The file appears complete or not at all (:func:`atomic_path`); stale temporaries of killed
    writers in the folder are removed first. A failed write (a full disk) raises an OSError naming
    ``path`` and leaves the old file as it was.
    """
    return write_model_file(path, tensors, header)[0]


def write_model_file(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict[str, Any]
) -> tuple[Path, str]:
    """:func:`save_model_file`, returning ``(path, checksum)``: the checksum is what
    :func:`load_model_file` reads back as ``header["digest"]`` (an index file names its parts by it)."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"model path {path} is a folder; give a file name such as model.safetensors")
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {path.parent} for the model file does not exist")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model state {name!r} is a {type(t).__name__}, not a tensor")
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"model tensor name {name!r} is not allowed")
        if t.layout != torch.strided:
            raise TypeError(f"model state {name!r} is a {t.layout} tensor; model files hold dense tensors")
        if t.dtype not in _DTYPES:
            raise TypeError(f"model state {name!r} has dtype {t.dtype}, which model files cannot hold")
    clean = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    document = dict(header, format=FORMAT, format_version=FORMAT_VERSION)
    try:
        text = json.dumps(document, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model header is not JSON-serialisable: {exc}") from exc
    document["digest"] = tensor_digest(clean, document)
    text = json.dumps(document, sort_keys=True, allow_nan=False)

    with _atomic_file(path, sweep=True) as tmp, open(tmp.fd, "wb", closefd=False) as f:
        _write_safetensors(f, clean, {_METADATA_KEY: text})
    return path, document["digest"]


# ----------------------------------------------------------------------------------------------
# Reading


def _refuse_constant(name: str) -> float:
    raise ValueError(f"the number {name} (fastad writes only finite numbers)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _damage(path: Path, raw: BinaryIO) -> str | None:
    """What is wrong with a file safetensors refused, when it is a truncation: its header's
    length says more than the file holds, or its tensors end beyond the end of the file."""
    size = os.fstat(raw.fileno()).st_size
    if size < 8:
        return f"{path} is truncated: it has {size} bytes, fewer than the 8 that give a model file's header length"
    raw.seek(0)
    (n,) = struct.unpack("<Q", raw.read(8))
    if n > size - 8:
        return f"{path} is truncated inside its header: it has {size} bytes, its header alone needs {8 + n}"
    try:
        header = json.loads(raw.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception:  # not a header we can read: let safetensors' message speak
        return None
    if 8 + n + end > size:
        return f"{path} is truncated: it has {size} bytes, its header describes {8 + n + end}"
    return None


def _read(raw: BinaryIO) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the safetensors file open as ``raw``. Everything comes from that
    one open file, so a writer replacing the path meanwhile cannot mix two files: safetensors
    opens its argument again (and torch maps it a third time), so it is given this file's
    /proc/self/fd path where there is one, and the bytes elsewhere."""
    from safetensors import safe_open

    same_file = f"/proc/self/fd/{raw.fileno()}"
    if sys.platform.startswith("linux") and os.path.exists(same_file):
        with safe_open(same_file, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    from safetensors.torch import load

    data = raw.read()
    tensors = load(data)  # checks the layout as safe_open does
    (n,) = struct.unpack("<Q", data[:8])
    return tensors, json.loads(data[8 : 8 + n]).get("__metadata__") or {}


def load_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads a model file written by :func:`save_model_file`: ``(tensors, header)``.

    Raises FileNotFoundError for a missing file and :class:`ModelFileError` naming the file for
    anything else that is wrong with it (truncated, damaged, edited, not a fastad model). A file
    replaced while it is read (:func:`save_model_file` from another process) is read whole, old
    or new.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    with open(path, "rb") as raw:
        try:
            tensors, metadata = _read(raw)
        except Exception as exc:  # safetensors raises its own error types for malformed files
            try:
                reason = _damage(path, raw)
            except Exception:
                reason = None
            detail = str(exc).replace(f"/proc/self/fd/{raw.fileno()}", str(path))
            raise ModelFileError(
                reason or f"{path} is not a readable model file (damaged or not safetensors): {detail}"
            ) from exc

    if _METADATA_KEY not in metadata:
        raise ModelFileError(f"{path} is a safetensors file but not a fastad model (no '{_METADATA_KEY}' header)")
    try:
        header = json.loads(metadata[_METADATA_KEY], parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"{path}: the model header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: the header does not describe a fastad model")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileError(
            f"{path}: the header's format_version is {version!r}, not a version number; the file was damaged or edited"
        )
    if version > FORMAT_VERSION:
        intact = header.get("digest") == tensor_digest(tensors, header)  # as far as this version can tell
        raise ModelFileError(
            f"{path} has model-file format version {version!r}; this fastad reads up to "
            f"{FORMAT_VERSION}: upgrade fastad to load it"
            + ("" if intact else " (unless the file is damaged: it does not match its checksum)")
        )
    if header.get("digest") != tensor_digest(tensors, header):
        raise ModelFileError(
            f"{path}: the header and tensors do not match their checksum; the file was modified or damaged"
        )
    return tensors, header
