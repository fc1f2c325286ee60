"""One C++ runtime per process: a build that would put its own libstdc++ into the module is
refused (cmake/cxx_runtime.cmake), and the module that was built shares torch's.

The refusal is exercised the two ways a static runtime arrives: flags (LDFLAGS=-static-libstdc++)
and a compiler that adds it itself (a wrapper script standing in for a GCC configured that way).
Configuring stops at the probe, before torch or pybind11 are looked for, so each case takes a
second; the check of a linked module is run on a library linked statically on purpose.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastad

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cmake" / "cxx_runtime.cmake"
VENV_BIN = Path(sys.executable).parent

CMAKE = shutil.which("cmake", path=str(VENV_BIN)) or shutil.which("cmake")
NINJA = shutil.which("ninja", path=str(VENV_BIN)) or shutil.which("ninja")
GXX = shutil.which("g++")
READELF = shutil.which("readelf")


def _has_static_libstdcxx() -> bool:
    """Whether g++ can link libstdc++ statically at all (Fedora/RHEL need libstdc++-static)."""
    if not GXX:
        return False
    out = subprocess.run([GXX, "-print-file-name=libstdc++.a"], capture_output=True, text=True, timeout=60)
    return os.path.isabs(out.stdout.strip())


needs_toolchain = pytest.mark.skipif(
    not (CMAKE and GXX and READELF and sys.platform.startswith("linux") and _has_static_libstdcxx()),
    reason="needs Linux with cmake, g++, readelf (binutils) and a static libstdc++ to refuse",
)
REFUSAL = "torch's libraries use the shared libstdc++.so.6"


def _configure(build_dir: Path, env_extra: dict[str, str], extra: list[str] = ()) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CXX", "LDFLAGS", "CXXFLAGS", "CMAKE_TOOLCHAIN_FILE") and not k.startswith("CMAKE_GENERATOR")
    }
    env.update(env_extra)
    cmd = [CMAKE, "-S", str(ROOT), "-B", str(build_dir), "-DFASTAD_CUDA=off", *extra]
    if NINJA:
        cmd += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={NINJA}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _message(result: subprocess.CompletedProcess) -> str:
    """CMake folds long messages over lines; unfold to compare sentences."""
    return " ".join((result.stdout + result.stderr).split())


@needs_toolchain
def test_configure_refuses_static_libstdcxx_in_ldflags(tmp_path):
    result = _configure(tmp_path / "build", {"LDFLAGS": "-static-libstdc++"})
    text = _message(result)
    assert result.returncode != 0, text
    assert (
        "fastad: a library linked like the extension carries its own copy of the C++ runtime "
        "(libstdc++ linked statically)" in text
    )
    assert "linker flags '-static-libstdc++'" in text
    assert REFUSAL in text and "remove -static-libstdc++" in text
    assert "Configuring incomplete" in text
    assert not list((tmp_path / "build").glob("**/_C*.so"))


@needs_toolchain
def test_configure_refuses_a_compiler_that_links_the_runtime_statically(tmp_path):
    wrapper = tmp_path / "g++-static-runtime"
    wrapper.write_text(f'#!/bin/sh\nexec "{GXX}" "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    result = _configure(tmp_path / "build", {"CXX": str(wrapper)})
    text = _message(result)
    assert result.returncode != 0, text
    assert f"The C++ compiler is {wrapper} (GNU " in text
    assert "carries its own copy of the C++ runtime" in text
    if Path("/usr/bin/g++").exists():  # a compiler here that does link the shared runtime is named
        assert "(/usr/bin/g++ here links the shared runtime: CXX=/usr/bin/g++)" in text


@needs_toolchain
def test_configure_accepts_the_shared_runtime_and_checks_the_linked_module(tmp_path):
    """Plain flags pass the probe, configuring completes, and the build checks _C after linking."""
    pybind11 = pytest.importorskip("pybind11")
    if not NINJA:
        pytest.skip("needs ninja to read the generated build")
    result = _configure(
        tmp_path / "build", {}, [f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    )
    text = _message(result)
    assert result.returncode == 0, text
    assert "fastad: the extension links the shared C++ runtime (checked with" in text
    assert REFUSAL not in text
    rules = (tmp_path / "build" / "build.ninja").read_text()
    assert f"-P {SCRIPT}" in rules and "-DFASTAD_MODULE=" in rules and "_C" in rules


def _run_module_check(module: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CMAKE,
            f"-DFASTAD_MODULE={module}",
            f"-DFASTAD_READELF={READELF}",
            "-DFASTAD_COMPILER_DESC=g++ (test)",
            "-P",
            str(SCRIPT),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _link_module(folder: Path, *flags: str) -> Path:
    """A small shared library that formats a number with a C++ stream, linked with ``flags``."""
    source = folder / "m.cpp"
    source.write_text(
        "#include <sstream>\n#include <string>\n"
        "std::string f(long v) { std::ostringstream s; s << v; return s.str(); }\n"
    )
    module = folder / "_C.so"
    subprocess.run(
        [GXX, "-fPIC", "-shared", str(source), "-o", str(module), *flags], check=True, capture_output=True, timeout=120
    )
    return module


@needs_toolchain
def test_linked_module_with_its_own_runtime_is_refused_and_deleted(tmp_path):
    module = _link_module(tmp_path, "-static-libstdc++")
    result = _run_module_check(module)
    text = _message(result)
    assert result.returncode != 0
    assert f"fastad: the linked module {module} carries its own copy of the C++ runtime" in text
    assert not module.exists(), "a refused module must not be left for an install step to pick up"


@needs_toolchain
def test_linked_module_with_the_shared_runtime_passes(tmp_path):
    module = _link_module(tmp_path)
    result = _run_module_check(module)
    assert result.returncode == 0, _message(result)
    assert module.exists()


@needs_toolchain
def test_an_unreadable_module_is_not_passed_and_not_deleted(tmp_path):
    module = tmp_path / "_C.so"
    module.write_bytes(b"not an ELF file")
    result = _run_module_check(module)
    assert result.returncode != 0
    assert "cannot check which C++ runtime the linked module uses" in _message(result)
    assert module.exists()


@needs_toolchain
def test_the_installed_module_passes_the_check(tmp_path):
    installed = Path(fastad._C.__file__)
    copy = tmp_path / installed.name  # the check deletes what it refuses: never run it on the original
    shutil.copy2(installed, copy)
    result = _run_module_check(copy)
    assert result.returncode == 0, _message(result)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_cxx_runtime_in_the_process():
    """torch and fastad loaded: exactly one libstdc++ is mapped, and error messages come out whole
    (a second runtime cut them at the first number)."""
    code = (
        "import torch, fastad\n"
        "maps = {line.split()[-1] for line in open('/proc/self/maps') if 'libstdc++' in line}\n"
        "print(len(maps))\n"
        "try:\n"
        "    fastad.ops.knn(torch.zeros(3, 4), torch.zeros(5, 4), 6)\n"
        "except Exception as exc:\n"
        "    print(str(exc))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "1"
    assert lines[1] == "k must be between 1 and the number of bank rows (5), got k = 6"
