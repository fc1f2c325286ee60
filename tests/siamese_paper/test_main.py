"""``python -m benchmarks.siamese_paper``: settings from the command line, checked before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.siamese_paper.__main__ import main
from fastad.cli import main as fastad_main

ROOT = Path(__file__).parents[2]


def test_reproduce_takes_settings_and_names_unknown_ones(tmp_path, capsys):
    # Every ReproduceConfig field is a --set; a bad one fails before any work, naming it.
    assert (
        main(
            [
                "--out",
                str(tmp_path / "a"),
                "--data",
                str(tmp_path / "none"),
                "--quick",
                "--set",
                "nosuch=1",
            ]
        )
        != 0
    )
    assert "nosuch" in capsys.readouterr().err
    assert (
        main(
            [
                "--out",
                str(tmp_path / "b"),
                "--data",
                str(tmp_path / "none"),
                "--quick",
                "--set",
                "mosaic_images=val",
            ]
        )
        != 0
    )
    assert "mosaic_images" in capsys.readouterr().err
    # Valid settings with no data: every experiment is recorded as skipped, with its reason.
    assert (
        main(
            [
                "--out",
                str(tmp_path / "c"),
                "--data",
                str(tmp_path / "none"),
                "--quick",
                "--set",
                "mnist_epochs=2",
                "--set",
                "mnist_similar_fraction=0.5",
                "--set",
                "experiments=mnist_clustering, cifar_learning_curve",  # a list: comma-separated names
                "--set",
                'mnist_variants=["concat_bce"]',  # or JSON
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["config"]["mnist_epochs"] == 2 and results["config"]["mnist_similar_fraction"] == 0.5
    assert results["config"]["experiments"] == ["mnist_clustering", "cifar_learning_curve"]
    assert results["config"]["mnist_variants"] == ["concat_bce"]
    assert results["mosaic"]["reason"] == "not selected (experiments setting)"
    assert "MNIST not found" in results["mnist_clustering"]["reason"]
    argv = ["--out", str(tmp_path / "d"), "--quick", "--set", "mnist_variants=concat"]
    assert main(argv) != 0
    assert "mnist_variants: unknown 'concat'" in capsys.readouterr().err


def test_the_experiments_are_no_longer_a_fastad_command(tmp_path, capsys):
    # They moved out of the library; python -m benchmarks.siamese_paper runs them from a checkout.
    with pytest.raises(SystemExit):
        fastad_main(["siamese", "reproduce", "--out", str(tmp_path)])
    assert "invalid choice: 'reproduce'" in capsys.readouterr().err
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.siamese_paper", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and "--cifar-model" in done.stdout
