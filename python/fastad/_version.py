"""fastad's version, for the modules that record it (model files, results) without importing the
top-level package, which imports them."""

from __future__ import annotations

from ._loader import load_compiled_library

__version__: str = load_compiled_library().build_info()["version"]
