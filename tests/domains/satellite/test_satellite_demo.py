"""The demo archive: the layouts the issue lists, deterministic per seed, distinct per site."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from domains.satellite import RasterReadError, make_demo_archive, read_tile
from domains.satellite.demo import LANDSAT_SCALE, SIGNATURES


def profile(path):
    with rasterio.open(path) as src:
        return {
            "count": src.count,
            "dtype": src.dtypes[0],
            "tiled": src.profile.get("tiled", False),
            "compress": src.compression.value.lower() if src.compression else None,
            "crs": src.crs.to_epsg() if src.crs else None,
            "res": src.res,
            "driver": src.driver,
            "scale": src.scales[0],
        }


def test_layouts_of_the_4_band_archive(demo4):
    p = {f.name: profile(f) for f in demo4.glob("*.tif")}
    assert p["4band_uint16_tiled_deflate.tif"] == {
        "count": 4, "dtype": "uint16", "tiled": True, "compress": "deflate", "crs": 32632, "res": (10.0, 10.0),
        "driver": "GTiff", "scale": 1.0,
    }
    assert p["4band_uint16_striped_raw_nodata.tif"]["tiled"] is False
    assert p["4band_uint16_striped_raw_nodata.tif"]["compress"] is None
    assert p["4band_float32_tiled_lzw.tif"]["dtype"] == "float32" and p["4band_float32_tiled_lzw.tif"]["compress"] == "lzw"
    assert p["4band_uint16_scaled_offset.tif"]["scale"] == pytest.approx(LANDSAT_SCALE)
    assert sorted(f.name for f in (demo4 / "timeseries").iterdir()) == ["4band_20230415.tif", "4band_20230815.tif"]
    stripes = read_tile(demo4 / "4band_uint16_striped_raw_nodata.tif")
    assert stripes.mask[:, 0, 0].all() and stripes.mask[:, 64, 5].all() and not stripes.mask[:, 100, 5].any()


def test_broken_files_fail_with_each_reason(demo4):
    reasons = {}
    for f in sorted((demo4 / "broken").iterdir()):
        with pytest.raises(RasterReadError) as err:
            read_tile(f, bands=[1, 2, 3, 4])
        reasons[f.name] = err.value.reason
    assert reasons == {
        "all_nodata.tif": "all nodata",
        "not_a_raster.tif": "not a raster",
        "three_bands.tif": "wrong band count",
        "truncated.tif": "unreadable",
    }


def test_13_band_archive_has_a_sentinel2_product_at_three_resolutions(demo13):
    product = next(demo13.glob("S2B_MSIL1C_*"))
    files = sorted((product / "IMG_DATA").glob("*.jp2"))
    assert len(files) == 13
    res = {f.stem.rsplit("_", 1)[1]: profile(f)["res"][0] for f in files}
    assert res["B02"] == 10 and res["B05"] == 20 and res["B01"] == 60 and res["B8A"] == 20
    assert profile(files[0])["driver"] == "JP2OpenJPEG"
    tile = read_tile(product / "IMG_DATA", window=(0, 0, 32, 32))
    assert tile.shape == (13, 32, 32) and not tile.mask.any()
    assert profile(demo13 / "13band_uint16_tiled_deflate.tif")["count"] == 13


def test_classes_have_distinct_spectra():
    water, vegetation, soil, urban = SIGNATURES
    assert vegetation[7] > 5 * vegetation[3]  # NIR plateau over red
    assert water[7] < water[1]  # water darkens into the NIR
    assert soil[11] > soil[1] and urban.std() < vegetation.std()


def test_same_seed_same_archive_other_seed_other_site(tmp_path):
    a = make_demo_archive(tmp_path / "a", seed=5, tile_size=16)
    b = make_demo_archive(tmp_path / "b", seed=5, tile_size=16)
    c = make_demo_archive(tmp_path / "c", seed=6, tile_size=16)
    name = "4band_uint16_tiled_deflate.tif"
    np.testing.assert_array_equal(read_tile(a / name).data, read_tile(b / name).data)
    assert not np.array_equal(read_tile(a / name).data, read_tile(c / name).data)
    with rasterio.open(a / name) as sa, rasterio.open(c / name) as sc:
        assert sa.transform != sc.transform  # another footprint


def test_labelled_archive_and_argument_checks(labelled4, tmp_path):
    assert sorted(p.name for p in labelled4.iterdir()) == ["bare_soil", "urban", "vegetation", "water"]
    assert all(len(list(p.glob("*.tif"))) == 6 for p in labelled4.iterdir())
    with pytest.raises(ValueError, match="4 or 13 bands"):
        make_demo_archive(tmp_path, bands=5)
