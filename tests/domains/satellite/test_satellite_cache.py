"""The satellite raster cache: tiles come from it, equal to GDAL's reads, rebuilt on change."""

from __future__ import annotations

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


def test_batched_views_from_cached_tiles(demo4, tmp_path):
    ds = _data(demo4, tmp_path / "c").dataset
    tiles, views = ds.batched_views()
    batch = torch_stack([tiles[i] for i in range(8)])
    q, k = views(batch)
    assert q.shape == k.shape == (8, ds.reader.layout.in_channels, 32, 32)


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
