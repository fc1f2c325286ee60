"""`import fastad` stays light: the heavy optional libraries load only when a feature needs them
(a CPU-only torch has no torchvision, and a kernel user should not pay for matplotlib)."""

from __future__ import annotations

import subprocess
import sys


def test_import_fastad_loads_no_optional_library():
    code = (
        "import sys, fastad, fastad.methods, fastad.io\n"
        "heavy = [m for m in ('torchvision', 'timm', 'matplotlib', 'skimage', 'sklearn') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import fastad loaded {out.stdout.strip()}"


def _imports_of(path):
    """(module imported, names) for every import statement of a source file, relative imports
    resolved against the file's package."""
    import ast
    from pathlib import Path

    import fastad

    root = Path(fastad.__file__).parent
    package = ["fastad", *path.relative_to(root).parent.parts]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield module, [alias.name for alias in node.names]


def test_imports_run_one_way():
    """The library's modules import downwards: none imports the top-level package (which imports
    them), and the command-line modules are imported by nothing but the entry points."""
    from pathlib import Path

    import fastad

    root = Path(fastad.__file__).parent
    entry_points = {root / "cli.py", root / "__main__.py", root / "demo.py"}
    wrong = []
    for path in sorted(root.rglob("*.py")):
        if path in entry_points or path.name == "__init__.py" and path.parent == root:
            continue
        for module, names in _imports_of(path):
            # "from .. import viz" takes a submodule; "import fastad" or "from fastad import
            # PatchCore" takes the top-level package's own namespace.
            submodules = [n for n in names if (root / f"{n}.py").is_file() or (root / n / "__init__.py").is_file()]
            top_level = module == "fastad" and (not names or len(submodules) < len(names))
            if top_level or module == "fastad.cli":
                wrong.append(f"{path.relative_to(root)} imports {module} {names}")
    assert not wrong, "\n".join(wrong)
