"""A raster whose one block decodes to gigabytes is refused before any pixel is read.

The bomb is built byte by byte here: a GeoTIFF (UTM 33N) of 40000 x 40000 uint16 stored as
one deflate strip of a few bytes. GDAL decodes whole strips, so without the check reading a
64 x 64 window allocates the 3.2 GB strip.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from domains.satellite.options import parse_options
from domains.satellite.reader import TOO_LARGE, RasterReadError, block_bytes, inspect_file, read_tile

ROOT = Path(__file__).resolve().parents[3]
PEAK_MB = 150


def strip_bomb(path: Path, size: int = 40000) -> Path:
    """A single-strip deflate GeoTIFF of ``size`` x ``size`` uint16 in about 500 bytes."""
    data = zlib.compress(b"\0" * 64, 9)  # the strip's data: far less than it declares
    geo = struct.pack("<3d", 10.0, 10.0, 0.0)  # ModelPixelScale
    tie = struct.pack("<6d", 0, 0, 0, 500000.0, 4000000.0, 0.0)  # ModelTiepoint
    keys = struct.pack("<16H", 1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)  # GeoKeyDirectory
    # (tag, type, count, value or payload); type 3 SHORT, 4 LONG, 12 DOUBLE
    entries = [(256, 4, 1, size), (257, 4, 1, size), (258, 3, 1, 16), (259, 3, 1, 8), (262, 3, 1, 1),
               (273, 4, 1, None), (277, 3, 1, 1), (278, 4, 1, size), (279, 4, 1, len(data)), (284, 3, 1, 1),
               (339, 3, 1, 1), (33550, 12, 3, geo), (33922, 12, 6, tie), (34735, 3, 16, keys)]
    ifd_size = 2 + 12 * len(entries) + 4
    payload_at = 8 + ifd_size
    payloads, body = {}, b""
    for tag, _, _, value in entries:
        if isinstance(value, bytes):
            payloads[tag] = payload_at + len(body)
            body += value
    strip_at = payload_at + len(body)
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if tag == 273:
            value = strip_at
        if isinstance(value, bytes):
            ifd += struct.pack("<HHII", tag, kind, count, payloads[tag])
        elif kind == 3:
            ifd += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, kind, count, value)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + body + data)
    return path


def test_the_bomb_is_what_it_claims(tmp_path):
    path = strip_bomb(tmp_path / "bomb.tif")
    assert path.stat().st_size < 600
    with rasterio.open(path) as src:
        assert (src.width, src.height, src.count, src.dtypes[0]) == (40000, 40000, 1, "uint16")
        assert src.block_shapes == [(40000, 40000)] and src.compression.name == "deflate"
        assert src.crs.to_epsg() == 32633
        assert block_bytes(src) == 40000 * 40000 * 2


def test_the_strip_bomb_is_refused_with_its_reason(tmp_path):
    path = strip_bomb(tmp_path / "bomb.tif")
    with pytest.raises(RasterReadError) as err:
        read_tile(path, (0, 0, 64, 64))
    assert err.value.reason == TOO_LARGE
    assert str(err.value) == (f"{path}: too large (one block is 40000 x 40000 pixels x 1 band(s) of uint16, "
                              "3052 MiB decoded, over max_block_mb 256; GDAL decodes whole blocks even for a "
                              "small window)")


def test_refusing_the_bomb_keeps_memory_bounded(tmp_path):
    path = strip_bomb(tmp_path / "bomb.tif")
    script = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from domains.satellite.reader import RasterReadError, read_tile
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_tile({str(path)!r}, (0, 0, 64, 64))
            reason = None
        except RasterReadError as exc:
            reason = exc.reason
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"reason": reason, "delta_mb": (after - before) / 1024}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["reason"] == TOO_LARGE and result["delta_mb"] < PEAK_MB, result


def test_the_limit_is_a_data_option_and_counts_every_band(tmp_path):
    path = tmp_path / "ok.tif"
    with rasterio.open(path, "w", driver="GTiff", width=256, height=256, count=4, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 10, 10), tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate") as dst:
        dst.write(np.ones((4, 256, 256), np.uint16))
    assert len(inspect_file(path).bands) == 4
    # one 256 x 256 block of 4 uint16 bands is 0.5 MiB
    with pytest.raises(RasterReadError) as err:
        inspect_file(path, max_block_mb=0.4)
    assert err.value.reason == TOO_LARGE and "256 x 256 pixels x 4 band(s) of uint16, 0 MiB" in str(err.value)
    assert read_tile(path, (0, 0, 8, 8), max_block_mb=0.6).shape == (4, 8, 8)
    assert parse_options({"max_block_mb": "0.4"}).max_block_mb == 0.4
    with pytest.raises(Exception) as err:
        parse_options({"max_block_mb": "0"})
    assert "max_block_mb" in str(err.value) and "must be > 0" in str(err.value)


def test_a_folder_scan_skips_the_bomb_and_keeps_the_good_file(tmp_path):
    from domains.satellite.dataset import scan_folder

    strip_bomb(tmp_path / "bomb.tif")
    with rasterio.open(tmp_path / "ok.tif", "w", driver="GTiff", width=64, height=64, count=4, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(np.full((4, 64, 64), 1000, np.uint16))
    scan = scan_folder(tmp_path, parse_options({}))
    assert [Path(s.name).name for s in scan.sources] == ["ok.tif"]
    assert scan.skipped == {TOO_LARGE: 1}


def _good(path: Path, size: int = 64, value: float = 1000.0, dtype: str = "uint16") -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=4, dtype=dtype,
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(np.full((4, size, size), value, dtype))
    return path


def test_a_header_declaring_more_pixels_than_the_limit_is_refused_unread(tmp_path):
    # 300000 x 300000 uint16 x 4 bands in a tiled BigTIFF: a few hundred KB on disk (no tile
    # written), 720 GB declared; its blocks are small, so only the declared size can refuse it.
    with rasterio.open(tmp_path / "sparse.tif", "w", driver="GTiff", width=300000, height=300000, count=4,
                       dtype="uint16", crs="EPSG:32633", transform=from_origin(500000, 4000000, 10, 10),
                       tiled=True, blockxsize=256, blockysize=256, BIGTIFF="YES", SPARSE_OK="TRUE"):
        pass
    assert (tmp_path / "sparse.tif").stat().st_size < 20e6
    with pytest.raises(RasterReadError) as err:
        inspect_file(tmp_path / "sparse.tif")
    assert err.value.reason == TOO_LARGE
    assert "declares 300000 x 300000 pixels, over max_raster_pixels 4,294,967,296" in str(err.value)
    # within a raised pixel limit, it stores 1 byte for every ~3 million it declares
    with pytest.raises(RasterReadError, match=r"declares 300000 x 300000 pixels x 4 bands, 720 GB decoded, in "
                                              r"[\d,]+ bytes on disk: over max_compression_ratio 1000 \(a file of "
                                              r"mostly missing blocks\); raise it if such files are yours"):
        inspect_file(tmp_path / "sparse.tif", max_raster_pixels=300000**2)
    assert len(inspect_file(tmp_path / "sparse.tif", max_raster_pixels=300000**2,
                            max_compression_ratio=1e9).bands) == 4

    from domains.satellite.dataset import scan_folder
    _good(tmp_path / "ok.tif")
    scan = scan_folder(tmp_path, parse_options({}))
    assert [Path(s.name).name for s in scan.sources] == ["ok.tif"] and scan.skipped == {TOO_LARGE: 1}
    with pytest.raises(Exception, match="max_raster_pixels"):
        parse_options({"max_raster_pixels": "0"})


def test_a_tiny_file_declaring_65535_squared_pixels_is_refused_by_its_stored_bytes(tmp_path):
    """A 2.5 KB sparse GeoTIFF of 65535 x 65535 px passes max_raster_pixels (2^32), and tiles are
    drawn in proportion to area: it was nearly every tile of the epoch (check-site: 1,048,576
    tiles, 12 h), all blank. It holds 1 byte for every ~14 million it declares, so it is skipped;
    a real raster, and even a constant one under deflate (~1000x at most), passes."""
    from domains.satellite.dataset import scan_folder

    with rasterio.open(tmp_path / "huge.tif", "w", driver="GTiff", width=65535, height=65535, count=4,
                       dtype="uint16", crs="EPSG:32633", transform=from_origin(500000, 4000000, 10, 10),
                       tiled=True, blockxsize=4096, blockysize=4096, compress="deflate", sparse_ok=True):
        pass
    assert (tmp_path / "huge.tif").stat().st_size < 10_000
    with rasterio.open(tmp_path / "zeros.tif", "w", driver="GTiff", width=4096, height=4096, count=4, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 10, 10), tiled=True,
                       compress="deflate") as dst:  # 134 MB of zeros, written: deflate's best
        dst.write(np.zeros((4, 4096, 4096), np.uint16))
    assert 134e6 / (tmp_path / "zeros.tif").stat().st_size < 1100
    _good(tmp_path / "ok.tif")
    scan = scan_folder(tmp_path, parse_options({}))
    assert sorted(Path(s.name).name for s in scan.sources) == ["ok.tif", "zeros.tif"]
    assert scan.skipped == {TOO_LARGE: 1}
    with pytest.raises(Exception, match="max_compression_ratio"):
        parse_options({"max_compression_ratio": "0.5"})


def test_the_automatic_epoch_is_capped():
    from domains.satellite.dataset import MAX_AUTO_EPOCH, auto_epoch_length

    assert auto_epoch_length(np.array([3.0, 4.0])) == 7
    # 65536^2 px in 64 px tiles is exactly the cap; the area of the refused file above is far over it
    assert auto_epoch_length(np.array([65536.0**2 / 64**2])) == MAX_AUTO_EPOCH == 2**20
    assert auto_epoch_length(np.array([300000.0**2 / 64**2, 10.0])) == MAX_AUTO_EPOCH


def test_a_vrt_is_not_opened_so_it_cannot_point_outside_the_folder(tmp_path):
    from domains.satellite.dataset import scan_folder
    from domains.satellite.reader import NOT_A_RASTER

    outside = _good(tmp_path / "outside.tif")
    site = tmp_path / "site"
    site.mkdir()
    _good(site / "ok.tif")
    (site / "scene.vrt").write_text(
        '<VRTDataset rasterXSize="64" rasterYSize="64">' + "".join(
            f'<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource><SourceFilename relativeToVRT="0">'
            f'{outside}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>'
            for b in range(1, 5)) + "</VRTDataset>")
    with rasterio.open(site / "scene.vrt") as src:  # GDAL itself would read the outside file through it
        assert src.read(1)[0, 0] == 1000
    with pytest.raises(RasterReadError) as err:
        inspect_file(site / "scene.vrt")
    assert err.value.reason == NOT_A_RASTER and "VRT" in str(err.value)
    scan = scan_folder(site, parse_options({}))
    assert [Path(s.name).name for s in scan.sources] == ["ok.tif"] and scan.skipped == {NOT_A_RASTER: 1}


def test_a_file_name_that_is_not_utf8_is_skipped_not_fatal(tmp_path):
    from domains.satellite.dataset import scan_folder
    from domains.satellite.reader import UNREADABLE

    _good(tmp_path / "ok.tif")
    bad = Path(os.fsdecode(os.fsencode(tmp_path) + b"/bad\xff\xfe.tif"))
    shutil.copy(tmp_path / "ok.tif", bad)
    with pytest.raises(RasterReadError) as err:
        inspect_file(bad)
    assert err.value.reason == UNREADABLE and "not valid UTF-8" in str(err.value)
    scan = scan_folder(tmp_path, parse_options({}))
    assert [Path(s.name).name for s in scan.sources] == ["ok.tif"] and scan.skipped == {UNREADABLE: 1}


def test_values_beyond_float16_are_masked_and_leave_the_statistics_alone(tmp_path):
    from domains.satellite import build_pretrain_data
    from fedmoco.data import DataConfig

    huge = np.full((4, 64, 64), 0.3, np.float32)
    huge[:, :8] = 1e38  # finite float32, no reflectance: 8 of 64 rows
    with rasterio.open(tmp_path / "huge.tif", "w", driver="GTiff", width=64, height=64, count=4, dtype="float32",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(huge)
    tile = read_tile(tmp_path / "huge.tif", (0, 0, 64, 64))
    assert np.ma.getmaskarray(tile)[:, :8].all() and not np.ma.getmaskarray(tile)[:, 8:].any()
    data = build_pretrain_data(tmp_path, DataConfig(image_size=64, seed=0, cache=False,
                                                    options={"sampling": "grid", "max_nodata": 0.2}))
    assert data.normalization.mean == pytest.approx([0.3] * 4, abs=1e-6)


def test_a_header_that_names_a_data_file_outside_the_folder_is_not_read(tmp_path):
    """An ERS header (500 bytes) with DataFile = "../secret.bin" made the site train on a file
    outside its data folder, and one naming a FIFO hung the scan (found by an audit)."""
    from domains.satellite.dataset import scan_folder
    from domains.satellite.reader import NOT_A_RASTER

    (tmp_path / "secret.bin").write_bytes(np.full((4, 32, 32), 1234, "<u2").tobytes())
    site = tmp_path / "site"
    site.mkdir()
    _good(site / "ok.tif")
    (site / "evil.ers").write_text(textwrap.dedent("""\
        DatasetHeader Begin
            Version = "6.0"
            DataSetType = ERStorage
            DataType = Raster
            ByteOrder = LSBFirst
            DataFile = "../secret.bin"
            CoordinateSpace Begin
                Datum = "RAW"
                Projection = "RAW"
                CoordinateType = RAW
            CoordinateSpace End
            RasterInfo Begin
                CellType = Unsigned16BitInteger
                NrOfLines = 32
                NrOfCellsPerLine = 32
                NrOfBands = 4
            RasterInfo End
        DatasetHeader End
        """))
    with rasterio.open(site / "evil.ers") as src:  # GDAL itself reads the outside file through it
        assert src.read(1)[0, 0] == 1234
    with pytest.raises(RasterReadError) as err:
        inspect_file(site / "evil.ers")
    assert err.value.reason == NOT_A_RASTER
    scan = scan_folder(site, parse_options({}))
    assert [Path(s.name).name for s in scan.sources] == ["ok.tif"] and scan.skipped == {NOT_A_RASTER: 1}


def test_files_a_raster_uses_must_be_regular_files_in_its_own_folder(tmp_path):
    """What any other driver opens beside a raster is held to the raster's (resolved) folder."""
    from domains.satellite.reader import _files_outside

    site, store = tmp_path / "site", tmp_path / "store"
    site.mkdir()
    store.mkdir()
    for f in (site / "a.tif", site / "a.tif.aux.xml", store / "b.tif", store / "b.tif.ovr", tmp_path / "secret.bin"):
        f.write_bytes(b"x")
    os.mkfifo(site / "pipe.bin")
    (site / "b.tif").symlink_to(store / "b.tif")  # a folder of links into a store: read, sidecars there
    (site / "b.tif.aux.xml").write_bytes(b"x")  # or beside the link (GDAL writes statistics there)
    assert _files_outside(str(site / "a.tif"), [str(site / "a.tif"), str(site / "a.tif.aux.xml")]) == []
    assert _files_outside(str(site / "b.tif"), [str(site / "b.tif"), str(store / "b.tif.ovr"),
                                                str(site / "b.tif.aux.xml")]) == []
    assert _files_outside(str(site / "a.tif"), [str(site / "a.tif"), f"{site}/../secret.bin"]) == [
        f"{site}/../secret.bin"]
    assert _files_outside(str(site / "a.tif"), [str(site / "pipe.bin")]) == [str(site / "pipe.bin")]


@pytest.mark.parametrize("coefficients", [(1e309, 0, 0, -10), (float("nan"), 0, 0, -10), (1e-300, 0, 0, -1e-300)])
def test_a_geotransform_without_a_usable_pixel_size_is_skipped(tmp_path, coefficients):
    """A pixel size of inf ended the scan in an OverflowError traceback under the resolution
    option; 1e-300 squashed the scene (found by an audit). Skipped and counted. (GDAL writes a
    pixel size of 0 as no georeferencing at all: such a file reads as not georeferenced.)"""
    from affine import Affine

    from domains.satellite.dataset import scan_folder
    from domains.satellite.reader import NOT_GEOREFERENCED

    for i in range(2):
        _good(tmp_path / f"ok{i}.tif")
    a, b, d, e = coefficients
    with rasterio.open(tmp_path / "bad.tif", "w", driver="GTiff", width=64, height=64, count=4, dtype="uint16",
                       crs="EPSG:32633", transform=Affine(a, b, 500000, d, e, 4000000)) as dst:
        dst.write(np.full((4, 64, 64), 1000, "uint16"))
    with pytest.raises(RasterReadError) as err:
        inspect_file(tmp_path / "bad.tif")
    assert err.value.reason == NOT_GEOREFERENCED and "pixel size" in str(err.value)
    scan = scan_folder(tmp_path, parse_options({"resolution": 10}))
    assert len(scan.sources) == 2 and scan.skipped == {NOT_GEOREFERENCED: 1}


def test_a_grid_rotated_by_90_degrees_keeps_its_size_when_resampled(tmp_path):
    """Its pixel size was read as |a| = 0, and resolution=10 made the 96 x 96 scene 1 x 1."""
    from affine import Affine

    from domains.satellite.reader import file_source

    with rasterio.open(tmp_path / "rot.tif", "w", driver="GTiff", width=96, height=96, count=4, dtype="uint16",
                       crs="EPSG:32633", transform=Affine(0, 10, 500000, 10, 0, 4000000)) as dst:
        dst.write(np.full((4, 96, 96), 1000, "uint16"))
    info = inspect_file(tmp_path / "rot.tif")
    assert info.grid.res == info.grid.row_res == 10.0
    same = file_source(info, resolution=10.0).grid
    coarse = file_source(info, resolution=20.0).grid
    assert (same.width, same.height) == (96, 96) and (coarse.width, coarse.height) == (48, 48)



def test_a_tile_description_naming_a_file_outside_is_not_opened(tmp_path):
    """A 224-byte TIL naming "../pipe" (a FIFO) hung the scan: GDAL opens a tile while it opens
    the description, before any check after opening (found by a review). Not opened at all."""
    from domains.satellite.dataset import scan_folder
    from domains.satellite.reader import NOT_A_RASTER

    os.mkfifo(tmp_path / "pipe")
    site = tmp_path / "site"
    site.mkdir()
    _good(site / "ok.tif")
    (site / "scene.TIL").write_text('numTiles = 1;\nBEGIN_GROUP = TILE_1\n\tfilename = "../pipe";\n'
                                    "\tULColOffset = 0;\n\tULRowOffset = 0;\n\tLRColOffset = 63;\n"
                                    "\tLRRowOffset = 63;\nEND_GROUP = TILE_1;\nEND;\n")
    (site / "scene.IMD").write_text("numRows = 64;\nnumColumns = 64;\nbitsPerPixel = 16;\n"
                                    "BEGIN_GROUP = BAND_B\nEND_GROUP = BAND_B\nEND;\n")
    scan = scan_folder(site, parse_options({}))  # returns: nothing waits on the FIFO
    assert [Path(s.name).name for s in scan.sources] == ["ok.tif"] and scan.skipped.get(NOT_A_RASTER, 0) >= 1
