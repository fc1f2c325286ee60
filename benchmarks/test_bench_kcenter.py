"""Greedy k-center: fastad.ops.kcenter_greedy against anomalib's loop and the float64 reference.

The acceptance shape is PatchCore's coreset step: N = 200,000 patch features of D = 128 (after a
random projection, as anomalib does), k = 2,000 centres. Inputs:

  random     standard normal rows, the case where every row keeps being a candidate;
  clustered  real CNN features: EfficientNet-Lite0 block2+block4 patch features (as
             python/fastad/demo.py builds its bank) of the synthetic data set, Gaussian-projected
             from 152 to 128 dimensions; a Gaussian mixture stands in where torchvision/timm or the
             weights are missing (the group name says which). The features take about a minute
             to compute and are kept in pytest's cache folder for the next run;
  line, plane  rows on a line and on a plane inside R^128: the slowest inputs found for fastad
             (its lazy bounds prune least there), timed for fastad alone.

anomalib's loop costs the same on any data (one full pass per step); it runs once, in full, on
random and clustered. The float64 reference costs about twice as much per step, so it is timed on
its first REFERENCE_STEPS steps only, in a group of its own: multiply by K / REFERENCE_STEPS for
the whole selection.
Run with `make bench` (or `pytest benchmarks -k kcenter --benchmark-only`).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastad
from fastad import reference

from .baselines import anomalib_kcenter_greedy
from .conftest import cuda_synced, with_environment

N, D, K = 200_000, 128, 2_000
REFERENCE_STEPS = 100
CUDA_OK = fastad.build_info()["cuda"] and torch.cuda.is_available()
HAS_VISION = all(importlib.util.find_spec(m) is not None for m in ("torchvision", "timm"))


def _projected(features: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian random projection of (n, C) rows to D dimensions, float32 contiguous."""
    proj = torch.randn(features.shape[1], D, generator=gen) / D**0.5
    return (features @ proj).contiguous()


def _cnn_features(folder) -> torch.Tensor:
    """(N, 152) EfficientNet-Lite0 patch features of synthetic 256x256 images, 1024 per image."""
    import torch.nn.functional as F

    from fastad.data import make_synthetic_dataset, open_dataset
    from fastad.features import FeatureExtractor, load_backbone

    images_needed = -(-N // 1024)
    root = make_synthetic_dataset(
        folder / "grass", seed=1, texture="grass", n_train=images_needed, n_test_good=1, n_test_per_defect=1
    )
    train = open_dataset(root, "train")
    layers = ["block2", "block4"]
    extractor = FeatureExtractor(load_backbone("efficientnet_lite0"), layers, batch_size=16)
    feats = extractor(torch.stack([train[i]["image"] for i in range(len(train))]))
    first = F.avg_pool2d(feats[layers[0]], 3, 1, 1)
    deeper = F.interpolate(
        F.avg_pool2d(feats[layers[1]], 3, 1, 1), size=first.shape[-2:], mode="bilinear", align_corners=False
    )
    patches = torch.cat([first, deeper], dim=1)
    return patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])[:N].clone()


def _mixture(gen: torch.Generator) -> torch.Tensor:
    """N rows from 500 Gaussian blobs (centres 3 * normal, spread 0.5 * normal), float32."""
    centres = 3.0 * torch.randn(500, D, generator=gen)
    return (centres[torch.randint(0, 500, (N,), generator=gen)] + 0.5 * torch.randn(N, D, generator=gen)).contiguous()


@pytest.fixture(scope="module")
def clustered(request, tmp_path_factory) -> tuple[str, torch.Tensor]:
    """(name, (N, D) float32): projected CNN features, or a Gaussian mixture without them."""
    gen = torch.Generator().manual_seed(0)
    if not HAS_VISION:
        return "gaussian-mixture", _mixture(gen)
    cache = getattr(request.config, "cache", None)
    path = cache.mkdir("fastad-kcenter") / f"effnet-lite0-features-{N}.pt" if cache else None
    if path is not None and path.exists():
        features = torch.load(path, weights_only=True)
    else:
        try:
            features = _cnn_features(tmp_path_factory.mktemp("kcenter-data"))
        except (ImportError, OSError, RuntimeError) as exc:  # weights not installed, no disk space...
            print(f"CNN features unavailable ({exc}); using a Gaussian mixture")
            return "gaussian-mixture", _mixture(gen)
        if path is not None:
            torch.save(features, path)
    return "effnet-lite0-features", _projected(features, gen)


def make_inputs(kind: str, request) -> tuple[str, torch.Tensor]:
    """(name, (N, D) float32 rows) of one input kind; the clustered ones come from the fixture."""
    gen = torch.Generator().manual_seed(0)
    if kind == "random":
        return kind, torch.randn(N, D, generator=gen)
    if kind == "clustered":
        return request.getfixturevalue("clustered")
    if kind == "line":
        direction = torch.randn(1, D, generator=gen)
        return kind, (torch.rand(N, 1, generator=gen) * direction / direction.norm()).contiguous()
    return kind, (torch.randn(N, 2, generator=gen) @ torch.randn(2, D, generator=gen)).contiguous()


CONTENDERS = {
    "fastad.ops.kcenter_greedy": (lambda x: fastad.ops.kcenter_greedy(x, K), 3),
    "anomalib KCenterGreedy loop": (lambda x: anomalib_kcenter_greedy(x, K), 1),
}


@pytest.mark.parametrize("kind", ["random", "clustered", "line", "plane"])
@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_kcenter_cpu(benchmark, record, contender, kind, request):
    if contender != "fastad.ops.kcenter_greedy" and kind in ("line", "plane"):
        pytest.skip("the worst cases found for fastad are timed for fastad alone")
    name, x = make_inputs(kind, request)
    fn, rounds = CONTENDERS[contender]
    benchmark.group = f"kcenter cpu {name} N={N} D={D} k={K}"
    benchmark.pedantic(fn, args=(x,), rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)
    record(benchmark, benchmark.group, contender, 0.0)


def test_kcenter_cpu_float64_reference_prefix(benchmark, record, request):
    _, x = make_inputs("random", request)
    benchmark.group = f"kcenter cpu random N={N} D={D}: float64 reference, first {REFERENCE_STEPS} of {K} steps"
    benchmark.pedantic(lambda: reference.kcenter_greedy(x, REFERENCE_STEPS), rounds=1, iterations=1)
    record(benchmark, benchmark.group, "fastad.reference.kcenter_greedy (float64)", 0.0)


# (N, k) on the GPU: PatchCore's coreset step and a ten times larger selection from a 1M-row set
CUDA_CASES = [(N, K), (1_000_000, 10_000)]


CUDA_CONTENDERS = {
    "fastad.ops.kcenter_greedy": fastad.ops.kcenter_greedy,
    # opt-in until a GPU run verifies it
    "fastad.ops.kcenter_greedy (pruned path)": with_environment(
        fastad.ops.kcenter_greedy, "FASTAD_KCENTER_CUDA_PATH", "pruned"
    ),
    "anomalib KCenterGreedy loop": anomalib_kcenter_greedy,
}


def cuda_group(n: int, k: int) -> str:
    """The summary group of a CUDA case (benchmarks/gpu_summary.py reads it)."""
    return f"kcenter cuda random N={n} D={D} k={k}"


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fastad's CUDA kernels")
@pytest.mark.parametrize("n,k", CUDA_CASES, ids=[f"N{n}-k{k}" for n, k in CUDA_CASES])
@pytest.mark.parametrize("contender", list(CUDA_CONTENDERS))
def test_kcenter_cuda(benchmark, record, contender, n, k):
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(0)).cuda()
    select = CUDA_CONTENDERS[contender]
    benchmark.group = cuda_group(n, k)
    benchmark.pedantic(cuda_synced(lambda x: select(x, k)), args=(x,), rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, contender, 0.0)
