"""`make demo`: what was built, the kNN op against torch.cdist, and anomaly detection on the
embedded synthetic data set.

Until the methods land, the detector is the nearest-patch baseline at the heart of PatchCore and
SPADE, written out with the shared layer: EfficientNet-Lite0 features (the one backbone whose
weights install offline), every training patch in the bank, each test patch scored by its
distance to the nearest bank patch through ``fastad.ops.knn``, maps upsampled and blurred, and
the image AUROC, pixel AUROC and AUPRO of the result.

    python -m fastad.demo [--data DIR] [--texture grass|brick|gravel] [--seed N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import fastad


def _best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def show_build() -> None:
    info = fastad.build_info()
    print("fastad build:")
    for key, value in info.items():
        if key != "parallel_info":  # ATen's multi-line report; fastad.build_info() has it
            print(f"  {key:14s} {value}")


def knn_against_cdist() -> None:
    torch.manual_seed(0)
    m, n, d, k = 2048, 16384, 384, 9
    query, bank = torch.randn(m, d), torch.randn(n, d)
    print(f"\nkNN, M={m} N={n} D={d} k={k}, CPU float32:")
    dist, idx = fastad.ops.knn(query, bank, k)

    def cdist_topk():
        return torch.cdist(query, bank).topk(k, dim=1, largest=False)

    ref = cdist_topk()
    same = (idx == ref.indices).float().mean().item()
    err = (dist - ref.values).abs().max().item()
    t_ours = _best_of(lambda: fastad.ops.knn(query, bank, k))
    t_cdist = _best_of(cdist_topk)
    print(f"  fastad.ops.knn      {t_ours * 1e3:8.1f} ms")
    print(f"  torch.cdist + topk  {t_cdist * 1e3:8.1f} ms   ({t_cdist / t_ours:.2f}x fastad's time)")
    print(f"  same indices: {same:.4%}   max |distance difference|: {err:.2e}")


def _patches(extractor, images: torch.Tensor, layers: list[str]) -> torch.Tensor:
    """(B, C, h, w) patch features: each layer averaged over 3x3 neighbourhoods, the deeper one
    upsampled to the first one's grid, concatenated along channels."""
    feats = extractor(images)
    first = feats[layers[0]]
    maps = [torch.nn.functional.avg_pool2d(first, 3, 1, 1)]
    for name in layers[1:]:
        f = torch.nn.functional.avg_pool2d(feats[name], 3, 1, 1)
        maps.append(torch.nn.functional.interpolate(f, size=first.shape[-2:], mode="bilinear", align_corners=False))
    return torch.cat(maps, dim=1)


def anomaly_detection(data: Path, texture: str, seed: int) -> None:
    try:
        from .features import FeatureExtractor, load_backbone
    except ImportError as exc:
        print(f"\nanomaly detection skipped: {exc}")
        return
    from . import metrics, postprocess
    from .data import make_synthetic_dataset, open_dataset

    root = make_synthetic_dataset(data / f"{texture}-seed{seed}", seed=seed, texture=texture)
    train, test = open_dataset(root, "train"), open_dataset(root, "test")
    print(f"\nsynthetic data set {root}: {len(train)} good training images, {len(test)} test images "
          f"({', '.join(test.defect_types)})")

    layers = ["block2", "block4"]
    extractor = FeatureExtractor(load_backbone("efficientnet_lite0"), layers, batch_size=16)
    start = time.perf_counter()
    train_images = torch.stack([train[i]["image"] for i in range(len(train))])
    bank = _patches(extractor, train_images, layers)
    bank = bank.permute(0, 2, 3, 1).reshape(-1, bank.shape[1]).contiguous()
    t_fit = time.perf_counter() - start

    items = [test[i] for i in range(len(test))]
    images = torch.stack([it["image"] for it in items])
    start = time.perf_counter()
    patches = _patches(extractor, images, layers)
    b, c, h, w = patches.shape
    query = patches.permute(0, 2, 3, 1).reshape(-1, c).contiguous()
    t_feat = time.perf_counter() - start
    t_knn = _best_of(lambda: fastad.ops.knn(query, bank, 1), repeats=2)
    dist, _ = fastad.ops.knn(query, bank, 1)
    # The pure-PyTorch way, in query chunks so that it too stays within a few hundred MB.
    t_cdist = _best_of(lambda: [torch.cdist(q, bank).min(dim=1) for q in query.split(2048)], repeats=1)

    patch_maps = dist[:, 0].reshape(b, h, w)
    scores = patch_maps.amax(dim=(1, 2))
    maps = postprocess.anomaly_maps(patch_maps, tuple(images.shape[-2:]), sigma=4.0)
    labels = torch.tensor([it["label"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    print(f"nearest-patch detector on EfficientNet-Lite0 {'+'.join(layers)} ({c}-dim patches, "
          f"bank of {bank.shape[0]} patches, built in {t_fit:.1f} s):")
    print(f"  image AUROC {metrics.image_auroc(labels, scores):.3f}   pixel AUROC "
          f"{metrics.pixel_auroc(masks, maps):.3f}   AUPRO {metrics.aupro(masks, maps):.3f}")
    print(f"  nearest bank patch of {query.shape[0]} test patches: fastad.ops.knn {t_knn * 1e3:.0f} ms, "
          f"chunked torch.cdist + min {t_cdist * 1e3:.0f} ms ({t_cdist / t_knn:.1f}x); features {t_feat * 1e3:.0f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("build/demo-data"), help="where the synthetic data set goes")
    parser.add_argument("--texture", default="grass", help="grass (default), brick or gravel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    show_build()
    knn_against_cdist()
    anomaly_detection(args.data, args.texture, args.seed)


if __name__ == "__main__":
    main()
