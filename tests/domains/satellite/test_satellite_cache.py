"""The satellite raster cache: tiles come from it, equal to GDAL's reads, rebuilt on change."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

from domains.satellite.reader import RasterReadError, RasterSource
from fedmoco.data import DataConfig, build_pretrain_data


def _data(root, cache_dir, **options):
    return build_pretrain_data("satellite", root, DataConfig(image_size=32, cache_dir=str(cache_dir), options=options))


def test_cached_tiles_equal_gdal_reads(demo4, tmp_path):
    reader = _data(demo4, tmp_path / "c").dataset.reader
    assert reader.cache is not None and all(c.filled() == 1 for c in reader.cache)
    for i in range(len(reader.sources)):
        window = (3, 5, 20, 16)
        cached = reader.read(i, window)
        direct = reader.sources[i].read(window, reader.layout.positions[i])
        np.testing.assert_array_equal(np.ma.getmaskarray(cached), np.ma.getmaskarray(direct))
        valid = ~np.ma.getmaskarray(direct)
        np.testing.assert_allclose(cached.data[valid], direct.data[valid], rtol=2**-10, atol=1e-6)


def test_windows_across_blocks_and_at_the_edges_equal_gdal_reads(demo4, tmp_path):
    """The cache stores 64 px blocks; a window is put together from up to four of them (more
    for larger windows), and the last block row and column are cut at the raster's edge."""
    reader = _data(demo4, tmp_path / "c").dataset.reader
    for i, source in enumerate(reader.sources):
        h, w = source.grid.height, source.grid.width
        assert reader.cache[i].shape[:2] == (-(-h // 64), -(-w // 64))
        for window in [(50, 60, 30, 20), (63, 63, 2, 2), (0, 0, w, h), (w - 37, h - 41, 37, 41), (64, 0, 64, 64)]:
            if window[0] + window[2] > w or window[1] + window[3] > h:
                continue
            direct = reader.sources[i].read(window, reader.layout.positions[i])
            got = reader.read(i, window)
            valid = ~np.ma.getmaskarray(direct)
            np.testing.assert_array_equal(np.ma.getmaskarray(got), ~valid)
            np.testing.assert_allclose(got.data[valid], direct.data[valid], rtol=2**-10, atol=1e-6)


def test_a_window_is_taken_from_the_blocks_holding_it():
    from domains.satellite.dataset import blocks_shape, window_from_blocks

    rng = np.random.default_rng(0)
    image = rng.random((3, 150, 200)).astype(np.float16)  # 3 x 4 blocks of 64, the last ones cut
    shape = blocks_shape(3, 150, 200)
    assert shape == (3, 4, 3, 64, 64)
    padded = np.full((3, 192, 256), np.nan, np.float16)
    padded[:, :150, :200] = image
    blocks = padded.reshape(3, 3, 64, 4, 64).transpose(1, 3, 0, 2, 4).copy()
    for _ in range(50):
        h, w = int(rng.integers(1, 150)), int(rng.integers(1, 200))
        row, col = int(rng.integers(0, 150 - h + 1)), int(rng.integers(0, 200 - w + 1))
        got = window_from_blocks(blocks, (col, row, w, h))
        assert got.flags.c_contiguous and np.array_equal(got, image[:, row:row + h, col:col + w])


@pytest.mark.parametrize("bands, height, width", [(13, 1000, 700), (4, 65535, 65535), (13, 70, 40), (2, 64, 64),
                                                  (13, 10000, 10000), (200, 3000, 3000)])
def test_fill_reads_cover_the_raster_once_in_bounded_block_aligned_reads(bands, height, width):
    from domains.satellite.dataset import _FILL_BYTES, fill_reads

    reads = fill_reads(bands, height, width)
    assert sum(w * h for _, _, w, h in reads) == height * width  # disjoint and covering (in bounds below)
    for col, row, w, h in reads:
        assert col % 64 == 0 and row % 64 == 0 and col + w <= width and row + h <= height
        assert 8 * bands * w * h <= max(_FILL_BYTES, 8 * bands * 64 * 64)
    covered = {(c, r) for c, r, _, _ in reads}
    assert len(covered) == len(reads)
    if bands <= 13:  # whole 512 px squares of source blocks per read: each decoded once
        assert all(col % 512 == 0 and row % 512 == 0 for col, row, _, _ in reads)


def test_changed_raster_or_no_cache(demo4, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(demo4, root)
    first = _data(root, tmp_path / "c").dataset.reader.cache
    victim = sorted(p for p in root.rglob("*.tif"))[0]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = _data(root, tmp_path / "c").dataset.reader.cache
    assert {c.path for c in first} != {c.path for c in second}
    assert sum(not c.path.exists() for c in first) == 1  # only the touched raster's cache went
    assert _data(root, tmp_path / "c", cache="false").dataset.reader.cache is None


def test_a_raster_rewritten_with_its_mtime_put_back_or_during_its_fill_is_read_from_disk(
        demo4, tmp_path, monkeypatch, rewrite_keeping_mtime):
    """Size and mtime as before (``cp -p``, or a write during the fill, as a restore leaves it):
    the ctime still moves, so the cache of the old version, or a fill that may mix both, is
    never served (GDAL reads the file), and the next run keys a new cache."""
    import domains.satellite.dataset as satellite_dataset

    root = tmp_path / "copy"
    shutil.copytree(demo4, root)
    reader = _data(root, tmp_path / "c").dataset.reader
    victim = sorted(root.rglob("*.tif"))[0]
    i = next(j for j, s in enumerate(reader.sources) if str(victim) in map(str, s.paths))
    rewrite_keeping_mtime(victim)
    assert reader._cached(i, (0, 0, 8, 8)) is None  # this run: read through GDAL
    assert reader._cached(next(j for j in range(len(reader.sources)) if j != i), (0, 0, 8, 8)) is not None
    assert _data(root, tmp_path / "c").dataset.reader.cache[i].path != reader.cache[i].path

    real = satellite_dataset.fill_reads

    def rewritten_after_the_first_read(*args):  # the fill's reads, the file rewritten after the first
        reads = real(*args)
        yield reads[0]
        rewrite_keeping_mtime(victim)
        yield from reads[1:]

    shutil.rmtree(tmp_path / "c")
    monkeypatch.setattr(satellite_dataset, "fill_reads", rewritten_after_the_first_read)
    reader = _data(root, tmp_path / "c").dataset.reader
    assert reader.cache[i].filled() == 1 and reader._cached(i, (0, 0, 8, 8)) is None


def test_batched_views_from_cached_tiles(demo4, tmp_path):
    ds = _data(demo4, tmp_path / "c").dataset
    tiles, views = ds.batched_views()
    batch = torch_stack([tiles[i] for i in range(8)])
    q, k = views(batch)
    assert q.shape == k.shape == (8, ds.reader.layout.in_channels, 32, 32)


def test_without_a_cache_the_batched_views_see_the_same_tiles_and_draws(demo4, tmp_path, first_batch):
    import torch

    cached = _data(demo4, tmp_path / "c", sampling="grid").dataset
    plain = _data(demo4, tmp_path / "c", sampling="grid", cache="false").dataset
    assert cached.reader.cache is not None and plain.reader.cache is None
    assert plain.batched_views() is not None
    tiles_c, tiles_p = cached.batched_views()[0], plain.batched_views()[0]
    for i in range(len(cached)):
        a, b = tiles_c[i], tiles_p[i]
        assert a.dtype == b.dtype == torch.float16
        assert torch.equal(a, b), i
    assert all(torch.equal(x, y) for x, y in zip(first_batch(cached), first_batch(plain)))


def torch_stack(items):
    import torch

    return torch.stack(items)


def test_statistics_come_from_the_rasters_not_the_float16_cache(demo4, tmp_path):
    cached = _data(demo4, tmp_path / "c")
    assert cached.dataset.reader.cache is not None
    plain = _data(demo4, tmp_path / "c", cache="false")
    assert cached.normalization.to_dict() == plain.normalization.to_dict()


def test_a_raster_changed_during_the_run_is_not_served_from_the_cache(demo4, tmp_path, monkeypatch):
    root = tmp_path / "copy"
    shutil.copytree(demo4, root, ignore=shutil.ignore_patterns("broken", "timeseries"))
    reader = _data(root, tmp_path / "c", sampling="grid").dataset.reader
    assert reader.cache is not None and all(c.filled() == 1 for c in reader.cache)
    victim = root / "4band_uint16_tiled_deflate.tif"
    i = next(j for j, s in enumerate(reader.sources) if s.paths == [str(victim)])
    victim.write_bytes(victim.read_bytes()[:2000])  # truncated after the cache was filled
    with pytest.raises(RasterReadError, match="unreadable"):
        reader.read(i, (0, 0, 16, 16))

    def no_gdal(*args, **kwargs):
        raise AssertionError("read through GDAL")

    monkeypatch.setattr(RasterSource, "read", no_gdal)
    other = (i + 1) % len(reader.sources)
    assert reader.read(other, (0, 0, 16, 16)).shape == (reader.sources[other].count, 16, 16)  # still cached


def test_filled_float16_reads_equal_the_masked_path(demo4, tmp_path):
    """read_filled (the batched feed's read) gives bit for bit what filled(read()).half() gives,
    masked pixels included, and the same nodata fraction."""
    import torch

    from domains.satellite.dataset import nodata_fraction

    root = tmp_path / "copy"
    shutil.copytree(demo4, root, ignore=shutil.ignore_patterns("broken", "timeseries"))
    reader = _data(root, tmp_path / "c").dataset.reader
    before = reader.read_filled(0, (3, 2, 20, 16))[1]
    hit = reader.cache[0].get(0)[0]  # (block rows, block columns, bands, 64, 64); writes reach the file
    hit[0, 0, 1, 4:9, 6:8] = np.nan  # masked pixels in band 2 (as the cache stores nodata)
    hit[0, 0, 0, 4, 6] = np.inf
    for i, window in [(0, (3, 2, 20, 16)), (0, (0, 0, 8, 8)), (1, (3, 5, 20, 16))]:
        tile = reader.read(i, window)
        fast, fraction = reader.read_filled(i, window)
        assert fast.dtype == torch.float16
        torch.testing.assert_close(fast, reader.filled(tile).half(), atol=0, rtol=0)
        assert fraction == nodata_fraction(tile)
        wide, _ = reader.read_filled(i, window, dtype=torch.float32)  # the per-sample views' read
        torch.testing.assert_close(wide, reader.filled(tile), atol=0, rtol=0)
    assert reader.read_filled(0, (3, 2, 20, 16))[1] > before  # the injected pixels count as nodata


def test_band_statistics_are_remembered_until_a_file_changes(demo4, tmp_path, monkeypatch):
    import domains.satellite.dataset as sat

    root = tmp_path / "copy"
    shutil.copytree(demo4, root, ignore=shutil.ignore_patterns("broken", "timeseries"))
    calls = []
    original = sat.estimate_normalization
    monkeypatch.setattr(sat, "estimate_normalization", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = _data(root, tmp_path / "c").normalization
    again = _data(root, tmp_path / "c").normalization
    assert len(calls) == 1 and again == first  # the second round reads the memo
    _data(root, tmp_path / "c", stats_tiles=7)
    assert len(calls) == 2  # another option: estimated again
    victim = sorted(root.rglob("*.tif"))[0]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _data(root, tmp_path / "c").normalization == first and len(calls) == 3  # a touched file: again
    _data(root, tmp_path / "c", cache="false")
    assert len(calls) == 4  # cache off: nothing remembered
    assert len(list((tmp_path / "c" / "memo").glob("*.json"))) == 1  # older memos of the folder removed


@pytest.mark.parametrize("damage", ["truncated", {"meaN": [1.0]}, [1, 2], {"mean": [0.1] * 4, "std": [0.0] * 4},
                                    {"mean": [0.1] * 3, "std": [0.2] * 3}, {"mean": ["x"] * 4, "std": [1] * 4}])
def test_a_damaged_band_statistics_memo_is_computed_again(demo4, tmp_path, monkeypatch, caplog, damage):
    """A damaged or edited memo gave a KeyError / TypeError traceback, or "std must be > 0"
    naming no file, on every run until the cache was cleared (found by an audit)."""
    import json

    import domains.satellite.dataset as sat

    root = tmp_path / "copy"
    shutil.copytree(demo4, root, ignore=shutil.ignore_patterns("broken", "timeseries"))
    first = _data(root, tmp_path / "c").normalization
    (memo,) = (tmp_path / "c" / "memo").glob("*.json")
    memo.write_text(memo.read_text()[:20] if damage == "truncated" else json.dumps(damage))
    calls = []
    original = sat.estimate_normalization
    monkeypatch.setattr(sat, "estimate_normalization", lambda *a, **k: calls.append(1) or original(*a, **k))
    with caplog.at_level(logging.WARNING):
        assert _data(root, tmp_path / "c").normalization == first and len(calls) == 1
    assert ("ignoring an unreadable memo (JSONDecodeError)" if damage == "truncated"
            else "ignoring a damaged band-statistics memo in the cache") in caplog.text
    assert json.loads(memo.read_text()) == first.to_dict()  # written again, whole


def test_the_band_statistics_memo_is_keyed_by_the_band_positions(demo4, tmp_path, monkeypatch):
    """Same files and options, bands stacked in another order (rasters with reordered descriptions
    are now reconciled): the memo of the old stacking was reused (found by a review)."""
    import domains.satellite.dataset as sat

    root = tmp_path / "copy"
    shutil.copytree(demo4, root, ignore=shutil.ignore_patterns("broken", "timeseries"))
    data = _data(root, tmp_path / "c")
    sources = data.dataset.reader.sources
    opts = sat.parse_options({})
    calls = []
    estimate = lambda: calls.append(1) or data.normalization  # noqa: E731
    cfg = DataConfig(image_size=32, seed=0, cache_dir=str(tmp_path / "c"))
    assert data.dataset.reader.layout.positions == [[0, 1, 2, 3]] * len(sources)
    sat._cached_statistics(root, sources, opts, cfg, estimate, 4, [[0, 1, 2, 3]] * len(sources))
    assert calls == []  # the build's own memo: read back
    sat._cached_statistics(root, sources, opts, cfg, estimate, 4, [[3, 2, 1, 0]] * len(sources))
    assert calls == [1]  # another stacking of the same files: estimated again


def test_rasters_are_cached_while_they_fit_in_cache_max_gb(demo4, tmp_path):
    """Rasters are cached in order until cache_max_gb is spent; the others are read through GDAL,
    and every tile equals GDAL's read either way."""
    full = _data(demo4, tmp_path / "c").dataset.reader
    sizes = [c.nbytes - c.offset for c in full.cache]
    budget = (sizes[0] + sizes[1] + sizes[2] // 2) / 1e9  # room for the first two only
    reader = _data(demo4, tmp_path / "c2", cache_max_gb=str(budget)).dataset.reader
    assert [c is not None for c in reader.cache] == [True, True] + [False] * (len(sizes) - 2)
    for i in range(len(reader.sources)):
        window = (2, 4, 16, 16)
        direct = reader.sources[i].read(window, reader.layout.positions[i])
        got = reader.read(i, window)
        valid = ~np.ma.getmaskarray(direct)
        np.testing.assert_array_equal(np.ma.getmaskarray(got), ~valid)
        np.testing.assert_allclose(got.data[valid], direct.data[valid], rtol=2**-10, atol=1e-6)


def test_a_sparse_raster_declaring_65535_squared_is_not_cached(demo4, tmp_path, caplog):
    """An 800 kB sparse GeoTIFF that declares 65535 x 65535 x 4 bands would need a 34 GB cache (and
    once took 32 GiB of RAM to fill, a MemoryError traceback). By default it is skipped
    (max_compression_ratio, tests/domains/satellite/test_satellite_bombs.py); a site that lifts
    that limit reads it through GDAL, and the folder builds in seconds with the other rasters
    cached."""
    import logging

    import rasterio
    from rasterio.transform import from_origin

    root = tmp_path / "copy"
    shutil.copytree(demo4, root)
    profile = dict(driver="GTiff", width=65535, height=65535, count=4, dtype="uint16", tiled=True,
                   blockxsize=256, blockysize=256, sparse_ok=True, crs="EPSG:32633",
                   transform=from_origin(500000, 4000000, 10, 10))
    with rasterio.open(root / "huge.tif", "w", **profile):
        pass
    assert (root / "huge.tif").stat().st_size < 2_000_000
    with caplog.at_level(logging.WARNING):
        reader = _data(root, tmp_path / "c", max_compression_ratio=1e9).dataset.reader
    huge = [i for i, s in enumerate(reader.sources) if s.grid.width == 65535]
    assert len(huge) == 1 and reader.cache[huge[0]] is None
    assert sum(c is not None and c.filled() == 1 for c in reader.cache) == len(reader.sources) - 1
    assert "huge.tif: not cached, read from disk each time: its cache would take 34.4 GB, over the 16.0 GB " \
           "left of cache_max_gb 16" in caplog.text
    assert reader.read(huge[0], (1000, 2000, 32, 32)).shape == (4, 32, 32)


def test_rasters_whose_caches_fit_one_by_one_but_not_together_are_not_cached(demo4, tmp_path, monkeypatch, caplog):
    """A raster cache is a sparse file, so free disk does not fall as the caches are opened; the
    reserve is checked against all of them that are not filled yet, not one at a time (three
    5 GB rasters with 12 GB free once all passed, and filling them would have filled the disk)."""
    full = _data(demo4, tmp_path / "c").dataset.reader
    sizes = [c.nbytes for c in full.cache]
    free = 2 * 10**9 + max(sizes) + 1  # room for any one cache above a 2 GB reserve, not for all
    monkeypatch.setattr("fedmoco.cache._free_bytes", lambda folder: free)
    monkeypatch.setenv("FEDMOCO_CACHE_MIN_FREE_GB", "2")
    reader = _data(demo4, tmp_path / "c2").dataset.reader
    assert reader.cache is None
    assert "decoding every epoch instead" in caplog.text
    monkeypatch.setattr("fedmoco.cache._free_bytes", lambda folder: 2 * 10**9 + sum(sizes))
    assert all(c is not None for c in _data(demo4, tmp_path / "c3").dataset.reader.cache)


def test_a_cache_that_cannot_be_filled_is_dropped_and_its_raster_read_from_disk(demo4, tmp_path, monkeypatch, caplog):
    """Other files may fill the volume between the room check and the fill: the write fails with
    an OSError, and the raster and those after it are read through GDAL, the partial file gone."""
    from fedmoco.cache import SampleCache

    calls = []

    def full_disk(self, i, start, values):
        calls.append(self.path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SampleCache, "write", full_disk)
    reader = _data(demo4, tmp_path / "c").dataset.reader
    assert reader.cache is not None and all(c is None for c in reader.cache)
    assert len(calls) == 1 and not calls[0].exists()
    assert "cannot fill the raster cache ([Errno 28] No space left on device)" in caplog.text
    window = (2, 4, 16, 16)
    direct = reader.sources[0].read(window, reader.layout.positions[0])
    np.testing.assert_array_equal(reader.read(0, window).data, direct.data)


def test_a_raster_replaced_during_the_run_is_read_through_a_new_handle(demo4, tmp_path):
    """Uncached sources read through this process's handles: a file replaced by rename
    (rsync's default, a restore) must give its new pixels, not the old inode's."""
    from domains.satellite import make_demo_archive

    root = tmp_path / "copy"
    shutil.copytree(demo4, root)
    other = make_demo_archive(tmp_path / "other", bands=4, seed=5, tile_size=32)
    reader = _data(root, tmp_path / "c", cache="false").dataset.reader
    path = reader.sources[0].paths[0]
    window = (0, 0, 16, 16)
    before = reader.read(0, window).data.copy()  # opens this process's handle
    shutil.copyfile(os.path.join(other, os.path.relpath(path, root)), path + ".new")
    os.replace(path + ".new", path)
    after = reader.read(0, window).data  # before any other build, which would close the handles
    fresh = _data(root, tmp_path / "c2", cache="false").dataset.reader.read(0, window).data
    assert not np.array_equal(fresh, before)
    np.testing.assert_array_equal(after, fresh)
