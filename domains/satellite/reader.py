"""Windowed reading of multispectral rasters into reflectance.

A *source* is one logical multi-band raster: a single file (GeoTIFF or any GDAL format), or a
product stored as one file per band (Sentinel-2 ``..._B02.jp2``), whose bands may have
different resolutions and are resampled onto one target grid. Sources are described by
metadata only (picklable, no open handle); pixels are read one window at a time through
rasterio, so memory is bounded by the window, never by the scene.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from domains.satellite.bands import BAND_FILE_RE, RESOLUTION_DIR_RE, SENTINEL2_ORDER, band_sort_key
from fedmoco.cache import stat_stamp
from fedmoco.errors import DataError

log = logging.getLogger(__name__)

# Reasons a file cannot become a reflectance array. They are the keys of PretrainData.skipped.
NOT_A_RASTER = "not a raster"
UNREADABLE = "unreadable"
WRONG_BAND_COUNT = "wrong band count"
ALL_NODATA = "all nodata"
MISSING_BAND = "missing band"
MISMATCHED_BAND_FILES = "mismatched band files"
NOT_GEOREFERENCED = "not georeferenced"
TOO_LARGE = "too large"

#: Default of the ``max_raster_pixels`` data option: the most pixels (width x height) a file
#: may declare. A header costs a few hundred bytes whatever size it claims, and the epoch's
#: length, the cache and the tile weights all follow the declared area. 2^32 admits a
#: 65536 x 65536 mosaic (a Sentinel-2 band is 10980 x 10980).
DEFAULT_MAX_RASTER_PIXELS = 2**32

#: Default of the ``max_compression_ratio`` data option: the most decoded bytes a file may
#: declare per byte it stores. Under ``max_raster_pixels`` a 2.5 KB sparse GeoTIFF (no block
#: written) could still declare 65535 x 65535 px, and since tiles are drawn in proportion to
#: area it became nearly every tile of the epoch, all of them blank. Real imagery stores 2-20x
#: compressed (a Sentinel-2 band: 241 MB decoded, ~100 MB as JPEG 2000), and deflate cannot
#: pass ~1032x even on constant data, so only a file of mostly missing blocks goes over 1000.
DEFAULT_MAX_COMPRESSION_RATIO = 1000.0
#: Declared sizes under this are not held to the ratio: a small constant raster compresses
#: past it and decides nothing about an epoch (a 64 MiB file would be the whole 1000x budget).
_RATIO_FLOOR_BYTES = 64 * 2**20

#: The largest magnitude the decoded-raster cache (float16) holds. Larger values are no
#: reflectance; they are masked as invalid on every path, so the scan's statistics, the
#: cached and the uncached loader agree on them.
MAX_VALUE = float(np.finfo(np.float16).max)

#: GDAL drivers whose files describe pixels held elsewhere: other files (VRT, tile indexes,
#: STAC) or servers (WMS, WCS, ...). A site reads only files that hold their own pixels, so a
#: file in its data folder cannot make it read outside the folder or open a network
#: connection. They are left out of the drivers GDAL may try (not refused after opening:
#: a VRT opens its sources while it is opened). The second line: header formats whose header
#: names its data file by any path (ERS ``DataFile = "../x"``, MRF, FAST, PDS/ISIS, NITF tables
#: of contents), and the product descriptions after it. Any other driver that uses files
#: beside the one opened is held to the file's own folder after opening (:func:`open_raster`).
REFERENCING_DRIVERS = frozenset({
    "VRT", "GTI", "STACIT", "STACTA", "WMS", "WMTS", "WCS", "DAAS", "EEDA", "EEDAI", "PLMOSAIC", "HTTP",
    "KMLSUPEROVERLAY", "DERIVED", "ESRIC", "OGCAPI", "NGW",
    "ERS", "MRF", "FAST", "ISIS2", "ISIS3", "PDS", "PDS4", "VICAR", "RPFTOC", "ECRGTOC",
    # product descriptions that name tiles or band files (TIL, DIMAP, SAFE, ...): they open
    # one while they are opened, before any check after opening can run (a TIL naming a FIFO
    # hung the scan); a site reads the band files themselves
    "TIL", "MAP", "DIMAP", "RS2", "SAFE", "SENTINEL2", "TSX", "COSAR", "CPG", "PCIDSK", "HKV", "ADRG", "SRP",
})

#: Default of the ``max_block_mb`` data option: the most MiB one block of every band may
#: take decoded. GDAL decodes whole blocks (tiles or strips), even for a 64 x 64 window, so a
#: 518-byte single-strip deflate file of 40000 x 40000 uint16 costs 3 GB to read one tile.
#: 256 MiB admits a whole untiled 10980 x 10980 uint16 Sentinel-2 band (230 MiB).
DEFAULT_MAX_BLOCK_MB = 256.0

RESAMPLING_METHODS: dict[str, Resampling] = {
    m: Resampling[m]
    for m in ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode")
}

# GDAL sidecar files: metadata of a raster, never rasters of their own.
SIDECAR_SUFFIXES = (".aux.xml", ".ovr", ".msk", ".tfw", ".tifw", ".jgw", ".pgw", ".wld", ".prj", ".aux")

# Acquisition-date tags (Landsat MTL, Sentinel-2, generic). TIFFTAG_DATETIME is left out on
# purpose: by the TIFF specification it is the time the file was written, not acquired.
_DATE_TAGS = ("ACQUISITION_DATE", "DATE_ACQUIRED", "SENSING_TIME", "DATATAKE_SENSING_START", "ACQUISITIONDATE")
_DATE_RE = re.compile(r"(?<!\d)((?:19|20)\d\d)[-:]?(\d\d)[-:]?(\d\d)(?!\d)")


class RasterReadError(DataError):
    """A raster cannot become a reflectance array. A ValueError (via DataError).

    ``reason`` is one of the module constants (``not a raster``, ``unreadable``,
    ``wrong band count``, ``all nodata``, ...); the message is ``<path>: <reason> (<detail>)``.
    """

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # keeps the error picklable across DataLoader workers
        return (type(self), (self.path, self.reason, self.detail))


@dataclass(frozen=True)
class Grid:
    """A pixel grid: CRS (WKT, None when not georeferenced), affine transform and size."""

    crs: str | None
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> float:
        """Pixel size along a row in CRS units (metres for projected CRSs): the length of the
        column step (a, d), which a rotated grid splits between both axes (``abs(a)`` was 0 for
        a grid rotated by 90 degrees, and resampling squashed it to one pixel)."""
        return float(math.hypot(self.transform.a, self.transform.d))

    @property
    def row_res(self) -> float:
        """Pixel size along a column in CRS units: the length of the row step (b, e)."""
        return float(math.hypot(self.transform.b, self.transform.e))

    def same_as(self, other: "Grid") -> bool:
        """True when both grids have the same CRS, size and transform (to 1e-9)."""
        return (
            self.crs == other.crs
            and self.width == other.width
            and self.height == other.height
            and self.transform.almost_equals(other.transform, precision=1e-9)
        )

    def resampled(self, res: float) -> "Grid":
        """The grid covering the same extent with pixel size ``res`` (CRS units)."""
        width = max(1, round(self.width * self.res / res))
        height = max(1, round(self.height * self.row_res / res))
        # Scaling the transform keeps rotation and orientation of the original grid.
        transform = self.transform @ Affine.scale(self.width / width, self.height / height)
        return Grid(self.crs, transform, width, height)


@dataclass(frozen=True)
class BandInfo:
    """One band of a source: where it lives and how its digital numbers become reflectance."""

    path: str
    index: int  # 1-based, as in GDAL and rasterio
    name: str | None  # band description (B04, red, ...) or the band token of a band file
    scale: float
    offset: float
    grid: Grid  # the file's own grid
    is_float: bool
    stamp: tuple[int, int, int]  # fedmoco.cache.stat_stamp at scan time: cached tiles are served while it holds
    # 8-bit and tagged red, green or blue: a true-colour preview's band (Sentinel-2's _TCI_), not reflectance
    preview: bool = False


@dataclass(frozen=True)
class RasterSource:
    """One logical multi-band raster, read window by window onto ``grid``."""

    name: str  # what messages call it: the file, or "<folder>/<scene>_B*" for band files
    bands: tuple[BandInfo, ...]
    grid: Grid
    date: dt.date | None = None
    resampling: str = "bilinear"

    @property
    def paths(self) -> list[str]:
        """The files behind this source (one, or one per band)."""
        return sorted({b.path for b in self.bands})

    @property
    def count(self) -> int:
        """Number of bands."""
        return len(self.bands)

    @property
    def names(self) -> list[str | None]:
        """Band descriptions, None where a band has none."""
        return [b.name for b in self.bands]

    def read(
        self,
        window: tuple[int, int, int, int] | None = None,
        positions: Sequence[int] | None = None,
        handles: "HandleCache | None" = None,
    ) -> np.ma.MaskedArray:
        """Read ``window`` = (col, row, width, height) on ``grid`` as reflectance.

        ``positions`` are 0-based positions in ``bands`` (all when None). Returns a float32
        masked array (len(positions), height, width); nodata, non-finite values and pixels
        outside the raster are masked (their data is 0). Raises RasterReadError (unreadable).
        """
        col, row, width, height = window if window is not None else (0, 0, self.grid.width, self.grid.height)
        positions = list(range(self.count)) if positions is None else list(positions)
        data = np.zeros((len(positions), height, width), np.float32)
        mask = np.ones((len(positions), height, width), bool)
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + width, self.grid.width), min(row + height, self.grid.height)
        if c1 <= c0 or r1 <= r0:
            return np.ma.MaskedArray(data, mask)
        win = Window(c0, r0, c1 - c0, r1 - r0)
        dst = (slice(None), slice(r0 - row, r1 - row), slice(c0 - col, c1 - col))
        own = handles is None
        handles = HandleCache() if own else handles
        try:
            # One read call per file: a multi-band file gives all its selected bands at once.
            by_path: dict[str, list[tuple[int, BandInfo]]] = {}
            for out_i, pos in enumerate(positions):
                band = self.bands[pos]
                by_path.setdefault(band.path, []).append((out_i, band))
            for path, items in by_path.items():
                values, invalid = self._read_file(handles, items, win)
                for k, (out_i, _) in enumerate(items):
                    data[out_i][dst[1:]] = values[k]
                    mask[out_i][dst[1:]] = invalid[k]
        finally:
            if own:
                handles.close()
        return np.ma.MaskedArray(data, mask)

    def _read_file(
        self, handles: "HandleCache", items: list[tuple[int, BandInfo]], win: Window
    ) -> tuple[np.ndarray, np.ndarray]:
        first = items[0][1]
        try:
            reader = handles.get(first, self.grid, self.resampling)
            raw = reader.read([b.index for _, b in items], window=win, masked=True)
        except RasterReadError:
            raise
        except (RasterioError, OSError, ValueError, MemoryError) as exc:
            handles.evict(first.path)
            raise RasterReadError(first.path, UNREADABLE, _gdal_message(exc)) from exc
        # np.asarray to float32 also turns big-endian data native, which torch requires.
        values = np.asarray(raw.data, np.float32)
        invalid = np.ma.getmaskarray(raw).copy()
        if first.is_float or values.dtype.kind == "f":
            invalid |= ~np.isfinite(values)
        scale = np.array([b.scale for _, b in items], np.float32).reshape(-1, 1, 1)
        offset = np.array([b.offset for _, b in items], np.float32).reshape(-1, 1, 1)
        values = values * scale + offset
        invalid |= ~(np.abs(values) <= MAX_VALUE)  # NaN compares False: masked too
        values[invalid] = 0.0
        return values, invalid


class HandleCache:
    """Open rasterio datasets (and warped views), least recently used closed first.

    Handles are tied to the process that opened them: after a fork (DataLoader workers) the
    cache starts empty, so no GDAL handle is ever shared between processes. They are keyed by
    the file's stat stamp when asked for (one ``os.stat``, microseconds, against milliseconds
    of GDAL read): a file replaced during a run (rsync, a restore) is opened again, not read
    through the handle of its old inode.
    """

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self._pid = os.getpid()
        self._open: OrderedDict[tuple, tuple] = OrderedDict()

    def get(self, band: BandInfo, grid: Grid, resampling: str):
        """A dataset to read ``band``'s file on ``grid`` (a WarpedVRT when the grids differ)."""
        if self._pid != os.getpid():
            # Inherited from the parent by fork: forget (do not close) the parent's handles.
            self._open = OrderedDict()
            self._pid = os.getpid()
        native = band.grid.same_as(grid)
        try:  # the file as it is now, not as scanned: a file replaced since reads its new version
            stamp: tuple[int, int, int] | None = stat_stamp(os.stat(band.path))
        except OSError:
            stamp = None  # gone: open_raster says so
        key = (band.path, stamp, None if native else (grid, resampling))
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key][-1]
        for old in [k for k in self._open if k[0] == band.path and k[1] != stamp]:  # an earlier version's
            _close_all(self._open.pop(old))
        src = open_raster(band.path)
        try:
            if native:
                entry: tuple = (src,)
            else:
                if band.grid.crs is None or grid.crs is None:
                    raise RasterReadError(band.path, NOT_GEOREFERENCED, "resampling needs a CRS")
                entry = (src, _warped(src, grid, resampling))
        except Exception:
            src.close()
            raise
        self._open[key] = entry
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            _close_all(old)
        return entry[-1]

    def evict(self, path: str) -> None:
        """Close every handle on ``path`` (after a read error, so a retry reopens the file)."""
        for key in [k for k in self._open if k[0] == path]:
            _close_all(self._open.pop(key))

    def close(self) -> None:
        """Close this process's handles; handles inherited through fork are only forgotten."""
        if self._pid == os.getpid():
            for entry in self._open.values():
                _close_all(entry)
        self._open = OrderedDict()

    def __enter__(self) -> "HandleCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARED: HandleCache | None = None
_CACHE_BYTES: int | None = None


def shared_handles(gdal_cache_mb: int | None = None) -> HandleCache:
    """The per-process handle cache used by datasets; also caps GDAL's block cache.

    GDAL's default block cache is 5% of RAM. Random windows over a large scene touch ever new
    blocks, so with the default the resident memory grows with the scene up to that cap;
    ``gdal_cache_mb`` makes it a small constant instead.
    """
    global _SHARED, _CACHE_BYTES
    if _SHARED is None:
        _SHARED = HandleCache()
    if gdal_cache_mb is not None and (_CACHE_BYTES != gdal_cache_mb << 20 or _SHARED._pid != os.getpid()):
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", gdal_cache_mb << 20)
        _CACHE_BYTES = gdal_cache_mb << 20
    return _SHARED


def _warped(src, grid: Grid, resampling: str) -> WarpedVRT:
    # float32 output: interpolated DNs are not rounded back to integers. Without a nodata
    # value GDAL would mark pixels off the source as 0, a valid value; NaN is unambiguous.
    return WarpedVRT(
        src,
        crs=grid.crs,
        transform=grid.transform,
        width=grid.width,
        height=grid.height,
        resampling=RESAMPLING_METHODS[resampling],
        nodata=float("nan") if src.nodata is None else src.nodata,
        dtype="float32",
    )


def _close_all(entry: tuple) -> None:
    for obj in reversed(entry):
        try:
            obj.close()
        except Exception:  # closing a handle whose file vanished must not hide the real error
            pass


def _gdal_message(exc: BaseException) -> str:
    # rasterio raises "Read failed. See previous exception for details." and chains GDAL's
    # own error (the useful part: "TIFFReadEncodedTile() failed") as the cause.
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 4:
        text = " ".join(str(seen).split())
        if text and "see previous exception" not in text.lower() and text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    return "; ".join(parts) or type(exc).__name__


@cache
def readable_drivers() -> tuple[str, ...]:
    """The GDAL drivers a site may open its files with: all registered, less REFERENCING_DRIVERS."""
    with rasterio.Env() as env:
        return tuple(sorted(set(env.drivers()) - REFERENCING_DRIVERS))


@rasterio.env.ensure_env_with_credentials
def _open_with_readable_drivers(path: str) -> DatasetReader:
    # rasterio.open documents a list of drivers for reading but refuses one (1.4: "invalid
    # driver"); its reader takes the list and hands it to GDALOpenEx as the drivers allowed.
    return DatasetReader(path, driver=list(readable_drivers()))


def open_raster(path: str | os.PathLike):
    """Open ``path`` with rasterio; raise RasterReadError saying why it cannot be opened."""
    path = str(path)
    try:
        path.encode()
    except UnicodeEncodeError:  # GDAL takes UTF-8 paths only; such a name cannot reach it
        raise RasterReadError(path, UNREADABLE, "file name is not valid UTF-8") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = _open_with_readable_drivers(path)
    except RasterioError as exc:
        msg = _gdal_message(exc)
        if not os.path.exists(path):
            raise RasterReadError(path, UNREADABLE, "no such file") from exc
        if "not recognized as" in msg or "not a supported file format" in msg:
            raise RasterReadError(path, NOT_A_RASTER, "GDAL recognises no raster format (files that point to "
                                                      "pixels elsewhere, such as VRT, are not read)") from exc
        raise RasterReadError(path, UNREADABLE, msg) from exc
    except OSError as exc:
        raise RasterReadError(path, UNREADABLE, _gdal_message(exc)) from exc
    outside = _files_outside(path, src.files)
    if outside:
        src.close()
        raise RasterReadError(path, NOT_A_RASTER, f"GDAL would read {len(outside)} other file(s) for it outside its "
                                                  "folder, or that are not regular files; such files are not read")
    return src


def _files_outside(path: str, files: Sequence[str]) -> list[str]:
    """The files GDAL uses for ``path`` that are not regular files in the folder of ``path``
    or below it: the folder it is in, or, for a link into a store, the store's folder (a
    sidecar GDAL wrote beside the link, or one in the store, is the raster's own)."""
    homes = {Path(path).absolute().parent.resolve(), Path(path).resolve().parent}
    out = []
    for f in files:
        target = Path(f).resolve()
        if not any(target.is_relative_to(home) for home in homes) or not target.is_file():
            out.append(f)
    return out


# ---------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class FileInfo:
    """Metadata of one raster file (no pixels read)."""

    path: str
    bands: tuple[BandInfo, ...]
    grid: Grid
    date: dt.date | None


def default_scaling(dtype: str) -> tuple[float, float]:
    """(scale, offset) turning a raw value of ``dtype`` into reflectance when nothing says.

    uint16 and other >8-bit integers: DN / 10000 (Sentinel-2, Landsat C1, PlanetScope SR).
    uint8: DN / 255 (8-bit visual products carry no physical scale). Floats: already
    reflectance.
    """
    kind = np.dtype(dtype)
    if kind.kind == "f":
        return 1.0, 0.0
    if kind.itemsize == 1:
        return 1.0 / 255.0, 0.0
    return 1e-4, 0.0


def _tag_float(tags: dict[str, str], *keys: str) -> float | None:
    lower = {k.lower(): v for k, v in tags.items()}
    for key in keys:
        if key in lower:
            try:
                return float(lower[key])
            except ValueError:
                return None
    return None


def _band_scaling(src, i: int, scale: float | None, offset: float | None) -> tuple[float, float]:
    """Scaling of band ``i`` (1-based): explicit options, then file metadata, then dtype."""
    auto_scale, auto_offset = default_scaling(src.dtypes[i - 1])
    gdal_scale, gdal_offset = src.scales[i - 1], src.offsets[i - 1]
    if (gdal_scale, gdal_offset) != (1.0, 0.0):
        # rasterio reports an unset scale as (1, 0): only other values are taken as stated.
        auto_scale, auto_offset = gdal_scale, gdal_offset
    else:
        tags = {**src.tags(), **src.tags(i)}
        cf_scale = _tag_float(tags, "scale_factor")
        cf_offset = _tag_float(tags, "add_offset")
        if cf_scale is not None or cf_offset is not None:
            auto_scale = cf_scale if cf_scale is not None else 1.0
            auto_offset = cf_offset if cf_offset is not None else 0.0
    return (scale if scale is not None else auto_scale, offset if offset is not None else auto_offset)


def _date_of(path: str, tags: dict[str, str]) -> dt.date | None:
    candidates = [tags[k] for k in tags if k.upper() in _DATE_TAGS] + [Path(path).name]
    for text in candidates:
        for m in _DATE_RE.finditer(str(text)):
            try:
                return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            except ValueError:
                continue
    return None


def block_bytes(src) -> int:
    """Bytes of one decoded block of every band of the open dataset ``src``: what GDAL holds
    at least to read any window (block height x width x dtype size, summed over bands)."""
    return sum(h * w * np.dtype(dtype).itemsize for (h, w), dtype in zip(src.block_shapes, src.dtypes))


def check_blocks(path: str, src, max_block_mb: float) -> None:
    """RasterReadError(TOO_LARGE) when one block of every band exceeds ``max_block_mb`` MiB."""
    need = block_bytes(src)
    if need > max_block_mb * 2**20:
        (h, w), dtype = src.block_shapes[0], src.dtypes[0]
        raise RasterReadError(path, TOO_LARGE, f"one block is {w} x {h} pixels x {src.count} band(s) of {dtype}, "
                                               f"{need / 2**20:.0f} MiB decoded, over max_block_mb {max_block_mb:g}; "
                                               "GDAL decodes whole blocks even for a small window")


def check_size(path: str, src, max_raster_pixels: int) -> None:
    """RasterReadError(TOO_LARGE) when the file declares more than ``max_raster_pixels``."""
    if src.width * src.height > max_raster_pixels:
        raise RasterReadError(path, TOO_LARGE, f"declares {src.width} x {src.height} pixels, over max_raster_pixels "
                                               f"{max_raster_pixels:,}; raise it for a larger mosaic")


def check_stored_bytes(path: str, src, file_bytes: int, max_ratio: float) -> None:
    """RasterReadError(TOO_LARGE) when the file declares more than ``max_ratio`` decoded bytes
    per byte it holds on disk (and more than 64 MiB decoded): a file of mostly missing blocks."""
    decoded = src.width * src.height * sum(np.dtype(d).itemsize for d in src.dtypes)
    if decoded > _RATIO_FLOOR_BYTES and decoded > max_ratio * max(file_bytes, 1):
        raise RasterReadError(path, TOO_LARGE,
                              f"declares {src.width} x {src.height} pixels x {src.count} bands, {decoded / 1e9:.3g} GB "
                              f"decoded, in {file_bytes:,} bytes on disk: over max_compression_ratio "
                              f"{max_ratio:g} (a file of mostly missing blocks); raise it if such files are yours")


def inspect_file(path: str | os.PathLike, scale: float | None = None, offset: float | None = None,
                 max_block_mb: float = DEFAULT_MAX_BLOCK_MB,
                 max_raster_pixels: int = DEFAULT_MAX_RASTER_PIXELS,
                 max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO) -> FileInfo:
    """Open ``path`` and describe it: bands, scaling, grid, acquisition date.

    ``scale``/``offset`` override what the file says (reflectance = DN * scale + offset).
    Raises RasterReadError: not a raster, unreadable, wrong band count (no bands), or too
    large (declaring more than ``max_raster_pixels`` pixels, more than ``max_compression_ratio``
    decoded bytes per stored byte, or a block of every band over ``max_block_mb`` MiB; all
    checked from the header and the file's size, before any pixel is read).
    """
    path = str(path)
    with open_raster(path) as src:
        stat = os.stat(path)
        if src.count == 0:
            subs = len(src.subdatasets)
            detail = f"file has no bands{f' but {subs} subdatasets' if subs else ''}"
            raise RasterReadError(path, WRONG_BAND_COUNT, detail)
        complex_bands = sorted({d for d in src.dtypes if "complex" in d})
        if complex_bands:  # SAR phase data (a Sentinel-1 SLC): no reflectance, and no numpy dtype for cint16
            raise RasterReadError(path, UNREADABLE, f"complex-valued bands ({', '.join(complex_bands)}): SAR "
                                                    "phase data, not reflectance; use detected amplitude (GRD)")
        check_size(path, src, max_raster_pixels)
        check_blocks(path, src, max_block_mb)
        check_stored_bytes(path, src, stat.st_size, max_compression_ratio)
        try:
            crs = src.crs.to_wkt() if src.crs else None
            grid = Grid(crs, src.transform, src.width, src.height)
            if crs is not None and not all(1e-12 < v < 1e12 for v in (grid.res, grid.row_res)):
                raise RasterReadError(path, NOT_GEOREFERENCED, f"its geotransform gives a pixel size of "
                                                               f"{grid.res:g} x {grid.row_res:g}")
            colour = src.colorinterp
            # An alpha band is the other bands' mask (GDAL applies it to their reads), not a
            # channel: kept, a 4-band RGBA file trained alpha as 'nir', with NDVI from it, and
            # its transparent pixels as valid zeros (found by an audit).
            channels = [i for i in range(1, src.count + 1) if colour[i - 1] != ColorInterp.alpha]
            if not channels:
                raise RasterReadError(path, WRONG_BAND_COUNT, "file has only an alpha band")
            rgb = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
            bands = tuple(
                BandInfo(
                    path=path,
                    index=i,
                    name=(src.descriptions[i - 1] or None),
                    scale=s,
                    offset=o,
                    grid=grid,
                    is_float=np.dtype(src.dtypes[i - 1]).kind == "f",
                    stamp=stat_stamp(stat),
                    preview=src.dtypes[i - 1] == "uint8" and colour[i - 1] in rgb,
                )
                for i in channels
                for s, o in [_band_scaling(src, i, scale, offset)]
            )
            date = _date_of(path, src.tags())
        except RasterioError as exc:
            raise RasterReadError(path, UNREADABLE, _gdal_message(exc)) from exc
    return FileInfo(path, bands, grid, date)


def file_source(info: FileInfo, resolution: float | None = None, resampling: str = "bilinear") -> RasterSource:
    """A source for one multi-band file, on its own grid or resampled to ``resolution``."""
    grid = info.grid
    if resolution is not None and abs(resolution - grid.res) > 1e-9 * max(resolution, 1.0):
        if grid.crs is None:
            raise RasterReadError(info.path, NOT_GEOREFERENCED, "resolution option needs a CRS")
        grid = grid.resampled(resolution)
    return RasterSource(info.path, info.bands, grid, info.date, resampling)


def band_file_product(
    name: str, files: Sequence[tuple[str, FileInfo]], resolution: float | None = None, resampling: str = "bilinear"
) -> RasterSource:
    """A source made of single-band files ``(band name, info)`` of one scene.

    The target grid is the finest band's grid (or that extent at ``resolution``); coarser bands
    are resampled onto it. When a band occurs at several resolutions (Sentinel-2 L2A R10m/R20m)
    the finest copy is kept. Bands are ordered B01, B02, ..., B08, B8A, B09, ...
    Raises RasterReadError (mismatched band files) for files in different CRSs, and (not
    georeferenced) for files without a CRS unless they share one grid and no resampling is asked.
    """
    finest: dict[str, FileInfo] = {}
    for band, info in files:
        key = band.upper()
        if key not in finest or info.grid.res < finest[key].grid.res:
            finest[key] = info
    crss = {info.grid.crs for info in finest.values()}
    if len(crss) > 1:
        raise RasterReadError(name, MISMATCHED_BAND_FILES, "band files need one common CRS")
    ordered = sorted(finest, key=band_sort_key)
    reference = min(finest.values(), key=lambda i: (i.grid.res, i.path)).grid
    if None in crss and (resolution is not None or not all(i.grid.same_as(reference) for i in finest.values())):
        # without a CRS, bands stack only as they are: resampling one onto another needs a CRS
        raise RasterReadError(name, NOT_GEOREFERENCED, "band files without a CRS stack only when they share one "
                                                       "pixel grid (no resampling, no resolution option)")
    grid = reference if resolution is None else reference.resampled(resolution)
    bands = tuple(
        BandInfo(b.path, b.index, band, b.scale, b.offset, b.grid, b.is_float, b.stamp)
        for band in ordered
        for b in [finest[band].bands[0]]
    )
    dates = {finest[b].date for b in ordered} - {None}
    date = dates.pop() if len(dates) == 1 else None
    return RasterSource(name, bands, grid, date, resampling)


def band_file_key(path: Path) -> tuple[str, str, str] | None:
    """(folder, scene, band) when ``path`` is named like one band of a product, else None.

    Files in Sentinel-2 L2A resolution folders (R10m, R20m, R60m) count as being in the
    parent folder so the bands of one scene meet again.
    """
    stem = path.name.split(".")[0]
    m = BAND_FILE_RE.match(stem)
    if m is None:
        return None
    folder = path.parent
    if RESOLUTION_DIR_RE.match(folder.name):
        folder = folder.parent
    return str(folder), m.group("scene").upper(), m.group("band").upper()


def build_sources(
    infos: Iterable[FileInfo], resolution: float | None = None, resampling: str = "bilinear"
) -> tuple[list[RasterSource], list[tuple[RasterReadError, int]]]:
    """Turn scanned files into sources, joining single-band files of one scene.

    Returns (sources, [(error, number of files it concerns)]): a product whose files do not
    fit together is an error, not an exception, so one bad product does not stop a scan.
    """
    sources: list[RasterSource] = []
    errors: list[tuple[RasterReadError, int]] = []
    groups: dict[tuple[str, str], list[tuple[str, FileInfo]]] = {}
    singles: list[FileInfo] = []
    for info in infos:
        key = band_file_key(Path(info.path)) if len(info.bands) == 1 else None
        if key is None:
            singles.append(info)
        else:
            groups.setdefault(key[:2], []).append((key[2], info))
    for (folder, scene), files in groups.items():
        if len(files) == 1:
            singles.append(files[0][1])
            continue
        name = f"{Path(folder) / scene}_B*"
        try:
            sources.append(band_file_product(name, files, resolution, resampling))
        except RasterReadError as exc:
            errors.append((exc, len(files)))
    for info in singles:
        try:
            sources.append(file_source(info, resolution, resampling))
        except RasterReadError as exc:
            errors.append((exc, 1))
    sources.sort(key=lambda s: s.name)
    return sources, errors


def is_sidecar(path: Path) -> bool:
    """True for GDAL sidecar files (``.aux.xml``, ``.ovr``, world files) next to rasters."""
    name = path.name.lower()
    return any(name.endswith(s) for s in SIDECAR_SUFFIXES)


def select_bands(source: RasterSource, bands: Sequence[int | str] | None) -> list[int]:
    """0-based positions in ``source.bands`` for a band selection.

    ``bands`` holds 1-based indices or band descriptions (case-insensitive); None selects all.
    A 13-band file without descriptions is matched as B01..B12 with B8A (Sentinel-2 order).
    Raises RasterReadError: wrong band count (index beyond the file), missing band (no band
    with that description).
    """
    if bands is None:
        return list(range(source.count))
    described = source.names
    if not any(described) and source.count == len(SENTINEL2_ORDER):
        # An undescribed 13-band file is taken to be a stacked Sentinel-2 L1C product (no other
        # common sensor has 13 bands). 4-band order is not guessed: BGRN and RGBN both exist.
        described = list(SENTINEL2_ORDER)
    names = [(n or "").strip().upper() for n in described]
    positions = []
    for b in bands:
        if isinstance(b, (int, np.integer)) and not isinstance(b, bool):
            if not 1 <= b <= source.count:
                raise RasterReadError(
                    source.name, WRONG_BAND_COUNT, f"band {b} requested, file has {source.count} bands"
                )
            positions.append(int(b) - 1)
        else:
            want = str(b).strip().upper()
            if want not in names:
                have = ", ".join(n or "?" for n in described)
                raise RasterReadError(source.name, MISSING_BAND, f"no band described {b!r}; bands: {have}")
            positions.append(names.index(want))
    if len(set(positions)) != len(positions):  # e.g. bands=2,B02 on a Sentinel-2 file: one band twice
        first = {}
        for b, pos in zip(bands, positions):
            if pos in first:
                raise RasterReadError(source.name, MISSING_BAND,
                                      f"bands {first[pos]!r} and {b!r} select the same band; select each band once")
            first[pos] = b
    return positions


def open_source(
    path: str | os.PathLike,
    *,
    scale: float | None = None,
    offset: float | None = None,
    resolution: float | None = None,
    resampling: str = "bilinear",
    max_block_mb: float = DEFAULT_MAX_BLOCK_MB,
) -> RasterSource:
    """A source for a raster file, or for a folder holding one product as per-band files."""
    path = Path(path)
    if not path.is_dir():
        return file_source(inspect_file(path, scale, offset, max_block_mb), resolution, resampling)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not is_sidecar(p))
    infos = [inspect_file(p, scale, offset, max_block_mb) for p in files]
    sources, errors = build_sources(infos, resolution, resampling)
    if errors:
        raise errors[0][0]
    if len(sources) != 1:
        raise RasterReadError(path, MISMATCHED_BAND_FILES, f"folder holds {len(sources)} rasters, not one product")
    return sources[0]


def as_window(window) -> tuple[int, int, int, int] | None:
    """Accept a rasterio Window or (col_off, row_off, width, height); None stays None."""
    if window is None:
        return None
    if isinstance(window, Window):
        return (int(window.col_off), int(window.row_off), int(window.width), int(window.height))
    col, row, width, height = (int(v) for v in window)
    if width <= 0 or height <= 0:
        raise ValueError(f"window {window!r}: width and height must be > 0")
    return col, row, width, height


def read_tile(
    path: str | os.PathLike,
    window: Window | tuple[int, int, int, int] | None = None,
    bands: Sequence[int | str] | None = None,
    *,
    scale: float | None = None,
    offset: float | None = None,
    resolution: float | None = None,
    resampling: str = "bilinear",
    max_block_mb: float = DEFAULT_MAX_BLOCK_MB,
) -> np.ma.MaskedArray:
    """Read a window of a multispectral raster as reflectance.

    ``path``: a raster file (any GDAL format), or a folder holding one product as one file per
    band (resampled to the finest band, or to ``resolution`` in CRS units).
    ``window``: rasterio Window or (col_off, row_off, width, height) in pixels; None reads the
    whole raster. Pixels outside the raster come back masked.
    ``bands``: 1-based indices or band descriptions (``"B04"``); None reads all bands.
    ``scale``/``offset``: reflectance = DN * scale + offset, overriding the file's scale/offset
    metadata (GDAL band scale/offset, else CF ``scale_factor``/``add_offset`` tags); the default
    without metadata is DN / 10000 for uint16, unchanged for floats.
    ``max_block_mb``: files whose blocks (all bands) decode to more MiB are refused unread.

    Returns a float32 masked array (bands, H, W) in reflectance (unitless, ~0..1); nodata and
    non-finite pixels are masked. Raises RasterReadError naming the file and the reason: not a
    raster, unreadable, wrong band count, missing band, all nodata, too large.
    """
    if resampling not in RESAMPLING_METHODS:
        raise ValueError(f"resampling {resampling!r}: choose one of {sorted(RESAMPLING_METHODS)}")
    source = open_source(path, scale=scale, offset=offset, resolution=resolution, resampling=resampling,
                         max_block_mb=max_block_mb)
    positions = select_bands(source, bands)
    tile = source.read(as_window(window), positions)
    if tile.mask.all():
        raise RasterReadError(source.name, ALL_NODATA, f"window {as_window(window) or 'whole raster'} has no valid pixel")
    return tile
