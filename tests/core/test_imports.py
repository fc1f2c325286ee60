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
