"""`import fastad` stays light: the heavy optional libraries load only when a feature needs them
(a CPU-only torch has no torchvision, and a kernel user should not pay for matplotlib)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fastad


def test_import_fastad_loads_no_optional_library():
    code = (
        "import sys, fastad, fastad.methods, fastad.io\n"
        "heavy = [m for m in ('torchvision', 'timm', 'matplotlib', 'skimage', 'sklearn') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import fastad loaded {out.stdout.strip()}"


def _library_files():
    root = Path(fastad.__file__).parent
    return root, sorted(root.rglob("*.py"))


def _imports_of(path: Path, root: Path):
    """(module imported, names, inside a function) for every import statement of a source file,
    relative imports resolved against the file's package."""
    package = ["fastad", *path.relative_to(root).parent.parts]
    tree = ast.parse(path.read_text())
    nested = {
        id(node)
        for scope in ast.walk(tree)
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(scope)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], id(node) in nested
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield module, [alias.name for alias in node.names], id(node) in nested


def test_imports_run_one_way():
    """The library's modules import downwards: none imports the top-level package (which imports
    them), the command-line modules are imported by nothing but the entry points, and fastad's
    own modules are imported at the top of a file, never inside a function (no circle needs it;
    a function-local import of a sibling hides the structure)."""
    root, files = _library_files()
    entry_points = {root / "cli.py", root / "__main__.py"}
    wrong = []
    for path in files:
        if path.name == "__init__.py" and path.parent == root:
            continue
        for module, names, in_function in _imports_of(path, root):
            # "from .. import viz" takes a submodule; "import fastad" or "from fastad import
            # PatchCore" takes the top-level package's own namespace.
            submodules = [n for n in names if (root / f"{n}.py").is_file() or (root / n / "__init__.py").is_file()]
            top_level = module == "fastad" and (not names or len(submodules) < len(names))
            if top_level or (module == "fastad.cli" and path not in entry_points):
                wrong.append(f"{path.relative_to(root)} imports {module} {names}")
            if in_function and (module == "fastad" or module.startswith("fastad.")):
                wrong.append(f"{path.relative_to(root)} imports {module} {names} inside a function")
    assert not wrong, "\n".join(wrong)


def _module_name(path: Path, root: Path) -> str:
    parts = ["fastad", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circle():
    """The graph of module-level imports between fastad's modules has no cycle. ``from pkg
    import sub`` depends on the submodule only; ``from pkg import name`` on the package's
    ``__init__``, which a module of the package must then not be imported by."""
    root, files = _library_files()
    modules = {_module_name(path, root): path for path in files}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names, in_function in _imports_of(path, root):
            if in_function or not module.startswith("fastad"):
                continue
            subs = {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
            edges[name] |= subs
            if module in modules and (not names or len(subs) < len(names)):
                edges[name].add(module)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path_stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path_stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path_stack[path_stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path_stack.pop()
        return None

    for start in sorted(modules):
        if start not in state and (cycle := visit(start)):
            raise AssertionError("import circle: " + " -> ".join(cycle))


def test_the_benchmark_scripts_import():
    """The scripts under benchmarks/ (run as python -m benchmarks.NAME) import what the library
    offers now: a moved or renamed name fails here, not in the middle of a long run."""
    import importlib

    root = Path(__file__).parents[2] / "benchmarks"
    if not root.is_dir():
        pytest.skip("no benchmarks/ folder beside the tests (an installed copy of the tests)")
    for path in sorted(root.glob("*.py")) + sorted(root.glob("siamese_paper/*.py")):
        if path.stem in ("__init__", "conftest") or path.stem.startswith("test_"):
            continue
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        importlib.import_module(module)
