"""read_tile against hand-computed reflectances on rasters written here and read back."""

from __future__ import annotations

import datetime as dt
import pickle

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from domains.satellite import RasterReadError, read_tile
from domains.satellite.demo import from_origin, write_raster
from domains.satellite.reader import inspect_file, open_source
from fedmoco.errors import DataError

T10 = from_origin(500_000.0, 5_000_000.0, 10.0, 10.0)


def dn_cube(bands: int, h: int, w: int, start: int = 1) -> np.ndarray:
    """DNs 1, 2, 3, ... in band, row, column order: pixel (b, r, c) = start + (b*h + r)*w + c."""
    return np.arange(start, start + bands * h * w, dtype=np.uint16).reshape(bands, h, w)


def test_uint16_default_is_dn_over_10000_on_known_pixels(tmp_path):
    dn = dn_cube(4, 6, 5) * 100  # DN 100 ... 12000
    path = write_raster(tmp_path / "a.tif", dn, transform=T10)
    tile = read_tile(path)
    assert tile.dtype == np.float32 and tile.shape == (4, 6, 5)
    assert not tile.mask.any()
    # pixel (b=2, r=3, c=4): DN = (1 + (2*6 + 3)*5 + 4) * 100 = 8000 -> 0.8
    assert tile[2, 3, 4] == pytest.approx(0.8, abs=1e-7)
    np.testing.assert_allclose(tile.data, dn / 10000.0, rtol=1e-6)


def test_window_tuple_and_rasterio_window_read_the_same_pixels(tmp_path):
    dn = dn_cube(2, 8, 8)
    path = write_raster(tmp_path / "w.tif", dn, transform=T10)
    a = read_tile(path, window=(3, 2, 4, 5))  # col, row, width, height
    b = read_tile(path, window=Window(3, 2, 4, 5))
    assert a.shape == (2, 5, 4)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.data, dn[:, 2:7, 3:7] / 1e4, rtol=1e-6)
    assert a[1, 0, 0] == pytest.approx((1 + (8 + 2) * 8 + 3) / 1e4)


def test_window_over_the_edge_masks_outside_pixels(tmp_path):
    path = write_raster(tmp_path / "e.tif", dn_cube(1, 4, 4), transform=T10)
    tile = read_tile(path, window=(2, 2, 4, 4))
    assert tile.shape == (1, 4, 4)
    assert tile.mask[0, :2, :2].sum() == 0 and tile.mask.sum() == 16 - 4
    assert tile[0, 1, 1] == pytest.approx(16 / 1e4)


def test_nodata_pixels_are_masked(tmp_path):
    dn = np.full((2, 3, 3), 5000, np.uint16)
    dn[:, 0, 0] = 0
    dn[1, 2, 2] = 0
    path = write_raster(tmp_path / "n.tif", dn, transform=T10, nodata=0)
    tile = read_tile(path)
    assert tile.mask.sum() == 3
    assert tile.mask[0, 0, 0] and tile.mask[1, 2, 2] and not tile.mask[0, 2, 2]
    assert tile.mean() == pytest.approx(0.5)  # masked pixels do not count
    assert (tile.data[tile.mask] == 0).all()


def test_scale_and_offset_from_gdal_metadata(tmp_path):
    dn = np.array([[[10000, 20000], [30000, 7273]]], np.uint16)
    path = write_raster(tmp_path / "l.tif", dn, transform=T10, scales=(2.75e-5, -0.2))
    tile = read_tile(path)
    # 10000 * 2.75e-5 - 0.2 = 0.075; 30000 * 2.75e-5 - 0.2 = 0.625
    assert tile[0, 0, 0] == pytest.approx(0.075, abs=1e-6)
    assert tile[0, 1, 0] == pytest.approx(0.625, abs=1e-6)


def test_scale_and_offset_from_cf_tags(tmp_path):
    dn = np.array([[[1000, 2000]]], np.uint16)
    path = write_raster(tmp_path / "cf.tif", dn, transform=T10, tags={"scale_factor": "0.0002", "add_offset": "-0.1"})
    tile = read_tile(path)
    np.testing.assert_allclose(tile.data[0, 0], [0.1, 0.3], atol=1e-6)


def test_explicit_scale_offset_override_the_file(tmp_path):
    dn = np.array([[[1000, 2000]]], np.uint16)
    path = write_raster(tmp_path / "o.tif", dn, transform=T10, scales=(2.75e-5, -0.2))
    np.testing.assert_allclose(read_tile(path, scale=1e-4, offset=-0.1).data[0, 0], [0.0, 0.1], atol=1e-6)
    # Only the offset given (Sentinel-2 baseline 04.00): the default scale 1e-4 stays.
    plain = write_raster(tmp_path / "p.tif", dn, transform=T10)
    np.testing.assert_allclose(read_tile(plain, offset=-0.1).data[0, 0], [0.0, 0.1], atol=1e-6)


def test_float32_is_reflectance_and_nan_is_masked(tmp_path):
    data = np.array([[[0.25, np.nan], [0.5, 1.25]]], np.float32)
    with_nodata = write_raster(tmp_path / "f.tif", data, transform=T10, nodata=float("nan"))
    without = write_raster(tmp_path / "g.tif", data, transform=T10, nodata=None, compress=None)
    for path in (with_nodata, without):
        tile = read_tile(path)
        assert tile.mask.tolist() == [[[False, True], [False, False]]]
        assert tile[0, 1, 1] == pytest.approx(1.25) and tile[0, 0, 0] == pytest.approx(0.25)


def test_uint8_is_scaled_by_255(tmp_path):
    path = write_raster(tmp_path / "b.tif", np.array([[[51, 255]]], np.uint8), transform=T10)
    np.testing.assert_allclose(read_tile(path).data[0, 0], [0.2, 1.0], rtol=1e-6)


def test_band_selection_by_index_and_description_keeps_the_requested_order(tmp_path):
    dn = dn_cube(4, 2, 2)
    path = write_raster(tmp_path / "d.tif", dn, transform=T10, descriptions=["blue", "green", "Red", "NIR"])
    by_name = read_tile(path, bands=["nir", "RED"])
    by_index = read_tile(path, bands=[4, 3])
    np.testing.assert_array_equal(by_name.data, by_index.data)
    np.testing.assert_allclose(by_name.data, dn[[3, 2]] / 1e4, rtol=1e-6)


def test_undescribed_13_band_file_is_selected_with_sentinel2_names(tmp_path):
    dn = dn_cube(13, 2, 2)
    path = write_raster(tmp_path / "s2.tif", dn, transform=T10)
    tile = read_tile(path, bands=["B8A", "B02"])
    np.testing.assert_allclose(tile.data, dn[[8, 1]] / 1e4, rtol=1e-6)
    # an index and a name of the same band: refused, not read twice into two channels
    with pytest.raises(RasterReadError, match=rf"^{path}: missing band \(bands 2 and 'B02' select the same band"):
        read_tile(path, bands=[2, "B02"])


LAYOUTS = [
    pytest.param(bands, dtype, tiled, compress, id=f"{bands}b-{dtype}-{'tiled' if tiled else 'striped'}-{compress}")
    for bands in (4, 13)
    for dtype in ("uint16", "float32")
    for tiled in (True, False)
    for compress in (None, "deflate", "lzw", "zstd")
]


@pytest.mark.parametrize("bands,dtype,tiled,compress", LAYOUTS)
def test_every_layout_reads_back_exactly(tmp_path, bands, dtype, tiled, compress):
    rng = np.random.default_rng(bands)
    dn = rng.integers(1, 12000, (bands, 40, 72)).astype(np.uint16)
    data = dn if dtype == "uint16" else (dn / 1e4).astype(np.float32)
    path = write_raster(tmp_path / "x.tif", data, transform=T10, tiled=tiled, compress=compress, nodata=0)
    with rasterio.open(path) as src:
        assert src.profile["tiled"] == tiled and src.count == bands and src.crs is not None
        assert (src.compression.value.lower() if src.compression else None) == compress
    tile = read_tile(path, window=(33, 7, 32, 32))
    np.testing.assert_allclose(tile.data, (dn[:, 7:39, 33:65] / 1e4).astype(np.float32), rtol=1e-6)


# --------------------------------------------------------------------------- per-band files


def write_band_files(folder, layout=None):
    """B02 (10 m, 12x12, DN = 1000 + col), B05 (20 m, 6x6, DN = 2000 + 10*row), B09 (60 m,
    2x2, DN 3000..3003), over one 120 m square."""
    layout = layout or {"B02": "", "B05": "", "B09": ""}
    b02 = np.tile(np.arange(1000, 1012, dtype=np.uint16), (12, 1))[None]
    b05 = np.repeat(np.arange(2000, 2060, 10, dtype=np.uint16)[:, None], 6, axis=1)[None]
    b09 = np.array([[[3000, 3001], [3002, 3003]]], np.uint16)
    for name, data, res in (("B02", b02, 10), ("B05", b05, 20), ("B09", b09, 60)):
        write_raster(
            folder / layout[name] / f"T32TNS_20230601T103629_{name}_{res}m.tif",
            data,
            transform=from_origin(500_000.0, 5_000_000.0, res, res),
            nodata=0,
        )
    return b02, b05, b09


def test_per_band_files_are_resampled_to_the_finest_grid(tmp_path):
    b02, b05, b09 = write_band_files(tmp_path)
    tile = read_tile(tmp_path, resampling="nearest")
    assert tile.shape == (3, 12, 12) and not tile.mask.any()
    np.testing.assert_allclose(tile.data[0], b02[0] / 1e4, rtol=1e-6)
    # nearest: each 20 m pixel becomes a 2x2 block, each 60 m pixel a 6x6 block
    np.testing.assert_allclose(tile.data[1], np.kron(b05[0], np.ones((2, 2))) / 1e4, rtol=1e-6)
    np.testing.assert_allclose(tile.data[2], np.kron(b09[0], np.ones((6, 6))) / 1e4, rtol=1e-6)
    # bands are selected by their file's band token
    window = read_tile(tmp_path, window=(6, 0, 6, 6), bands=["B09"], resampling="nearest")
    np.testing.assert_allclose(window.data, np.full((1, 6, 6), 0.3001), rtol=1e-6)


def test_bilinear_keeps_constant_and_linear_fields(tmp_path):
    _, b05, _ = write_band_files(tmp_path)
    tile = read_tile(tmp_path, bands=["B05"], resampling="bilinear")
    # Row r of the 10 m grid has its centre at (r + 0.5) / 2 in 20 m pixels; between the 20 m
    # pixel centres a linear field stays linear: DN = 2000 + 10 * ((r + 0.5) / 2 - 0.5).
    rows = np.arange(1, 11)
    np.testing.assert_allclose(tile.data[0, 1:11, 5], (2000 + 5 * rows - 2.5) / 1e4, atol=2e-6)
    assert np.ptp(tile.data[0, 4, :]) < 1e-6  # constant along each row


def test_l2a_resolution_folders_are_joined_and_the_finest_copy_wins(tmp_path):
    write_band_files(tmp_path, {"B02": "R10m", "B05": "R20m", "B09": "R60m"})
    # L2A also ships B02 resampled to 20 m; the 10 m file must be the one read.
    write_raster(
        tmp_path / "R20m" / "T32TNS_20230601T103629_B02_20m.tif",
        np.full((1, 6, 6), 9999, np.uint16),
        transform=from_origin(500_000.0, 5_000_000.0, 20, 20),
        nodata=0,
    )
    source = open_source(tmp_path)
    assert source.names == ["B02", "B05", "B09"] and (source.grid.width, source.grid.height) == (12, 12)
    assert source.date == dt.date(2023, 6, 1)
    assert read_tile(tmp_path, bands=["B02"])[0, 0, 3] == pytest.approx(0.1003)


def test_resolution_option_resamples_a_single_file(tmp_path):
    dn = np.arange(16, dtype=np.uint16).reshape(1, 4, 4) * 100 + 100
    path = write_raster(tmp_path / "r.tif", dn, transform=T10)
    tile = read_tile(path, resolution=20.0, resampling="average")
    assert tile.shape == (1, 2, 2)
    # 2x2 block means of the 10 m DNs
    expected = dn[0].reshape(2, 2, 2, 2).mean(axis=(1, 3)) / 1e4
    np.testing.assert_allclose(tile.data[0], expected, rtol=1e-6)


# --------------------------------------------------------------------------- errors


def test_not_a_raster(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("field notes\n")
    with pytest.raises(RasterReadError) as err:
        read_tile(path)
    assert str(err.value).startswith(f"{path}: not a raster")
    assert err.value.reason == "not a raster"


def test_unreadable_truncated_and_missing(tmp_path):
    path = write_raster(tmp_path / "t.tif", dn_cube(4, 64, 64), transform=T10, tiled=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RasterReadError, match=rf"^{path}: unreadable \(") as err:
        read_tile(path)
    assert err.value.reason == "unreadable"
    missing = tmp_path / "gone.tif"
    with pytest.raises(RasterReadError, match=rf"^{missing}: unreadable \(no such file\)"):
        read_tile(missing)


def test_wrong_band_count_and_missing_band(tmp_path):
    path = write_raster(tmp_path / "four.tif", dn_cube(4, 2, 2), transform=T10, descriptions=["b", "g", "r", "n"])
    with pytest.raises(RasterReadError, match=rf"^{path}: wrong band count \(band 5 requested, file has 4 bands\)"):
        read_tile(path, bands=[1, 5])
    with pytest.raises(RasterReadError, match=rf"^{path}: missing band \(no band described 'B8A'"):
        read_tile(path, bands=["B8A"])


def test_all_nodata_file_and_window(tmp_path):
    path = write_raster(tmp_path / "empty.tif", np.zeros((4, 8, 8), np.uint16), transform=T10, nodata=0)
    with pytest.raises(RasterReadError, match=rf"^{path}: all nodata \(window whole raster has no valid pixel\)"):
        read_tile(path)
    full = write_raster(tmp_path / "full.tif", dn_cube(1, 8, 8), transform=T10)
    with pytest.raises(RasterReadError, match="all nodata"):
        read_tile(full, window=(20, 20, 4, 4))


def test_error_is_a_value_error_and_survives_pickling():
    err = RasterReadError("/data/x.tif", "unreadable", "disk error")
    assert isinstance(err, ValueError) and isinstance(err, DataError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == ("/data/x.tif", "unreadable", "/data/x.tif: unreadable (disk error)")


def test_acquisition_date_from_tags_or_name_but_not_tiff_datetime(tmp_path):
    tagged = write_raster(tmp_path / "a.tif", dn_cube(1, 2, 2), transform=T10, tags={"ACQUISITION_DATE": "2021-07-04"})
    named = write_raster(tmp_path / "S2A_20220131T101010.tif", dn_cube(1, 2, 2), transform=T10)
    written = write_raster(tmp_path / "c.tif", dn_cube(1, 2, 2), transform=T10, tags={"TIFFTAG_DATETIME": "2020:01:01 00:00:00"})
    assert inspect_file(tagged).date == dt.date(2021, 7, 4)
    assert inspect_file(named).date == dt.date(2022, 1, 31)
    assert inspect_file(written).date is None


def test_a_scene_folders_product_outweighs_its_single_band_auxiliary_rasters(tmp_path):
    """An L2A granule holds its band files and single-band SCL/AOT/WVP rasters. The band count
    to keep was the one most *sources* had: three 1-band rasters beat one 3-band product, and
    the site trained on the auxiliary rasters. It is the one most *files* belong to."""
    from domains.satellite.dataset import scan_folder
    from domains.satellite.options import parse_options

    write_band_files(tmp_path)  # one product: B02, B05, B09 (3 files)
    for aux in ("SCL", "AOT", "WVP"):
        write_raster(tmp_path / f"T32TNS_20230601T103629_{aux}_20m.tif", np.full((1, 6, 6), 5, np.uint8),
                     transform=from_origin(500_000.0, 5_000_000.0, 20, 20))
    scan = scan_folder(tmp_path, parse_options({}))
    assert [s.count for s in scan.sources] == [3] and scan.skipped == {"wrong band count": 3}


@pytest.mark.parametrize("dtype", ["complex_int16", "complex64"])
def test_a_complex_valued_raster_is_skipped_with_its_reason(tmp_path, dtype):
    """A Sentinel-1 SLC measurement file holds complex samples: cint16 has no numpy dtype and
    stopped every command with a TypeError; complex64 was read as its real part alone."""
    with rasterio.open(tmp_path / "slc.tif", "w", driver="GTiff", width=16, height=16, count=1, dtype=dtype,
                       crs="EPSG:32632", transform=from_origin(0, 160, 10, 10)) as dst:
        dst.write(np.full((1, 16, 16), 3 + 4j, np.complex64))
    with pytest.raises(RasterReadError) as err:
        inspect_file(tmp_path / "slc.tif")
    assert err.value.reason == "unreadable" and f"complex-valued bands ({dtype}): SAR phase data" in str(err.value)


def test_band_files_without_a_crs_stack_when_they_share_one_grid(tmp_path):
    """Refused before as "band files need one common CRS", though nothing needed resampling;
    bands of different grids without a CRS are "not georeferenced", as the skip table says."""
    from affine import Affine

    def plain(path, size, value, pixel=1):
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint16",
                           transform=Affine.scale(pixel, -pixel)) as dst:  # no CRS
            dst.write(np.full((1, size, size), value, np.uint16))

    plain(tmp_path / "same" / "SCN_B02.tif", 8, 1000)
    plain(tmp_path / "same" / "SCN_B03.tif", 8, 2000)
    tile = read_tile(tmp_path / "same")
    assert tile.shape == (2, 8, 8) and tile.data[:, 0, 0].tolist() == pytest.approx([0.1, 0.2])
    plain(tmp_path / "other" / "SCN_B02.tif", 8, 1000)
    plain(tmp_path / "other" / "SCN_B05.tif", 4, 1000, pixel=2)
    with pytest.raises(RasterReadError) as err:
        open_source(tmp_path / "other")
    assert err.value.reason == "not georeferenced" and "share one pixel grid" in str(err.value)


def test_a_landsat_l2sp_scene_keeps_its_surface_reflectance_product(tmp_path):
    """7 SR band files and 12 single-band ST/QA rasters: by files alone, 12 single-band files
    outnumber the product's 7. Where per-band products are present they decide."""
    from domains.satellite.dataset import scan_folder
    from domains.satellite.options import parse_options

    prefix = "LC08_L2SP_044034_20210508_20210518_02_T1_"
    names = [f"SR_B{i}" for i in range(1, 8)] + ["ST_B10", "QA_PIXEL", "QA_RADSAT", "SR_QA_AEROSOL", "ST_ATRAN",
                                                  "ST_CDIST", "ST_DRAD", "ST_EMIS", "ST_EMSD", "ST_QA", "ST_TRAD",
                                                  "ST_URAD"]
    for name in names:
        write_raster(tmp_path / f"{prefix}{name}.TIF", np.full((1, 16, 16), 9000, np.uint16),
                     transform=from_origin(500_000.0, 4_000_000.0, 30, 30))
    scan = scan_folder(tmp_path, parse_options({}))
    assert [(s.count, len(s.paths)) for s in scan.sources] == [(7, 7)] and scan.skipped == {"wrong band count": 12}
