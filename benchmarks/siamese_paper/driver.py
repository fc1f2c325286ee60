"""The driver: runs the experiments in order and keeps ``results.json`` up to date."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastad import __version__
from fastad.io import write_json

from .aerial import aerial
from .cifar import cifar_learning_curve
from .common import Run, Skip
from .config import EXPERIMENTS, ReproduceConfig
from .mnist import mnist_clustering
from .mosaic import mosaic


def reproduce(
    out_dir: str | os.PathLike, config: ReproduceConfig | None = None, *, log: Callable[[str], Any] = print
) -> dict[str, Any]:
    """Runs the four experiments (module docstring) and writes their figures and
    ``out_dir/results.json`` (rewritten after each experiment, so a long run that stops keeps
    what it finished). Returns the results: one entry per name of :data:`EXPERIMENTS`, each
    with ``status`` ("done" or "skipped"), ``reason`` when skipped, ``seconds``, ``figures`` and
    its numbers; plus ``config``, ``fastad_version``, ``torch_version``, ``torch_threads``,
    ``seconds``."""
    config = ReproduceConfig() if config is None else config
    if not isinstance(config, ReproduceConfig):
        raise TypeError(f"config must be a ReproduceConfig or None, got {type(config).__name__}")
    config.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(out_dir, config, log)
    results: dict[str, Any] = {
        "config": {**config.to_dict(), "data_root": str(run.data_root)},
        "fastad_version": __version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "finished": False,
    }
    steps = {
        "mnist_clustering": mnist_clustering,
        "cifar_learning_curve": cifar_learning_curve,
        "mosaic": mosaic,
        "aerial": aerial,
    }
    start = time.perf_counter()
    for name in EXPERIMENTS:
        if name not in config.experiments:
            results[name] = {"status": "skipped", "reason": "not selected (experiments setting)", "seconds": 0.0}
            continue
        log(f"[{name}] starting")
        began = time.perf_counter()
        try:
            entry = {"status": "done", **steps[name](run)}
        except Skip as skip:
            entry = {"status": "skipped", "reason": str(skip)}
            log(f"[{name}] skipped: {skip}")
            if name == "cifar_learning_curve":
                run.cifar_skip_reason = str(skip)
        entry["seconds"] = time.perf_counter() - began
        results[name] = entry
        if entry["status"] == "done":
            log(f"[{name}] done in {entry['seconds']:.1f} s")
        write_json(out_dir / "results.json", results)
    results["seconds"] = time.perf_counter() - start
    results["finished"] = True
    write_json(out_dir / "results.json", results)
    return results
