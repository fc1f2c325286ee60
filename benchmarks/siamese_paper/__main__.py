"""``python -m benchmarks.siamese_paper``: the four experiments from the command line; prints the
headline numbers and leaves the figures and ``results.json`` in ``--out``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fastad.cli_args import CliError, parse_sets
from fastad.io import output_folder
from fastad.siamese import PRETRAINED_PATH

from .config import ReproduceConfig
from .driver import reproduce


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.siamese_paper",
        description="the Siamese network paper's four experiments; figures and results.json",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--data", default="../shared/data", help="data root (default ../shared/data)")
    parser.add_argument(
        "--cifar-model", help="reuse this trained CIFAR-10 model ('shipped' = fastad's) instead of training"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run (minutes) to check the pipeline, not the numbers"
    )
    parser.add_argument("--device")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any ReproduceConfig field (e.g. mnist_epochs=5, mnist_similar_fraction=0.5, "
        "mosaic_images=test, cifar_epochs=20, experiments=mnist_clustering, "
        "mnist_variants=concat_bce,distance_bce); repeatable, applied after --quick",
    )
    return parser


def _config(args: argparse.Namespace) -> ReproduceConfig:
    config = ReproduceConfig.quick() if args.quick else ReproduceConfig()
    fields = {f.name for f in dataclasses.fields(ReproduceConfig)}
    for name, value in parse_sets(args.set or []).items():
        if name not in fields:
            raise CliError(f"--set {name}: not a setting of the reproduction; known: {', '.join(sorted(fields))}")
        if isinstance(value, str) and isinstance(getattr(config, name), tuple):
            value = [part.strip() for part in value.split(",")]  # experiments=mosaic,aerial
        setattr(config, name, tuple(value) if isinstance(value, list) else value)
    config.data_root = Path(args.data)
    if args.cifar_model:
        config.cifar_model = PRETRAINED_PATH if args.cifar_model == "shipped" else Path(args.cifar_model)
    if args.device:
        config.device = args.device
    return config


def headline(results: dict) -> dict:
    """The numbers worth a glance: every number and string at the top two levels of the results."""
    picked_all = {}
    for name, value in results.items():
        if isinstance(value, dict):
            picked = {k: v for k, v in value.items() if isinstance(v, (float, int, str)) and not isinstance(v, bool)}
            if picked:
                picked_all[name] = picked
    return picked_all


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _config(args)
        out_dir = output_folder(args.out)
        results = reproduce(out_dir, config)
    except (CliError, ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"siamese_paper: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(headline(results), indent=2))
    print(f"figures and results.json in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
