"""The one progress-bar rule: a tqdm bar, shown when asked or, by default, when stderr is a
terminal (so logs and CI output stay clean)."""

from __future__ import annotations

import sys


def progress_bar(total: int, description: str, unit: str, progress: bool | None, *, leave: bool = True):
    """A tqdm bar over ``total`` ``unit`` s; ``progress`` True / False shows / hides it, None shows
    it only on a terminal. tqdm is imported here, so modules that use this stay light to import."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, desc=description, unit=unit, disable=not show, leave=leave)
