"""Tile datasets: window counts, nodata skipping, statistics, skipped files, workers, temporal pairs."""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from domains.satellite import build_labelled_data, build_pretrain_data
from domains.satellite.dataset import MIN_STD, grid_windows
from domains.satellite.demo import CLASSES, from_origin, write_raster
from domains.satellite.reader import open_source, shared_handles
from fedmoco.data import DataConfig, Normalization, collate_views, format_skipped
from fedmoco.errors import DataError

BROKEN = Counter({"not a raster": 1, "unreadable": 1, "wrong band count": 1, "all nodata": 1})


def cfg(size: int = 32, **options) -> DataConfig:
    return DataConfig(image_size=size, seed=0, options=options)


def constant_file(path, values, size=64, nodata_rows=0):
    """uint16 file whose band b is values[b] reflectance everywhere, first rows nodata (0)."""
    dn = np.empty((len(values), size, size), np.uint16)
    for b, v in enumerate(values):
        dn[b] = round(v * 10000)
    dn[:, :nodata_rows] = 0
    return write_raster(path, dn, transform=from_origin(0, 0, 10, 10), nodata=0)


@pytest.mark.parametrize(
    "width,height,tile,stride,expected",
    [(256, 256, 64, 64, 16), (256, 256, 64, 32, 49), (200, 130, 64, 64, 6), (200, 130, 64, 32, 15), (40, 50, 64, 64, 1)],
)
def test_grid_window_count(tmp_path, width, height, tile, stride, expected):
    # (floor((W - w) / stride) + 1) * (floor((H - h) / stride) + 1), w = min(tile, W)
    path = write_raster(tmp_path / "g.tif", np.ones((1, height, width), np.uint16), transform=from_origin(0, 0, 10, 10))
    windows = grid_windows(open_source(path), tile, stride)
    assert len(windows) == expected
    assert windows[0] == (0, 0, min(tile, width), min(tile, height))
    assert all(c + w <= width and r + h <= height for c, r, w, h in windows)


def nodata_quadrants(path):
    """128 x 128, four 64 px tiles: top-left 50% nodata, top-right 6.25% (4 rows, in band 2
    only), bottom two clean."""
    dn = np.full((2, 128, 128), 1500, np.uint16)
    dn[:, 0:32, 0:64] = 0
    dn[1, 0:4, 64:128] = 0
    return write_raster(path, dn, transform=from_origin(0, 0, 10, 10), nodata=0)


@pytest.mark.parametrize("max_nodata,expected", [(0.0, 2), (0.05, 2), (0.1, 3), (0.5, 4), (1.0, 4)])
def test_grid_skips_tiles_above_the_nodata_fraction(tmp_path, max_nodata, expected):
    nodata_quadrants(tmp_path / "q.tif")
    data = build_pretrain_data(tmp_path, cfg(64, sampling="grid", max_nodata=max_nodata))
    assert len(data.dataset) == expected
    assert sum(data.skipped.values()) == 0


def test_files_without_a_usable_tile_are_skipped_by_reason(tmp_path):
    nodata_quadrants(tmp_path / "ok.tif")
    constant_file(tmp_path / "half.tif", [0.2, 0.2], size=64, nodata_rows=32)
    constant_file(tmp_path / "empty.tif", [0.0, 0.0], size=64)
    for sampling in ("grid", "random"):
        data = build_pretrain_data(tmp_path, cfg(64, sampling=sampling))
        assert data.skipped == Counter({"too much nodata": 1, "all nodata": 1}), sampling
        assert format_skipped(data.skipped) in data.description


def test_normalization_is_the_mean_and_std_of_valid_pixels(tmp_path):
    constant_file(tmp_path / "a.tif", [0.1, 0.3], nodata_rows=4)  # 60 valid rows
    constant_file(tmp_path / "b.tif", [0.3, 0.3])
    data = build_pretrain_data(tmp_path, cfg(64, sampling="grid", stats_tiles=100))
    n_a, n_b = 60 * 64, 64 * 64
    mean = (n_a * 0.1 + n_b * 0.3) / (n_a + n_b)
    std = np.sqrt((n_a * (0.1 - mean) ** 2 + n_b * (0.3 - mean) ** 2) / (n_a + n_b))
    assert data.normalization.mean == pytest.approx([mean, 0.3], abs=1e-6)
    assert data.normalization.std == pytest.approx([std, MIN_STD], abs=1e-6)


def test_demo4_random_and_grid(demo4):
    rnd = build_pretrain_data(demo4, cfg())
    assert rnd.in_channels == 4 and rnd.normalization.channels == 4
    assert rnd.skipped == BROKEN
    # 6 good scenes of 128 px = 16 tiles of 32 px each
    assert len(rnd.dataset) == 96
    q, k = rnd.dataset[0]
    assert q.shape == k.shape == (4, 32, 32) and q.dtype == torch.float32 and not torch.equal(q, k)
    assert "6 rasters" in rnd.description and "skipped 4 files" in rnd.description

    grid = build_pretrain_data(demo4, cfg(sampling="grid"))
    # 16 + 16 + 16 + 16 tiles, float32 scene: top tile row has 4 NaN rows (12.5%) -> 12;
    # striped scene: the 8-row stripe hits two tile rows (12.5% each) and the cut corner
    # covers 51% of tile (0, 0) -> 16 - 8 - 1 = 7.  4 * 16 + 12 + 7 = 83.
    assert len(grid.dataset) == 83
    assert grid.skipped == BROKEN
    assert len(build_pretrain_data(demo4, cfg(samples_per_epoch=10)).dataset) == 10


def test_demo13_with_per_band_product(demo13):
    data = build_pretrain_data(demo13, cfg())
    assert data.in_channels == 13 and data.skipped == BROKEN
    assert "7 rasters (1 per-band products)" in data.description
    assert "B01, B02, B03, B04, B05, B06, B07, B08, B8A, B09, B10, B11, B12" in data.description
    # the Sentinel-2 signatures: NIR (B08) brighter than red (B04) on average, B10 near zero
    mean = data.normalization.mean
    assert mean[7] > mean[3] and mean[10] < 0.02
    q, k = data.dataset[len(data.dataset) - 1]
    assert q.shape == (13, 32, 32)


def test_bands_by_description_and_indices(demo13):
    data = build_pretrain_data(demo13, cfg(bands="B02,B03,B04,B08", indices="ndvi,ndwi"))
    assert data.in_channels == 6
    # the undescribed 13-band files match by Sentinel-2 order; the 3-band file lacks B02
    assert data.skipped == BROKEN - Counter({"wrong band count": 1}) + Counter({"missing band": 1})
    assert "[B02, B03, B04, B08, NDVI, NDWI]" in data.description
    assert -1 <= data.normalization.mean[4] <= 1
    assert data.dataset[0][0].shape == (6, 32, 32)
    by_index = build_pretrain_data(demo13, cfg(bands="2,3,4,8"))
    assert by_index.normalization.mean == pytest.approx(data.normalization.mean[:4])


def test_indices_need_band_roles(tmp_path):
    write_raster(tmp_path / "x.tif", np.ones((3, 32, 32), np.uint16), transform=from_origin(0, 0, 10, 10))
    with pytest.raises(DataError, match=r"indices='ndvi': band role 'nir' unknown"):
        build_pretrain_data(tmp_path, cfg(indices="ndvi"))
    data = build_pretrain_data(tmp_path, cfg(indices="ndvi", band_roles="red=1,nir=3"))
    assert data.in_channels == 4


def test_an_undescribed_4_band_file_is_blue_green_red_nir(tmp_path):
    """Commercial 4-band products ship B, G, R, NIR: an undescribed file gets those roles and the
    Sentinel-2-equivalent wavelengths, so NDVI reads red from band 3 and nir from band 4."""
    from domains.satellite.dataset import scan_folder
    from domains.satellite.options import parse_options

    write_raster(tmp_path / "x.tif", np.ones((4, 32, 32), np.uint16), transform=from_origin(0, 0, 10, 10))
    layout = scan_folder(tmp_path, parse_options({})).layout
    assert layout.roles == {"blue": 0, "green": 1, "red": 2, "nir": 3}
    assert layout.wavelengths == [490.0, 560.0, 665.0, 842.0]


def test_option_errors_surface_at_build(demo4):
    with pytest.raises(DataError, match="'colour' is unknown"):
        build_pretrain_data(demo4, cfg(colour=1))
    with pytest.raises(DataError, match=r"wavelengths='490.0,560.0': 2 values for 4 selected bands"):
        build_pretrain_data(demo4, cfg(wavelengths="490,560"))


def test_empty_and_all_broken_folders(tmp_path):
    with pytest.raises(DataError, match="data folder is empty"):
        build_pretrain_data(tmp_path, cfg())
    (tmp_path / "notes.tif").write_text("x")
    with pytest.raises(DataError, match=r"no usable raster \(skipped 1 files: 1 not a raster\)"):
        build_pretrain_data(tmp_path, cfg())


def test_dataset_pickles_without_handles_and_runs_in_two_workers(demo4):
    data = build_pretrain_data(demo4, cfg(samples_per_epoch=24))
    assert not shared_handles()._open  # nothing left open for workers to inherit
    blob = pickle.dumps(data.dataset)
    assert b"DatasetReader" not in blob
    clone = pickle.loads(blob)
    assert clone[0][0].shape == (4, 32, 32)
    loader = DataLoader(data.dataset, batch_size=8, num_workers=2, collate_fn=collate_views)
    batches = list(loader)
    assert len(batches) == 3
    for (q, k), dropped in batches:
        assert q.shape == k.shape == (8, 4, 32, 32) and dropped == 0


def test_unreadable_window_at_load_time_gives_none_and_a_warning(tmp_path, demo4, caplog):
    root = tmp_path / "copy"
    shutil.copytree(demo4, root, ignore=shutil.ignore_patterns("broken", "timeseries"))
    data = build_pretrain_data(root, cfg(sampling="grid"))
    victim = root / "4band_uint16_tiled_deflate.tif"
    victim.write_bytes(victim.read_bytes()[:2000])  # the disk lost the end of the file
    with caplog.at_level(logging.WARNING, logger="domains.satellite"):
        items = [data.dataset[i] for i in range(len(data.dataset))]
    assert sum(item is None for item in items) == 16  # that scene's 16 tiles
    assert f"{victim}: unreadable" in caplog.text
    batch, dropped = collate_views(items[:20])
    assert dropped == sum(item is None for item in items[:20])


def test_temporal_positive_is_the_same_window_on_the_other_date(demo4):
    neutral = dict(crop_scale="1,1", jitter_p=0, haze_p=0, noise_p=0, blur_p=0, band_dropout=0)
    data = build_pretrain_data(demo4, cfg(sampling="grid", temporal=True, **neutral))
    ds = data.dataset
    assert "2 rasters with temporal partners" in data.description
    names = [s.name for s in ds.reader.sources]
    spring = next(i for i, n in enumerate(names) if n.endswith("4band_20230415.tif"))
    summer = next(i for i, n in enumerate(names) if n.endswith("4band_20230815.tif"))
    assert ds.partners == {spring: [summer], summer: [spring]}
    index = next(j for j, (i, _) in enumerate(ds.windows) if i == spring)
    window = ds.windows[index][1]
    q, k = ds[index]

    def normalised_means(i):
        tile = ds.reader.filled(ds.reader.read(i, window))
        return data.normalization.apply(tile).mean(dim=(1, 2))

    # flips and rotations do not change band means; everything else is switched off
    assert torch.allclose(q.mean(dim=(1, 2)), normalised_means(spring), atol=1e-4)
    assert torch.allclose(k.mean(dim=(1, 2)), normalised_means(summer), atol=1e-4)
    # spring vegetation has a weaker NIR plateau than late summer
    assert k.mean(dim=(1, 2))[3] > q.mean(dim=(1, 2))[3]


def test_same_seed_same_statistics(demo13):
    a = build_pretrain_data(demo13, cfg())
    b = build_pretrain_data(demo13, cfg())
    assert a.normalization == b.normalization


# --------------------------------------------------------------------------- labelled


def test_labelled_from_sub_folders(labelled4):
    data = build_labelled_data(labelled4, cfg(), None, None)
    assert data.classes == sorted(CLASSES) and data.in_channels == 4
    assert len(data.dataset) == 24  # 4 classes x 6 files x one 32 px tile
    image, label = data.dataset[0]
    assert image.shape == (4, 32, 32) and label == 0
    again, _ = data.dataset[0]
    assert torch.equal(image, again)
    labels = Counter(data.dataset[i][1] for i in range(len(data.dataset)))
    assert labels == Counter({0: 6, 1: 6, 2: 6, 3: 6})
    # classes differ spectrally: water (index 3 after sorting) is darkest in NIR
    water = data.classes.index("water")
    nir = {c: np.mean([float(data.dataset[i][0][3].mean()) for i in range(24) if data.dataset[i][1] == c]) for c in range(4)}
    assert min(nir, key=nir.get) == water


def test_labelled_uses_the_checkpoint_normalization_and_checks_channels(labelled4):
    norm = Normalization([0.1, 0.1, 0.1, 0.2], [0.05, 0.05, 0.05, 0.1])
    data = build_labelled_data(labelled4, cfg(), None, norm)
    assert data.normalization is norm
    with pytest.raises(DataError, match=r"normalization has 13 channels but the selected bands give 4"):
        build_labelled_data(labelled4, cfg(), None, Normalization([0.1] * 13, [0.1] * 13))


def test_labelled_from_csv_with_tiles_sharing_the_file_label(tmp_path):
    constant_file(tmp_path / "field.tif", [0.05, 0.4], size=64)
    constant_file(tmp_path / "lake.tif", [0.06, 0.01], size=32)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nfield.tif,crop\nlake.tif,water\n")
    data = build_labelled_data(tmp_path, cfg(), csv, None)  # the CSV in the folder is not a raster
    assert data.classes == ["crop", "water"] and sum(data.skipped.values()) == 0
    assert [data.dataset[i][1] for i in range(len(data.dataset))] == [0, 0, 0, 0, 1]


def test_a_product_takes_the_label_of_whichever_band_file_the_csv_names(tmp_path):
    """A CSV row naming a product's B03 (not its first band file) left the product unlabelled
    and counted as "not a usable sample"; a product labelled through several band files takes
    the first one's label (as class folders give: the labelled set labels every file)."""
    from domains.satellite.demo import from_origin, write_raster

    for scene, value in (("SCN1", 1000), ("SCN2", 3000)):
        for band in ("B02", "B03", "B04"):
            write_raster(tmp_path / scene / f"{scene}_{band}.tif", np.full((1, 32, 32), value, np.uint16),
                         transform=from_origin(500000, 4000000, 10, 10))
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nSCN1/SCN1_B03.tif,crop\nSCN2/SCN2_B02.tif,water\n")
    data = build_labelled_data(tmp_path, cfg(), csv, None)
    assert data.classes == ["crop", "water"] and sorted({data.dataset[i][1] for i in range(len(data.dataset))}) == [0, 1]
    csv.write_text("path,label\nSCN1/SCN1_B04.tif,water\nSCN1/SCN1_B03.tif,crop\nSCN2/SCN2_B04.tif,water\n")
    data = build_labelled_data(tmp_path, cfg(), csv, None)
    labels = {data.dataset[i][1] for i in range(len(data.dataset)) if i < len(data.dataset) // 2}
    assert data.classes == ["crop", "water"] and labels == {0}  # SCN1: B03's label, B03 before B04


def test_a_short_epoch_draws_from_every_raster(tmp_path):
    # samples_per_epoch far below the area: each sample's raster is drawn by area, so all are
    # reached, not only the first in name order
    from collections import Counter as Count

    for k in range(4):
        constant_file(tmp_path / f"r{k}.tif", [0.1 * (k + 1), 0.2])
    data = build_pretrain_data(tmp_path, cfg(16, samples_per_epoch=40))
    ds = data.dataset
    assert len(ds) == 40 and int(ds.cumulative[-1]) == 4 * 16  # 16 tiles of 16 px per 64 px raster
    torch.manual_seed(0)
    seen = Count(Path(ds.reader.sources[ds._pick(k)[0]].name).name for k in range(len(ds)))
    assert sorted(seen) == ["r0.tif", "r1.tif", "r2.tif", "r3.tif"] and min(seen.values()) >= 4, seen
    # an epoch as long as the area still gives each raster exactly its share
    full = build_pretrain_data(tmp_path, cfg(16)).dataset
    exact = Count(Path(full.reader.sources[full._pick(k)[0]].name).name for k in range(len(full)))
    assert set(exact.values()) == {16}


def test_mixed_pixel_sizes_are_warned_about_unless_resolution_is_set(tmp_path, caplog):
    import logging

    import rasterio
    from rasterio.transform import from_origin

    from domains.satellite.dataset import scan_folder
    from domains.satellite.options import parse_options

    for name, pixel, crs in (("a10.tif", 10, "EPSG:32633"), ("b20.tif", 20, "EPSG:32633"), ("c10.tif", 10, "EPSG:32633")):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=16, height=16, count=4, dtype="uint16",
                           crs=crs, transform=from_origin(500000, 4600000, pixel, pixel)) as dst:
            dst.write(np.full((4, 16, 16), 1000, np.uint16))
    with caplog.at_level(logging.WARNING):
        scan_folder(tmp_path, parse_options({}))
    assert "the rasters have 2 pixel sizes (2 at 10, 1 at 20, in CRS units)" in caplog.text
    assert "resolution=10" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        scan_folder(tmp_path, parse_options({"resolution": "10"}))
    assert "pixel sizes" not in caplog.text
    # resolution is in each raster's CRS units: it cannot bring metres and degrees to one grid
    # (a 4326 raster became 1 x 1 px at resolution=10), so the CRS warning stays
    with rasterio.open(tmp_path / "d.tif", "w", driver="GTiff", width=16, height=16, count=4, dtype="uint16",
                       crs="EPSG:4326", transform=from_origin(14.0, 41.0, 1e-4, 1e-4)) as dst:
        dst.write(np.full((4, 16, 16), 1000, np.uint16))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        scan_folder(tmp_path, parse_options({"resolution": "10"}))
    assert "the rasters are in 2 coordinate reference systems" in caplog.text
    # and the grid at `resolution` is held to max_raster_pixels, as a declared one is
    (tmp_path / "d.tif").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match=r"no usable raster \(skipped 3 files: 3 too large\)"):
        scan_folder(tmp_path, parse_options({"resolution": "0.01", "max_raster_pixels": "1000000"}))
    assert "a10.tif: too large (at resolution 0.01 it would be 16000 x 16000 pixels, over max_raster_pixels " \
           "1,000,000)" in caplog.text
    assert len(scan_folder(tmp_path, parse_options({"resolution": "1", "max_raster_pixels": "1000000"})).sources) == 3


@pytest.mark.parametrize("sampling", ["random", "grid"])
def test_a_release_reads_one_tile_per_raster_that_no_other_raster_moves(tmp_path, demo4, sampling):
    """The unit a satellite site adds or removes is a raster. Its release item is one tile of
    that raster alone, filled and normalised with the federation's constants. Adding a raster
    moves the site's statistics, its band-count majority, the band names training takes from
    the first raster, the nodata probe's draws and what fits the raster cache; none of it
    moves the other rasters' release items, with the same per-item seed, bit for bit."""
    import rasterio

    from fedmoco.privacy import _read_alone

    small, large = tmp_path / "small", tmp_path / "large"
    # the striped raster's tiles hold nodata, which the release fills with the federation's mean
    names = ["4band_uint16_tiled_deflate.tif", "4band_uint16_striped_raw_nodata.tif"]
    for folder in (small, large):
        folder.mkdir()
        for name in names:
            shutil.copy(demo4 / name, folder / name)
    # what the large site adds: a raster that sorts first and names its bands otherwise (training
    # would take every raster's wavelengths and roles from it) and two 3-band rasters
    shutil.copy(demo4 / "4band_uint16_scaled_offset.tif", large / "0_first.tif")
    with rasterio.open(large / "0_first.tif", "r+") as ds:
        for i, band in enumerate(("B08", "B04", "B03", "B02"), start=1):
            ds.set_band_description(i, band)
    for k in (1, 2):
        shutil.copy(demo4 / "broken" / "three_bands.tif", large / f"z{k}_three_bands.tif")
    common = {"sampling": sampling, "max_nodata": 0.6, "haze_p": 1.0}
    a = build_pretrain_data(small, DataConfig(image_size=32, seed=0, options=common, cache=False, progress=False))
    b = build_pretrain_data(large, DataConfig(image_size=32, seed=0, options=common, cache=True, progress=False))
    assert a.normalization != b.normalization  # the added rasters move the site's statistics
    target = Normalization([0.08, 0.09, 0.09, 0.2], [0.04, 0.05, 0.09, 0.15])
    va, vb = a.release_view(target), b.release_view(target)
    assert (len(va), len(vb)) == (2, 3)  # one item per raster; the 3-band ones are not the federation's
    order_b = {Path(s.name).name: i for i, s in enumerate(vb.reader.sources)}
    for j, source in enumerate(va.reader.sources):
        for seed in (3, 11, 12):
            x, y = _read_alone(va, j, seed), _read_alone(vb, order_b[Path(source.name).name], seed)
            assert x is not None and torch.equal(x[0], y[0])
    view, _ = _read_alone(va, 0, 3)
    assert view.shape == (4, 32, 32) and view.dtype == torch.float32
    reason = a.release_view(None)
    assert isinstance(reason, str) and "input-mean and input-std" in reason




def test_band_descriptions_stay_out_of_the_public_reason(tmp_path):
    """A raster's band descriptions are free text (a name, an identifier): the error a site sends
    the server when an index needs a band role it cannot find names the count, not the bands."""
    from domains.satellite.demo import from_origin, write_raster
    from fedmoco.data import DataConfig, build_pretrain_data
    from fedmoco.errors import DataError

    rng = np.random.default_rng(0)
    for k in range(3):
        write_raster(tmp_path / f"{k}.tif", (rng.random((4, 64, 64)) * 0.3).astype(np.float32),
                     transform=from_origin(300000 + 1000 * k, 5000000, 10, 10),
                     descriptions=["Doe Jane a", "Doe Jane b", "Doe Jane c", "Doe Jane d"])
    with pytest.raises(DataError) as err:
        build_pretrain_data("satellite", tmp_path, DataConfig(image_size=32, options={"indices": "ndvi"}))
    assert "Doe Jane a" in str(err.value)  # the site's own log names them
    assert err.value.public == ("satellite data option indices='ndvi': band role 'nir' unknown for this site's 4 "
                                "bands; give it with band_roles, e.g. band_roles=red=B04,nir=B08,green=B03")


def test_a_product_missing_a_band_file_does_not_outvote_complete_rasters(tmp_path):
    """Each raster is one vote for the band count: a Sentinel-2 product missing its B05 file
    (12 band files) used to count 12 and skip every complete 13-band GeoTIFF beside it."""
    from domains.satellite import make_demo_archive
    from fedmoco.data import DataConfig, build_pretrain_data

    root = make_demo_archive(tmp_path / "s13", bands=13, seed=0, tile_size=32)
    gone = [p for p in root.rglob("*_B05.jp2*")]
    assert gone
    for p in gone:
        p.unlink()
    data = build_pretrain_data("satellite", root, DataConfig(image_size=32, cache=False))
    assert data.in_channels == 13
    assert any("wrong band count" in reason for reason in data.skipped)


def _rgb_file(path, count=3, alpha_rows=0, size=32):
    """An 8-bit RGB (RGBA with count=4) GeoTIFF tagged red, green, blue (and alpha), as a true-colour
    preview such as Sentinel-2's _TCI_ is; alpha 0 on the first ``alpha_rows`` rows."""
    import rasterio

    data = np.full((count, size, size), 100, np.uint8)
    data[:3] = np.array([60, 120, 180], np.uint8)[:, None, None]
    if count == 4:
        data[3] = 255
        data[3, :alpha_rows] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=count, dtype="uint8",
                       crs="EPSG:32632", transform=from_origin(300000, 5000000, 10, 10), photometric="RGB",
                       **({"alpha": "YES"} if count == 4 else {})) as dst:
        dst.write(data)
    return path


def test_true_colour_previews_do_not_outvote_the_spectral_product(tmp_path):
    """A Sentinel-2 L2A folder: the R10m/R20m/R60m _TCI_ files (3-band, 8-bit RGB) outvoted its
    one per-band product 3 to 1, so the folder trained on its previews and skipped every band
    file (found by an audit). The product decides; the previews are skipped."""
    import warnings

    from domains.satellite.reader import band_file_key

    root = tmp_path / "IMG_DATA"
    scene = "T32TNS_20230601T103629"
    for folder, res in (("R10m", 10), ("R20m", 20), ("R60m", 60)):
        n = 960 // res
        for band in {"R10m": ["B02", "B03", "B04", "B08"], "R20m": ["B05", "B8A"], "R60m": ["B01"]}[folder]:
            write_raster(root / folder / f"{scene}_{band}_{res}m.tif", np.full((1, n, n), 1000, np.uint16),
                         transform=from_origin(300000, 5000000, res, res), nodata=0)
        _rgb_file(root / folder / f"{scene}_TCI_{res}m.tif", size=n)
    assert band_file_key(root / "R10m" / f"{scene}_TCI_10m.tif") is None  # not a band file: a source of its own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = build_pretrain_data(root, cfg())
    assert data.in_channels == 7
    assert data.skipped == Counter({"wrong band count": 3})
    # a folder of RGB imagery alone still trains on it
    assert build_pretrain_data(_rgb_file(tmp_path / "aerial" / "a.tif").parent, cfg()).in_channels == 3


def test_an_alpha_band_is_a_mask_not_a_channel(tmp_path):
    """An RGBA GeoTIFF was read as 4 channels, its alpha named 'nir' (NDVI computed from it) and
    its transparent pixels taken as valid zeros (found by an audit)."""
    from domains.satellite.reader import read_tile

    path = _rgb_file(tmp_path / "rgba" / "a.tif", count=4, alpha_rows=2)
    tile = read_tile(path)
    assert tile.shape == (3, 32, 32)
    assert tile.mask[:, :2].all() and not tile.mask[:, 2:].any()  # alpha 0: masked in every band
    np.testing.assert_allclose(tile.data[:, 5, 5], np.array([60, 120, 180]) / 255, rtol=1e-6)
    assert build_pretrain_data(path.parent, cfg()).in_channels == 3


def test_rasters_with_the_same_bands_in_another_order_are_stacked_by_name(tmp_path, caplog):
    """Without `bands`, a file described B08, B04, B03, B02 was stacked by position beside one
    described B02, B03, B04, B08: NIR fed as blue, and NDVI's roles pointed at the wrong band
    (found by an audit)."""
    values = {"B02": 0.1, "B03": 0.2, "B04": 0.3, "B08": 0.4}
    for name, order in (("a.tif", ["B02", "B03", "B04", "B08"]), ("b.tif", ["B08", "B04", "B03", "B02"])):
        dn = np.stack([np.full((32, 32), round(values[b] * 1e4), np.uint16) for b in order])
        write_raster(tmp_path / "d" / name, dn, transform=from_origin(0, 0, 10, 10), descriptions=order)
    data = build_pretrain_data(tmp_path / "d", cfg(sampling="grid"))
    reader = data.dataset.reader
    for i in range(len(reader.sources)):
        tile = reader.read(i, (0, 0, 32, 32))
        np.testing.assert_allclose(tile.data[:, 0, 0], [0.1, 0.2, 0.3, 0.4], atol=1e-3)  # the float16 cache
    np.testing.assert_allclose(data.normalization.mean, [0.1, 0.2, 0.3, 0.4], rtol=1e-5)
    # an undescribed raster ahead of them took the reference, and left them all stacked by position
    dn = np.stack([np.full((32, 32), round(values[b] * 1e4), np.uint16) for b in ["B02", "B03", "B04", "B08"]])
    write_raster(tmp_path / "u" / "0.tif", dn, transform=from_origin(0, 0, 10, 10))
    for name in ("a.tif", "b.tif"):
        shutil.copy(tmp_path / "d" / name, tmp_path / "u" / name)
    reader = build_pretrain_data(tmp_path / "u", cfg(sampling="grid")).dataset.reader
    for i in range(len(reader.sources)):
        np.testing.assert_allclose(reader.read(i, (0, 0, 32, 32)).data[:, 0, 0], [0.1, 0.2, 0.3, 0.4], atol=1e-3)
    # other descriptions are stacked as they are, and said so
    dn = np.stack([np.full((32, 32), 1000, np.uint16)] * 4)
    write_raster(tmp_path / "d" / "c.tif", dn, transform=from_origin(0, 0, 10, 10), descriptions=["x", "y", "z", "w"])
    with caplog.at_level(logging.WARNING):
        build_pretrain_data(tmp_path / "d", cfg(sampling="grid"))
    assert "c.tif: its band descriptions (X, Y, Z, W) differ from the first raster's (B02, B03, B04, B08)" in caplog.text
