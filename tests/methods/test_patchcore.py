"""PatchCore against float64 computations of its definition on the same backbone features:
locally aware patches, the coreset bank built by streaming, nearest-patch scores and Eq. 7."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastad
from fastad import reference
from fastad.methods import AnomalyModel

from ..conftest import require_lite0

require_lite0()


def textures(n, gen, size=64):
    """Smooth random textures in [0, 1] (a CNN sees them as a consistent surface)."""
    base = torch.rand(n, 3, size // 8, size // 8, generator=gen)
    up = F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return (0.3 + 0.4 * up + 0.05 * torch.rand(n, 3, size, size, generator=gen)).clamp(0, 1)


def model(**kw):
    kw = {"backbone": "efficientnet_lite0", "resize": None, "crop": None, "holdout": 0, "batch_size": 3, **kw}
    return fastad.PatchCore(**kw)


def all_patches(m, images):
    """Every patch of ``images``, in order, extracted in the batches fit used: oneDNN's
    convolutions round differently with the batch size, and a reference built from other batches
    differs by about 1e-5 of the features' scale, enough to move a k-center near-tie."""
    step = m.batch_size
    return torch.cat(
        [m.patch_features(images[i : i + step]).reshape(-1, m.bank_.shape[1]) for i in range(0, len(images), step)]
    )


def authors_embedding(
    features: list[torch.Tensor], patchsize: int = 3, pretrain_dim: int = 1024, target_dim: int = 1024
):
    """PatchCore._embed of amazon-science/patchcore-inspection, transcribed: PatchMaker.patchify
    (an Unfold with padding), the deeper layers' patches interpolated to the first layer's grid,
    MeanMapper per layer (the flattened C x p x p patch adaptive-average-pooled to pretrain_dim),
    then the Aggregator (the layers' vectors concatenated, pooled to target_dim)."""
    unfold = torch.nn.Unfold(kernel_size=patchsize, stride=1, padding=(patchsize - 1) // 2, dilation=1)
    patches, shapes = [], []
    for f in features:
        u = unfold(f)  # (B, C p p, L)
        u = u.reshape(*f.shape[:2], patchsize, patchsize, -1).permute(0, 4, 1, 2, 3)  # (B, L, C, p, p)
        patches.append(u)
        shapes.append(f.shape[-2:])
    ref = shapes[0]
    for i in range(1, len(patches)):
        x = patches[i].reshape(patches[i].shape[0], *shapes[i], *patches[i].shape[2:])
        x = x.permute(0, 3, 4, 5, 1, 2)
        base = x.shape
        x = F.interpolate(
            x.reshape(-1, *x.shape[-2:]).unsqueeze(1), size=tuple(ref), mode="bilinear", align_corners=False
        )
        x = x.squeeze(1).reshape(*base[:-2], *ref).permute(0, 4, 5, 1, 2, 3)
        patches[i] = x.reshape(len(x), -1, *x.shape[-3:])
    flat = [x.reshape(-1, *x.shape[-3:]) for x in patches]
    mapped = torch.stack(
        [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain_dim).squeeze(1) for x in flat], dim=1
    )
    out = F.adaptive_avg_pool1d(mapped.reshape(len(mapped), 1, -1), target_dim)
    return out.reshape(len(out), -1)


def test_default_embedding_is_the_authors(rng):
    # Each layer pooled to 1024 on its own, then the layers averaged: both get half of the dims.
    x = textures(2, rng)
    m = model()
    assert (m.embedding, m.neighbourhood, m.layer_dim, m.embed_dim) == ("per_layer", 3, 1024, 1024)
    m.device = "cpu"
    feats = m._features(x)
    expected = authors_embedding([feats["block2"], feats["block4"]]).reshape(2, 8, 8, 1024)
    torch.testing.assert_close(m.patch_features(x), expected, rtol=1e-5, atol=1e-5)
    small = model(layer_dim=96, embed_dim=64)
    small.device = "cpu"
    expected = authors_embedding([feats["block2"], feats["block4"]], pretrain_dim=96, target_dim=64).reshape(
        2, 8, 8, 64
    )
    torch.testing.assert_close(small.patch_features(x), expected, rtol=1e-5, atol=1e-5)


def test_concatenated_embedding_is_averaged_upsampled_and_pooled(rng):
    x = textures(2, rng)
    m = model(neighbourhood=1, embed_dim=4096, embedding="concatenated")
    m.device = "cpu"
    feats = m._features(x)
    first, second = feats["block2"], feats["block4"]
    up = F.interpolate(second, size=first.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(m.patch_features(x), torch.cat([first, up], 1).permute(0, 2, 3, 1))

    m3 = model(embed_dim=76, embedding="concatenated")  # 152 channels -> means of consecutive pairs
    m3.device = "cpu"
    pooled = torch.cat(
        [
            F.avg_pool2d(first, 3, 1, 1),
            F.interpolate(F.avg_pool2d(second, 3, 1, 1), size=first.shape[-2:], mode="bilinear", align_corners=False),
        ],
        1,
    )
    expected = pooled.permute(0, 2, 3, 1).reshape(2, 8, 8, 76, 2).mean(-1)
    torch.testing.assert_close(m3.patch_features(x), expected)


def test_full_bank_scores_are_nearest_patch_distances(rng):
    train, test = textures(5, rng), textures(2, rng)
    m = model(coreset_ratio=1.0, reweight=False, blur_sigma=0).fit(train)
    patches = all_patches(m, train)
    assert torch.equal(m.bank_, patches)  # every patch, in order, as fit's batches extracted them
    query = m.patch_features(test).reshape(-1, patches.shape[1]).double()
    expected = torch.cdist(query, patches.double()).min(dim=1).values.reshape(2, 8, 8)
    patch_map, image_score = m._score_batch(test)
    assert image_score is None
    torch.testing.assert_close(patch_map.double(), expected, rtol=1e-4, atol=1e-4)
    squared = model(coreset_ratio=1.0, reweight=False, squared=True).fit(train)
    torch.testing.assert_close(squared._score_batch(test)[0].double(), expected.square(), rtol=1e-4, atol=1e-3)


def test_coreset_bank_is_the_greedy_selection_on_the_projection(rng):
    train = textures(7, rng)
    m = model(coreset_ratio=0.25, projection_dim=16, seed=5).fit(train)
    patches = all_patches(m, train)
    n = patches.shape[0]
    k = round(0.25 * n)
    projection = torch.randn(patches.shape[1], 16, generator=torch.Generator().manual_seed(5)) / 4.0
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(5)))
    chosen, radii = reference.kcenter_greedy(patches @ projection, k, start=start)
    assert m.n_patches_ == n and m.bank_.shape == (k, patches.shape[1])
    torch.testing.assert_close(m.bank_, patches[chosen])
    assert m.coreset_radius_ == pytest.approx(float(radii[-1]), rel=1e-4)


def test_image_score_is_the_reweighted_worst_patch(rng):
    train, test = textures(6, rng), textures(3, rng)
    m = model(coreset_ratio=0.5, num_neighbours=4).fit(train)
    bank = m.bank_.double()
    query = m.patch_features(test).reshape(3, -1, bank.shape[1]).double()
    _, scores = m._score_batch(test)
    for i in range(3):
        d = torch.cdist(query[i], bank)
        s = d.min(dim=1).values
        # The worst patch and its nearest bank patch as float64 ranks them, or any within float32
        # rounding of them: the kernel may take either side of a near-tie, and Eq. 7's weight
        # differs between them by far more than rounding.
        expected = []
        for worst in torch.nonzero(s >= s.max() * (1 - 1e-5)).flatten().tolist():
            for m_star in torch.nonzero(d[worst] <= s[worst] * (1 + 1e-5)).flatten().tolist():
                support = torch.cdist(bank[m_star][None], bank)[0].topk(4, largest=False).indices
                dist = torch.cdist(query[i][worst][None], bank[support])[0]
                weight = 1 - torch.exp(s[worst]) / torch.exp(dist).sum()
                expected.append(float(weight * s[worst]))
        assert any(float(scores[i]) == pytest.approx(e, rel=1e-4) for e in expected), (float(scores[i]), expected)


def test_a_defect_scores_higher_and_the_map_finds_it(rng):
    train = textures(8, rng)
    good, bad = textures(2, rng), textures(1, rng)
    bad[0, :, 24:40, 24:40] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    m = model().fit(train)
    pred = m.predict(torch.cat([good, bad]))
    assert float(pred.scores[2]) > float(pred.scores[:2].max())
    peak = divmod(int(pred.maps[2].argmax()), 64)
    assert 16 <= peak[0] < 48 and 16 <= peak[1] < 48


def test_half_bank_and_save_load(rng, tmp_path):
    train, test = textures(5, rng), textures(2, rng)
    full = model(coreset_ratio=0.5).fit(train)
    half = model(coreset_ratio=0.5, bank_dtype="float16").fit(train)
    assert half.bank_.dtype == torch.float16
    # Rounding a bank row to float16 moves it by at most 2^-11 of its norm, and a nearest distance
    # by as much: a bound relative to the bank's norms, not to the (smaller) distances. The maps
    # and their maxima follow that bound; Eq. 7's weight need not (its worst patch can switch
    # between two near-equal ones), so it is compared with reweighting off. A fixed 2e-3 relative
    # tolerance on the Eq. 7 scores failed on some seeds.
    bound = 2 * 2.0**-11 * float(full.bank_.norm(dim=1).max())
    full.reweight = half.reweight = False
    plain_half, plain_full = half.predict(test), full.predict(test)
    torch.testing.assert_close(plain_half.maps, plain_full.maps, rtol=0, atol=bound)
    torch.testing.assert_close(plain_half.scores, plain_full.scores, rtol=0, atol=bound)
    full.reweight = True
    loaded = AnomalyModel.load(full.save(tmp_path / "pc.safetensors"))
    assert isinstance(loaded, fastad.PatchCore)
    a, b = full.predict(test), loaded.predict(test)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_prepared_bank_follows_the_bank(rng):
    # Scoring searches a prepared copy of the bank (ops.knn_prepare); replacing the bank or
    # changing it in place must give the scores of the new bank, never of a stale preparation.
    train, test = textures(6, rng), textures(2, rng)
    m = model(coreset_ratio=0.5).fit(train)
    prepared = m._prepared_bank()
    assert prepared.numel() > 0 and m._prepared_bank() is prepared  # made once, at fit
    query = m.patch_features(test).reshape(-1, m.bank_.shape[1]).double()

    def expected_map(bank):
        return torch.cdist(query, bank.double()).min(dim=1).values.reshape(2, 8, 8)

    m.bank_ = m.bank_[: m.bank_.shape[0] // 2].clone()
    torch.testing.assert_close(m._score_batch(test)[0].double(), expected_map(m.bank_), rtol=1e-4, atol=1e-4)
    m.bank_.mul_(1.5)
    torch.testing.assert_close(m._score_batch(test)[0].double(), expected_map(m.bank_), rtol=1e-4, atol=1e-4)
    assert "_prepared_cache" not in m._learned_attributes()


@pytest.mark.parametrize(
    "params,message",
    [
        ({"coreset_ratio": 0}, "coreset_ratio must be in"),
        ({"coreset_ratio": 1.5}, "coreset_ratio must be in"),
        ({"neighbourhood": 2}, "neighbourhood must be odd"),
        ({"embed_dim": 0}, "embed_dim must be a positive int"),
        ({"embedding": "mean"}, "embedding must be one of"),
        ({"layer_dim": 0}, "layer_dim must be a positive int"),
        ({"bank_dtype": "int8"}, "bank_dtype must be one of"),
        ({"projection_dim": -1}, "projection_dim must be"),
        ({"layers": ["layer2"]}, "not all layers"),
    ],
)
def test_bad_parameters_are_refused(params, message, rng):
    with pytest.raises(ValueError, match=message):
        model(**params).fit(textures(2, rng))
