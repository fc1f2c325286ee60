"""fastad.geo: GeoTIFF windows in, a georeferenced map and a quick-look out, nodata masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastad
from fastad.geo import MapWriter, RasterReader, block_max
from fastad.highres import predict_large

from ..conftest import require_lite0

rasterio = pytest.importorskip("rasterio", reason="rasterio is not installed (pip install 'fastad[geo]')")
from affine import Affine  # noqa: E402  (rasterio's geotransform type)

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4650000.0)  # UTM 33N, 0.5 m pixels, north up


def write_scene(path, pixels: np.ndarray, **extra) -> None:
    """(C, H, W) array as a tiled, compressed GeoTIFF with a CRS and geotransform."""
    c, h, w = pixels.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=h,
        width=w,
        count=c,
        dtype=pixels.dtype,
        crs=CRS,
        transform=TRANSFORM,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
        **extra,
    ) as ds:
        ds.write(pixels)


def texture(h, w, seed):
    gen = np.random.default_rng(seed)
    coarse = gen.random((3, h // 32 + 2, w // 32 + 2))
    up = np.kron(coarse, np.ones((32, 32)))[:, :h, :w]
    return (60 + 120 * up + 20 * gen.random((3, h, w))).astype(np.uint8)


def test_reader_reads_windows_scaled(tmp_path):
    pixels = texture(300, 420, 0)
    write_scene(tmp_path / "s.tif", pixels)
    with RasterReader(tmp_path / "s.tif") as reader:
        assert reader.shape == (3, 300, 420) and reader.crs == rasterio.crs.CRS.from_string(CRS)
        window = reader.read(17, 140, 250, 419)
        np.testing.assert_array_equal(window.numpy(), pixels[:, 17:140, 250:419].astype(np.float32) / 255)
        assert reader.valid(0, 10, 0, 10).all()


def test_single_band_and_many_band_rasters(tmp_path):
    gray = texture(64, 64, 1)[:1]
    write_scene(tmp_path / "g.tif", gray)
    with RasterReader(tmp_path / "g.tif") as reader:
        assert torch.equal(reader.read(0, 8, 0, 8)[0], reader.read(0, 8, 0, 8)[2])
    write_scene(tmp_path / "m.tif", np.concatenate([texture(64, 64, 2)] * 2))  # 6 bands
    with pytest.raises(ValueError, match="6 bands; say which three"):
        RasterReader(tmp_path / "m.tif")
    with RasterReader(tmp_path / "m.tif", bands=(4, 5, 6)) as reader:
        assert reader.shape == (3, 64, 64)
    (tmp_path / "bad.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="not a raster image"):
        RasterReader(tmp_path / "bad.tif")
    with pytest.raises(FileNotFoundError):
        RasterReader(tmp_path / "missing.tif")


def test_block_max_keeps_small_peaks():
    rows = np.zeros((2, 10), np.float32)
    rows[1, 7] = 5.0
    rows[0, 9] = np.nan
    np.testing.assert_array_equal(block_max(rows, 4), [[0, 0, 0], [0, 5, 0]])


def test_writer_refuses_out_of_order_rows_and_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="expected row 0"):
        with MapWriter(tmp_path / "m.tif", 20, 30, quicklook=tmp_path / "q.png") as writer:
            writer.write(4, np.zeros((4, 30), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def patchcore():
    require_lite0()
    train = torch.stack([torch.from_numpy(texture(192, 192, s).astype(np.float32) / 255) for s in range(3)])
    return fastad.PatchCore(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0).fit(train)


def test_georeferenced_map_round_trip_with_nodata(tmp_path, patchcore):
    pixels = texture(720, 650, 3)
    pixels[:, :100, :120] = 0  # a corner outside the swath
    pixels[:, 400:430, 300:340] = 250  # a defect
    write_scene(tmp_path / "scene.tif", pixels, nodata=0)
    with RasterReader(tmp_path / "scene.tif") as reader:
        assert not reader.valid(0, 100, 0, 120).any()
        with MapWriter(
            tmp_path / "map.tif", 720, 650, like=reader, quicklook=tmp_path / "quick.png", quicklook_side=128
        ) as writer:
            result = predict_large(patchcore, reader, tile=256, out=writer)
    assert result.map is None
    plain = predict_large(patchcore, torch.from_numpy(pixels.astype(np.float32) / 255), tile=256)
    with rasterio.open(tmp_path / "map.tif") as ds:
        assert ds.crs == rasterio.crs.CRS.from_string(CRS) and ds.transform == TRANSFORM
        assert (ds.count, ds.dtypes[0], ds.height, ds.width) == (1, "float32", 720, 650)
        assert ds.profile["tiled"] and ds.profile["compress"] == "deflate"
        written = ds.read(1)
    # NaN exactly where the scene has no data (every band 0), the unmasked map elsewhere.
    nodata = (pixels == 0).all(axis=0)
    assert np.array_equal(np.isnan(written), nodata)
    np.testing.assert_array_equal(written[~nodata], plain.map[~nodata])
    # The image score ignores the no-data corner, whose patches the plain call scores too.
    assert np.isfinite(result.score) and result.score <= plain.score
    from PIL import Image

    quick = np.asarray(Image.open(tmp_path / "quick.png"))
    assert quick.shape == (-(-720 // 6), -(-650 // 6)) and quick.max() == 255
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif", "quick.png", "scene.tif"]


def test_paths_open_with_rasterio(tmp_path, patchcore):
    # A compressed, tiled GeoTIFF given by path (tifffile's reader cannot map it; rasterio reads it).
    from fastad.highres import fit_large

    pixels = texture(448, 512, 9)
    write_scene(tmp_path / "s.tif", pixels)
    by_path = predict_large(patchcore, tmp_path / "s.tif", tile=256)
    by_array = predict_large(patchcore, torch.from_numpy(pixels.astype(np.float32) / 255), tile=256)
    np.testing.assert_array_equal(by_path.map, by_array.map)
    params = dict(backbone="efficientnet_lite0", resize=None, crop=None, coreset_ratio=1.0)
    fitted = fit_large(fastad.PatchCore(**params), [tmp_path / "s.tif"], tile=256)
    assert fitted.bank_.shape[0] == (448 // 8) * (512 // 8)
