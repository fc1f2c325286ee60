"""Model files of a model split across the processes of a torch.distributed group (a PatchCore
bank left on the processes that chose it, ``shard_bank``).

Every process writes its part of the learned state to a part file beside the model path,
``<stem>.part-<i>-of-<n><suffix>``; then process 0 writes the model path itself: an ordinary
model file with everything the processes share, whose header lists the parts by name and
checksum. Loading the model path reads the parts it names (all of them, or only this process's
in a group of the same size) and refuses a part that is missing, edited or from another save.
A part file alone is not a model and does not load as one.

Each write is atomic (``fastad.io``); a process that fails to write makes every process raise,
and the model path is then not written (an older model there keeps its old parts' checksums,
which the new parts no longer match, so it fails to load rather than mixing two saves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .. import io as model_io

PART = "part"  # the header entry of a part file: {"index", "count", "model"}
PARTS = "parts"  # the header entry of a model file whose state is split: {"count", "files": [{"file", "digest"}]}


def part_path(path: Path, index: int, count: int) -> Path:
    """Where part ``index`` (0-based) of ``count`` of the model at ``path`` is written."""
    return path.with_name(f"{path.stem}.part-{index + 1}-of-{count}{path.suffix}")


def _agree(outcome: Any, what: str) -> list:
    """Every process's ``outcome`` (a value, or an exception raised here): raises on every process
    when any of them failed, naming which."""
    results = distributed.all_gather_objects(
        outcome if not isinstance(outcome, BaseException) else ("failed", f"{type(outcome).__name__}: {outcome}")
    )
    failed = [
        f"process {r}: {res[1]}"
        for r, res in enumerate(results)
        if isinstance(res, tuple) and len(res) == 2 and res[0] == "failed"
    ]
    if failed:
        if isinstance(outcome, BaseException):
            raise OSError(f"{what} failed; " + "; ".join(failed)) from outcome
        raise OSError(f"{what} failed; " + "; ".join(failed))
    return results


def write_split_model(
    path: str | Path,
    shared: dict[str, torch.Tensor],
    header: dict[str, Any],
    part_tensors: dict[str, torch.Tensor],
    part_header: dict[str, Any],
) -> Path:
    """Collective: every process of the group calls it with its own ``part_tensors`` and
    ``part_header`` (its part's learned state) and the same ``shared`` tensors and ``header``.
    Returns ``path``."""
    path = Path(path)
    rank, size = distributed.world()
    mine = part_path(path, rank, size)
    try:
        _, digest = model_io.write_model_file(
            mine, part_tensors, dict(part_header, **{PART: {"index": rank, "count": size, "model": path.name}})
        )
        outcome: Any = (mine.name, digest)
    except Exception as exc:  # noqa: BLE001 - every process must learn of it, then it is raised
        outcome = exc
    parts = _agree(outcome, f"writing the parts of {path}")
    outcome = path
    if rank == 0:
        try:
            files = [{"file": name, "digest": digest} for name, digest in parts]
            model_io.save_model_file(path, shared, dict(header, **{PARTS: {"count": size, "files": files}}))
        except Exception as exc:  # noqa: BLE001 - as above
            outcome = exc
    _agree(outcome if isinstance(outcome, BaseException) else "ok", f"writing {path}")
    return path


def _check_parts_entry(path: Path, entry: Any) -> list[dict[str, str]]:
    files = entry.get("files") if isinstance(entry, dict) else None
    count = entry.get("count") if isinstance(entry, dict) else None
    if (
        isinstance(count, bool)
        or not isinstance(count, int)
        or count < 1
        or not isinstance(files, list)
        or len(files) != count
        or not all(
            isinstance(f, dict) and isinstance(f.get("file"), str) and isinstance(f.get("digest"), str) for f in files
        )
    ):
        raise model_io.ModelFileError(f"{path}: the header's {PARTS!r} entry is malformed ({entry!r:.120})")
    for f in files:
        if Path(f["file"]).name != f["file"] or f["file"] in ("", ".", ".."):
            raise model_io.ModelFileError(f"{path}: part file {f['file']!r} is not a plain file name beside the model")
    return files


def read_parts(
    path: str | Path, header: dict[str, Any]
) -> tuple[list[tuple[dict[str, torch.Tensor], dict[str, Any]]], bool]:
    """The parts the model file at ``path`` (its ``header`` read already) names: ``(parts,
    whole)``, each part ``(tensors, header)``. In a process group of the parts' count, only this
    process's part (``whole`` False); anywhere else all of them in order, to be joined
    (``whole`` True). Raises ModelFileError for a part that is missing, damaged or not the
    one the model file names."""
    path = Path(path)
    files = _check_parts_entry(path, header[PARTS])
    count = len(files)
    rank, size = distributed.world()
    own = size == count and count > 1
    chosen = [rank] if own else range(count)
    parts = []
    for index in chosen:
        file = path.parent / files[index]["file"]
        try:
            tensors, part = model_io.load_model_file(file)
        except FileNotFoundError:
            raise model_io.ModelFileError(
                f"{path} is split in {count} part files and part {index + 1}, {file}, "
                "is missing: copy every part file beside the model file"
            ) from None
        label = part.get(PART)
        if (
            part.get("digest") != files[index]["digest"]
            or not isinstance(label, dict)
            or label.get("index") != index
            or label.get("count") != count
        ):
            raise model_io.ModelFileError(
                f"{file} is not part {index + 1} of {count} that {path} was saved with "
                "(replaced by another save, or edited)"
            )
        if part.get("method") != header.get("method"):
            raise model_io.ModelFileError(
                f"{file} holds part of a {part.get('method')!r} model, not {header.get('method')!r}"
            )
        parts.append((tensors, part))
    return parts, not own
