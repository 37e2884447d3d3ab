"""Tile datasets over a folder of multispectral rasters (the satellite domain's data contract).

Scanning reads metadata only, plus the windows needed to decide which tiles are usable; every
read afterwards is one window through rasterio, so memory is bounded by the tile size. The
datasets hold only picklable descriptions of the sources: each DataLoader worker opens its
own rasterio handles on first use.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from domains.satellite import bands as band_facts
from domains.satellite.augment import AppendIndices, eval_transform, pretrain_transform
from domains.satellite.options import SatelliteOptions, parse_options
from domains.satellite.reader import (
    ALL_NODATA,
    TOO_LARGE,
    WRONG_BAND_COUNT,
    RasterReadError,
    RasterSource,
    build_sources,
    inspect_file,
    is_sidecar,
    select_bands,
    shared_handles,
)
from fedmoco.data import (
    DataConfig,
    LabelledData,
    Normalization,
    PretrainData,
    format_skipped,
    list_files,
    one_thread,
    read_labels,
)
from fedmoco.cache import SampleCache, cache_nbytes, file_stamps, open_cache, read_memo, stat_stamp, write_memo
from fedmoco.errors import DataError, NoUsableData

log = logging.getLogger(__name__)

TOO_MUCH_NODATA = "too much nodata"
# Smallest std kept in a Normalization: a band that is constant in the sample (a saturated or
# empty band) must not turn tiny differences at fine-tuning time into huge inputs.
MIN_STD = 1e-3
#: Longest automatic epoch, in random tiles: 2^20, a 65536 x 65536 px area in 64 px tiles
#: (the area of 36 Sentinel-2 products at 10 m).
MAX_AUTO_EPOCH = 2**20

Window = tuple[int, int, int, int]


# ---------------------------------------------------------------------------- scanning


@dataclass
class Layout:
    """The channels every sample has: selected band positions per source, names, roles."""

    positions: list[list[int]]  # per source, 0-based positions of the selected bands
    names: list[str | None]  # of the selected bands (first source; defaults by band count)
    wavelengths: list[float] | None  # nm per selected band, None when unknown
    roles: dict[str, int]  # blue/green/red/nir -> channel position
    indices: tuple[str, ...]

    @property
    def n_bands(self) -> int:
        return len(self.names)

    @property
    def in_channels(self) -> int:
        return self.n_bands + len(self.indices)

    @property
    def channel_names(self) -> list[str]:
        return [n or f"band{i + 1}" for i, n in enumerate(self.names)] + [i.upper() for i in self.indices]


@dataclass
class Scan:
    sources: list[RasterSource]
    layout: Layout
    skipped: Counter = field(default_factory=Counter)
    # Every raster read without error, with its selected bands, before the band-count majority
    # decides which train: what a DP release reads (SatelliteRecordView), raster by raster.
    readable: list[tuple[RasterSource, list[int]]] = field(default_factory=list)


def _skip(skipped: Counter, exc: RasterReadError, n_files: int = 1) -> None:
    log.warning("skipping %s", exc)
    skipped[exc.reason] += n_files


def scan_folder(root: Path, opts: SatelliteOptions, exclude: Sequence[Path] = ()) -> Scan:
    """Find the usable rasters under ``root`` and the band layout they share.

    Broken files are skipped and counted by reason. Raises DataError when nothing is left.
    """
    files = [p for p in list_files(root, exclude=exclude) if not is_sidecar(p)]
    skipped: Counter = Counter()
    infos = []
    for path in files:
        try:
            infos.append(inspect_file(path, opts.scale, opts.offset, opts.max_block_mb, opts.max_raster_pixels,
                                      opts.max_compression_ratio))
        except RasterReadError as exc:
            _skip(skipped, exc)
    sources, errors = build_sources(infos, opts.resolution, opts.resampling)
    for exc, n_files in errors:
        _skip(skipped, exc, n_files)
    kept: list[RasterSource] = []
    positions: list[list[int]] = []
    readable: list[tuple[RasterSource, list[int]]] = []
    # Without a selection every source must have the band count most rasters share (a tie goes
    # to more bands). Where rasters of several bands are present they decide: single-band rasters
    # beside them are a scene's auxiliaries (a Sentinel-2 L2A folder's SCL/AOT, a Landsat C2 L2SP
    # scene's 12 QA/ST rasters next to its 7 SR band files), and counted with them a folder
    # trained on its auxiliaries. Each raster is one vote, a per-band product too: counted by
    # files, one product missing a band file (12 files) outvoted six complete 13-band GeoTIFFs.
    # 8-bit true-colour previews beside spectral data are auxiliaries too: a Sentinel-2 L2A
    # folder's three _TCI_ files (R10m, R20m, R60m) outvoted its one 12-band product, which was
    # then skipped (found by an audit). A folder of RGB imagery alone still votes for itself.
    common = None
    if opts.bands is None and sources:
        multi = [s for s in sources if s.count > 1]
        spectral = [s for s in multi if not all(b.preview for b in s.bands)]
        pool = spectral or multi or list(sources)
        votes = Counter(s.count for s in pool)
        common = max(votes, key=lambda count: (votes[count], count))
    reference = _reference_names(sources, common) if opts.bands is None else None
    for source in sources:
        try:
            if opts.resolution is not None and source.grid.width * source.grid.height > opts.max_raster_pixels:
                # the header's size was checked; the grid at `resolution` is what the epoch and cache follow
                raise RasterReadError(source.name, TOO_LARGE,
                                      f"at resolution {opts.resolution:g} it would be {source.grid.width} x "
                                      f"{source.grid.height} pixels, over max_raster_pixels {opts.max_raster_pixels:,}")
            selected = select_bands(source, opts.bands)
            if reference is not None and source.count == common:
                selected = _in_reference_order(source, reference, selected)
            readable.append((source, selected))
            if common is not None and source.count != common:
                raise RasterReadError(
                    source.name, WRONG_BAND_COUNT, f"{source.count} bands, most rasters here have {common}"
                )
            positions.append(selected)
            kept.append(source)
        except RasterReadError as exc:
            _skip(skipped, exc, len(source.paths))
    if not kept:
        raise NoUsableData(f"{root}: no usable raster ({format_skipped(skipped)})")
    _warn_mixed_grids(root, kept, opts)
    return Scan(kept, _layout(kept[0], positions, opts), skipped, readable)


def _reference_names(sources: Sequence[RasterSource], common: int | None) -> list[str] | None:
    """The band descriptions (upper-case) of the first source with the common band count whose
    bands are all described, else None. (The first such source, not merely the first: an
    undescribed raster ahead of the others left them all stacked by position; found by an audit.)"""
    first = next((s for s in sources if s.count == common and all(s.names)), None)
    return None if first is None else [str(n).strip().upper() for n in first.names]


def _in_reference_order(source: RasterSource, reference: list[str], selected: list[int]) -> list[int]:
    """``source``'s bands in the order of ``reference`` when it holds the same described bands in
    another order: stacked by position, a file with B08, B04, B03, B02 fed NIR as blue and gave
    the NDVI role to the wrong band (found by an audit). Other descriptions: as they are, with a
    warning, since they may name the same bands differently."""
    names = [str(n or "").strip().upper() for n in source.names]
    if names == reference or not any(names):  # undescribed: nothing to reorder by
        return selected
    if sorted(names) == sorted(reference) and len(set(names)) == len(names):
        return [names.index(n) for n in reference]
    log.warning("%s: its band descriptions (%s) differ from the first raster's (%s); its bands are stacked in "
                "file order. Set the data option bands to choose them by name", source.name,
                ", ".join(n or "?" for n in names), ", ".join(reference))
    return selected


def _source_labels(root: Path, sources: Sequence[RasterSource],
                   labels_csv: Path | None) -> tuple[list[int], list[str], list[int]]:
    """(label index per source or -1, class names): a per-band product takes the label of its
    first band file, in band order, that has one. Only the first band file counted before, and
    a CSV row naming SCN_B03 left the product unlabelled, as "not a usable sample". (The
    labelled set gives every file a label of its own, ``fedmoco.labels``, so band files of one
    product differ in label as a rule: the first one speaks for the product.) Third: the label
    of every file of the sources, so a labelled set does not count a product's other band files
    as unusable."""
    paths = [[Path(band.path) for band in source.bands] for source in sources]
    flat, classes = read_labels(root, [p for group in paths for p in group], labels_csv)
    labels, k = [], 0
    for group in paths:
        labels.append(next((label for label in flat[k:k + len(group)] if label >= 0), -1))
        k += len(group)
    return labels, classes, list(flat)


def _warn_mixed_grids(root: Path, sources: Sequence[RasterSource], opts: SatelliteOptions) -> None:
    """Warn when the rasters' CRSs differ (``resolution`` cannot fix that: it is in each CRS's
    own units), or their pixel sizes differ and no ``resolution`` brings them to one: a 64 px
    tile is then 640 m of ground in one file and 1.3 km in another, and the encoder learns two
    scales as one."""
    res = Counter(round(s.grid.res, 6) for s in sources)
    crs = Counter(s.grid.crs for s in sources if s.grid.crs)
    if len(crs) > 1:  # resolution does not help: it is in each raster's own CRS units (metres, degrees)
        log.warning("%s: the rasters are in %d coordinate reference systems; tiles of one size then cover "
                    "different ground areas. Reproject them to one CRS first (gdalwarp -t_srs), then set "
                    "the data option resolution if their pixel sizes differ", root, len(crs))
    elif len(res) > 1 and opts.resolution is None:
        sizes = ", ".join(f"{n} at {r:g}" for r, n in res.most_common(4)) + (", ..." if len(res) > 4 else "")
        log.warning("%s: the rasters have %d pixel sizes (%s, in CRS units); tiles of one size then cover "
                    "different ground areas. Set the data option resolution (pixel size in CRS units, "
                    "e.g. resolution=10) to resample every raster to one", root, len(res), sizes)


def _layout(first: RasterSource, positions: list[list[int]], opts: SatelliteOptions) -> Layout:
    names: list[str | None] = [first.bands[p].name for p in positions[0]]
    if not any(names):
        defaults = band_facts.default_names(first.count)
        if defaults is not None:
            names = [defaults[p] for p in positions[0]]
    n = len(names)
    if opts.wavelengths is not None:
        if len(opts.wavelengths) != n:
            raise DataError(
                f"satellite data option wavelengths={','.join(map(str, opts.wavelengths))!r}: "
                f"{len(opts.wavelengths)} values for {n} selected bands"
            )
        wavelengths: list[float] | None = list(opts.wavelengths)
    else:
        wavelengths = band_facts.infer_wavelengths(names)
    roles = band_facts.infer_roles(names)
    for role, band in opts.band_roles.items():
        roles[role] = _role_position(positions[0], names, role, band)
    for index in opts.indices:
        missing = [r for r in AppendIndices.NEEDS[index] if r not in roles]
        if missing:
            hint = "give it with band_roles, e.g. band_roles=red=B04,nir=B08,green=B03"
            raise DataError(
                f"satellite data option indices={index!r}: band role {missing[0]!r} unknown for bands "
                f"{names}; {hint}",
                # the band names are the rasters' own descriptions (free text): not for the server
                public=f"satellite data option indices={index!r}: band role {missing[0]!r} unknown for this "
                       f"site's {n} bands; {hint}",
            )
    return Layout(positions, names, wavelengths, roles, opts.indices)


def _role_position(selected: list[int], names: list[str | None], role: str, band: int | str) -> int:
    """Channel position of the band given for ``role``: a 1-based file index or a name."""
    if isinstance(band, int):
        if band - 1 in selected:
            return selected.index(band - 1)
    else:
        upper = [(n or "").upper() for n in names]
        if band.upper() in upper:
            return upper.index(band.upper())
    raise DataError(f"satellite data option band_roles={role}={band}: band {band!r} is not among the selected bands")


# ---------------------------------------------------------------------------- windows


def tile_shape(source: RasterSource, tile: int) -> tuple[int, int]:
    """(width, height) of a tile: ``tile`` pixels, or the whole raster side when smaller."""
    return min(tile, source.grid.width), min(tile, source.grid.height)


def grid_windows(source: RasterSource, tile: int, stride: int) -> list[Window]:
    """Windows (col, row, w, h) of a regular grid, row by row; a remainder narrower than a
    tile at the right or bottom edge is not covered (no padded tiles).

    Count: (floor((W - w) / stride) + 1) * (floor((H - h) / stride) + 1).
    """
    w, h = tile_shape(source, tile)
    return [
        (col, row, w, h)
        for row in range(0, source.grid.height - h + 1, stride)
        for col in range(0, source.grid.width - w + 1, stride)
    ]


def random_window(source: RasterSource, tile: int, rng: np.random.Generator | None = None) -> Window:
    """A uniformly placed tile inside the raster (torch's generator when ``rng`` is None)."""
    w, h = tile_shape(source, tile)
    span_x, span_y = source.grid.width - w + 1, source.grid.height - h + 1
    if rng is None:
        col, row = int(torch.randint(0, span_x, ())), int(torch.randint(0, span_y, ()))
    else:
        col, row = int(rng.integers(0, span_x)), int(rng.integers(0, span_y))
    return col, row, w, h


def nodata_fraction(tile: np.ma.MaskedArray) -> float:
    """Share of pixels where any selected band is masked."""
    return float(np.ma.getmaskarray(tile).any(axis=0).mean())


@dataclass
class TileReader:
    """Reads one tile of one source as filled reflectance. Picklable: no handle inside."""

    sources: list[RasterSource]
    layout: Layout
    gdal_cache_mb: int
    fill: np.ndarray | None = None  # per-band value for masked pixels (the band means)
    # Per source, its selected bands as float16 reflectance with NaN where masked
    # (fedmoco.cache); reads come from it instead of GDAL once filled.
    cache: list[SampleCache | None] | None = None  # None for a source over cache_max_gb

    def read(self, i: int, window: Window) -> np.ma.MaskedArray:
        """Masked reflectance (bands, h, w) of ``window`` in source ``i``; RasterReadError."""
        raw = self._cached(i, window)
        if raw is not None:
            return np.ma.masked_invalid(raw.astype(np.float32), copy=False)
        handles = shared_handles(self.gdal_cache_mb)
        return self.sources[i].read(window, self.layout.positions[i], handles)

    def read_filled(self, i: int, window: Window, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, float]:
        """(tensor (bands, h, w) as ``filled(read(i, window)).to(dtype)`` gives it, nodata fraction).

        From the cache this skips the masked array and numpy's float16 arithmetic (emulated,
        slower than reading the file through GDAL): the same values, since the cache holds
        float16 (exact in float32) and the fill is rounded to float16 only for a float16 result.
        """
        raw = self._cached(i, window)
        if raw is None:
            tile = self.read(i, window)
            return self.filled(tile).to(dtype), nodata_fraction(tile)
        # Non-finite float16 = all exponent bits set; numpy's float16 isfinite is emulated and
        # took most of a cached read (0.5 ms of 0.8 ms per 13-band 64 px tile).
        bad = (raw.view(np.uint16) & 0x7C00) == 0x7C00
        if not bad.any():
            return torch.from_numpy(raw).to(dtype), 0.0
        fill = self.fill if self.fill is not None else np.zeros(raw.shape[0], np.float32)
        # the fill as filled() then .to(dtype) would give it: float16-rounded only for float16
        fill = fill.astype(np.float16 if dtype == torch.float16 else np.float32).reshape(-1, 1, 1)
        return torch.from_numpy(np.where(bad, fill, raw)).to(dtype), float(bad.any(axis=0).mean())

    def _cached(self, i: int, window: Window) -> np.ndarray | None:
        """The cached float16 window (bands, h, w), NaN where masked, a fresh C-contiguous copy;
        or None: not cached, or the source's files changed since the scan."""
        if self.cache is None or self.cache[i] is None or not _unchanged(self.sources[i]):
            return None
        hit = self.cache[i].get(0)
        if hit is None:
            return None
        return window_from_blocks(hit[0], window)  # hit[0]: the blocks, a view of the mapping

    def filled(self, tile: np.ma.MaskedArray) -> torch.Tensor:
        """Tensor (bands, h, w) with masked pixels set to the band mean (0 once normalised)."""
        fill = self.fill if self.fill is not None else np.zeros(tile.shape[0], np.float32)
        data = np.where(np.ma.getmaskarray(tile), fill.reshape(-1, 1, 1), tile.data)
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def _unchanged(source: RasterSource) -> bool:
    """Whether every file of ``source`` still has the stat stamp (size, mtime, ctime) it was
    scanned with.

    The cache's fingerprint is checked when a dataset is built; a file rewritten or truncated
    during a run must not keep being served from its stale cached pixels: it is read through
    GDAL again (new pixels, or the unreadable-window warning and None). One stat per file and
    read: microseconds, against milliseconds of augmentation per tile.
    """
    try:
        return all(stat_stamp(os.stat(path)) == stamp for path, stamp in {(b.path, b.stamp) for b in source.bands})
    except OSError:  # gone: let GDAL say so
        return False


def usable_grid_windows(
    reader: TileReader, tile: int, stride: int, max_nodata: float, skipped: Counter
) -> tuple[list[int], list[tuple[int, Window]]]:
    """Read every grid window once; keep those with at most ``max_nodata`` masked pixels.

    Returns (kept source indices, [(source index, window)]). A source that fails to read, or
    has no usable tile, is skipped and counted.
    """
    kept: list[int] = []
    windows: list[tuple[int, Window]] = []
    for i, source in enumerate(reader.sources):
        mine: list[tuple[int, Window]] = []
        fully_masked = 0
        candidates = grid_windows(source, tile, stride)
        try:
            for window in candidates:
                frac = nodata_fraction(reader.read(i, window))
                fully_masked += frac == 1.0
                if frac <= max_nodata:
                    mine.append((i, window))
        except RasterReadError as exc:
            _skip(skipped, exc, len(source.paths))
            continue
        if not mine:
            reason = ALL_NODATA if fully_masked == len(candidates) else TOO_MUCH_NODATA
            detail = f"no {tile} px tile with at most {max_nodata:.0%} nodata"
            _skip(skipped, RasterReadError(source.name, reason, detail), len(source.paths))
            continue
        kept.append(i)
        windows.extend(mine)
    return kept, windows


def probe_random(
    reader: TileReader, tile: int, max_nodata: float, tries: int, rng: np.random.Generator, skipped: Counter
) -> list[int]:
    """Keep the sources where one of ``tries`` random windows is usable (cheap on any size)."""
    kept = []
    for i, source in enumerate(reader.sources):
        fully_masked = 0
        try:
            for _ in range(tries):
                frac = nodata_fraction(reader.read(i, random_window(source, tile, rng)))
                if frac <= max_nodata:
                    kept.append(i)
                    break
                fully_masked += frac == 1.0
            else:
                reason = ALL_NODATA if fully_masked == tries else TOO_MUCH_NODATA
                detail = f"no {tile} px tile with at most {max_nodata:.0%} nodata in {tries} random windows"
                _skip(skipped, RasterReadError(source.name, reason, detail), len(source.paths))
        except RasterReadError as exc:
            _skip(skipped, exc, len(source.paths))
    return kept


# The raster cache stores each source in square blocks of _BLOCK px (all bands of a block
# together) rather than band after band: a random 64 px window of a band-sequential
# (bands, H, W) array touches bands x 64 pages wherever a raster row is over a page (2048 px),
# 3.3 MB of page cache and as many scattered disk reads for 106 kB of tile, where it touches at
# most 4 contiguous blocks (425 kB) here. That matters once the caches outgrow RAM.
_BLOCK = 64
# Rows and columns read per GDAL call while filling the cache: 512 rows (fewer only for rasters
# with very many bands) and the width in parts of a multiple of 512 columns, so that one read
# (masked float32 values and mask) stays under _FILL_BYTES. 512 is a multiple of the usual
# source block sizes (256, 512), so GDAL decodes each source block once; strips of the whole
# width, 64 rows high on a 10000 px wide 13-band raster, decoded each 256 px block four times.
_FILL_ROWS = 512
_FILL_BYTES = 64 * 2**20


def blocks_shape(bands: int, height: int, width: int, block: int = _BLOCK) -> tuple[int, int, int, int, int]:
    """Shape of a raster's cache in blocks: (block rows, block columns, bands, block, block)."""
    return -(-height // block), -(-width // block), bands, block, block


def window_from_blocks(blocks: np.ndarray, window: Window) -> np.ndarray:
    """The window (col, row, w, h) of a raster stored as ``blocks`` (block rows, block columns,
    bands, B, B), as a new (bands, h, w) array, copied block by block (at most 4 blocks for a
    window of <= B px)."""
    col, row, w, h = window
    b = blocks.shape[-1]
    out = np.empty((blocks.shape[2], h, w), blocks.dtype)
    for by in range(row // b, (row + h - 1) // b + 1):
        y0, y1 = max(row, by * b), min(row + h, (by + 1) * b)
        for bx in range(col // b, (col + w - 1) // b + 1):
            x0, x1 = max(col, bx * b), min(col + w, (bx + 1) * b)
            out[:, y0 - row:y1 - row, x0 - col:x1 - col] = blocks[by, bx, :, y0 - by * b:y1 - by * b,
                                                                  x0 - bx * b:x1 - bx * b]
    return out


def fill_reads(bands: int, height: int, width: int, block: int = _BLOCK) -> list[Window]:
    """The GDAL windows (col, row, w, h) that fill a blocked cache, block-aligned, each under
    _FILL_BYTES where a block row of ``block`` x ``block`` pixels allows it."""
    rows = _FILL_ROWS
    while rows > block and 8 * bands * rows * min(width, _FILL_ROWS) > _FILL_BYTES:  # 8: float32 + mask
        rows //= 2
    fits = _FILL_BYTES // (8 * bands * rows)  # columns per read
    step = _FILL_ROWS if fits >= _FILL_ROWS else block
    cols = width if fits >= width else max(block, fits // step * step)
    return [(c, r, min(cols, width - c), min(rows, height - r))
            for r in range(0, height, rows) for c in range(0, width, cols)]


def _fill_blocks(cache: SampleCache, window: Window, tile: np.ndarray) -> None:
    """Write ``tile`` (bands, h, w) float16, read at ``window`` (block-aligned), into the blocked
    ``cache``: one contiguous write per block row, padded with NaN past the raster."""
    _, nbx, bands, b, _ = cache.shape
    col, row, w, h = window
    ry, rx = -(-h // b), -(-w // b)
    padded = np.full((bands, ry * b, rx * b), np.nan, np.float16)
    padded[:, :h, :w] = tile
    blocked = padded.reshape(bands, ry, b, rx, b).transpose(1, 3, 0, 2, 4)  # (ry, rx, bands, b, b)
    per_block = bands * b * b
    for y in range(ry):
        cache.write(0, ((row // b + y) * nbx + col // b) * per_block, blocked[y])


@dataclass(frozen=True)
class CachePlan:
    """One source's raster cache: its blocked shape, its file's bytes, and whether it fits in
    what is left of ``cache_max_gb`` (``left``: the bytes left before it)."""

    shape: tuple[int, int, int, int, int]
    nbytes: int
    cached: bool
    left: float


def cache_plan(reader: TileReader, opts: SatelliteOptions) -> list[CachePlan]:
    """Per source, its raster cache: sources are cached in order while their caches fit in
    ``cache_max_gb``; the others are read through GDAL."""
    plan: list[CachePlan] = []
    left = opts.cache_max_gb * 1e9
    for i, source in enumerate(reader.sources):
        shape = blocks_shape(len(reader.layout.positions[i]), source.grid.height, source.grid.width)
        size = cache_nbytes(1, shape, "float16")
        plan.append(CachePlan(shape, size, size <= left, left))
        left -= size if size <= left else 0
    return plan


def attach_cache(reader: TileReader, root: Path, opts: SatelliteOptions, cfg: DataConfig,
                 plan: list[CachePlan]) -> None:
    """Give ``reader`` its decoded-raster cache (``fedmoco.cache``), filling what is missing.

    One cached array per source: its selected bands on the common grid, reflectance as
    float16 (relative error <= 2^-11, far below the augmentations' noise and jitter), NaN
    where masked, in blocks of _BLOCK px (:func:`blocks_shape`). Filled now, once per folder
    and options, straight into the file in strips of block rows (one strip in memory at a
    time; written through the file, not the mapping); a source that fails to read stays
    uncached and is read through GDAL (and skipped there, as without a cache). Sources are
    cached in order while their caches fit in ``cache_max_gb``: a sparse 800 kB GeoTIFF may
    declare 65535 x 65535 pixels, 32 GiB of float16 per 4 bands, and hours of reads to fill;
    a source over what is left is read through GDAL, as with the cache off.
    """
    if not (cfg.cache and opts.cache):
        return
    options = {"bands": opts.bands, "scale": opts.scale, "offset": opts.offset, "resolution": opts.resolution,
               "resampling": opts.resampling}
    caches: list[SampleCache | None] = []
    todo: list[int] = []  # the caches still to fill
    pending = 0  # bytes of the caches opened so far that are not filled yet: sparse, so not yet used
    for i, (source, planned) in enumerate(zip(reader.sources, plan)):
        if not planned.cached:
            log.warning("%s: not cached, read from disk each time: its cache would take %.1f GB, over the %.1f GB "
                        "left of cache_max_gb %g", source.name, planned.nbytes / 1e9, max(planned.left, 0) / 1e9,
                        opts.cache_max_gb)
            caches.append(None)
            continue
        stamps = file_stamps(root, source.paths)
        cache = open_cache(root, f"satellite{i}", 1, planned.shape, "float16",
                           {**options, "positions": reader.layout.positions[i]}, stamps, cfg.cache_dir or None,
                           access="random", pending=pending)
        if cache is None:
            return  # no room or no folder: every source goes through GDAL
        caches.append(cache)
        if cache.get(0) is None:
            pending += cache.nbytes
            todo.append(i)
    handles = shared_handles(reader.gdal_cache_mb)
    for i in tqdm(todo, desc="caching rasters", unit="raster", disable=not todo or not cfg.progress, leave=False):
        source, cache = reader.sources[i], caches[i]
        try:  # flagged only once whole: an interrupted fill is redone
            for window in fill_reads(cache.shape[2], source.grid.height, source.grid.width):
                tile = source.read(window, reader.layout.positions[i], handles)
                _fill_blocks(cache, window, np.where(np.ma.getmaskarray(tile), np.nan, tile.data))
        except RasterReadError as exc:
            log.warning("not cached, read from disk each time: %s", exc)
            continue
        except OSError as exc:  # the cache's volume filled up (other files grew meanwhile)
            log.warning("%s: cannot fill the raster cache (%s); it and the rasters after it are read from disk "
                        "each time", cache.path.parent, exc)
            for j in todo[todo.index(i):]:
                caches[j] = None
            cache.path.unlink(missing_ok=True)
            break
        cache.mark(0)
    reader.cache = caches


def _subset(reader: TileReader, keep: list[int]) -> TileReader:
    layout = reader.layout
    sub = Layout([layout.positions[i] for i in keep], layout.names, layout.wavelengths, layout.roles, layout.indices)
    cache = [reader.cache[i] for i in keep] if reader.cache is not None else None
    return TileReader([reader.sources[i] for i in keep], sub, reader.gdal_cache_mb, reader.fill, cache)


# ---------------------------------------------------------------------------- statistics


def estimate_normalization(
    reader: TileReader, tiles: Iterator[tuple[int, Window]], n_tiles: int, max_nodata: float
) -> Normalization:
    """Per-channel mean and std (reflectance units; indices unitless) over valid pixels.

    ``tiles`` yields candidate (source, window) pairs; the first ``n_tiles`` with at most
    ``max_nodata`` nodata are used. Index channels count pixels where all their bands are
    valid. Stds below MIN_STD are raised to it.
    """
    layout = reader.layout
    append = AppendIndices(layout.indices, layout.roles)
    total = np.zeros(layout.in_channels)
    total_sq = np.zeros(layout.in_channels)
    count = np.zeros(layout.in_channels)
    used = 0
    for i, window in tiles:
        if used >= n_tiles:
            break
        try:
            tile = reader.read(i, window)
        except RasterReadError as exc:  # a file that broke after the scan must not stop the build
            log.warning("statistics: %s", exc)
            continue
        if nodata_fraction(tile) > max_nodata:
            continue
        used += 1
        mask = np.ma.getmaskarray(tile)
        values = append(torch.from_numpy(np.asarray(tile.data, np.float32))).double().numpy()
        pair_masks = [mask[a] | mask[b] for a, b in append.pairs]
        valid = ~np.concatenate([mask, np.stack(pair_masks)]) if pair_masks else ~mask
        total += np.where(valid, values, 0).sum(axis=(1, 2))
        total_sq += np.where(valid, values**2, 0).sum(axis=(1, 2))
        count += valid.sum(axis=(1, 2))
    if used == 0 or (count == 0).any():
        raise NoUsableData("satellite: no usable tile to estimate the per-band mean and std from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return Normalization(mean=mean.tolist(), std=np.maximum(std, MIN_STD).tolist())


def _cached_statistics(root: Path, sources: Sequence[RasterSource], opts: SatelliteOptions, cfg: DataConfig,
                       estimate, channels: int | None = None,
                       positions: Sequence[Sequence[int]] | None = None) -> Normalization:
    """``estimate()``, or its earlier result for the same files (path, size, mtime, ctime), options,
    image size and seed: the estimate reads ``stats_tiles`` windows through GDAL (about a
    second per round on 2 cores), and it is deterministic given those. Only with the cache on."""
    if not (cfg.cache and opts.cache):
        return estimate()
    # The band positions read from each source: the same files and options stack bands in another
    # order since rasters with reordered descriptions are reconciled, and a memo from before kept
    # the mixed statistics (found by a review).
    key = {"stamps": file_stamps(root, [p for s in sources for p in s.paths]),
           "options": dataclasses.asdict(opts), "image_size": cfg.image_size, "seed": cfg.seed,
           "positions": [list(map(int, p)) for p in positions] if positions is not None else None}
    cache_dir = cfg.cache_dir or None
    found = read_memo(root, "satellite-stats", key, cache_dir)
    if found is not None:
        # A damaged or edited memo gave KeyError / TypeError tracebacks, or "std must be > 0"
        # naming no file, on every run until the cache was cleared (found by an audit).
        try:
            memo = Normalization.from_dict(found)
            if not all(math.isfinite(v) for v in (*memo.mean, *memo.std)):
                raise ValueError("non-finite values")
            if channels is not None and memo.channels != channels:
                raise ValueError(f"{memo.channels} channel(s) for {channels}")
            return memo
        except (KeyError, TypeError, ValueError, DataError) as exc:
            log.warning("ignoring a damaged band-statistics memo in the cache (%s: %s); computing them again",
                        type(exc).__name__, str(exc)[:120])
    normalization = estimate()
    write_memo(root, "satellite-stats", key, normalization.to_dict(), cache_dir)
    return normalization


def _sample_windows(pool: list[tuple[int, Window]], rng: np.random.Generator) -> Iterator[tuple[int, Window]]:
    yield from (pool[j] for j in rng.permutation(len(pool)))


def _random_tiles(reader: TileReader, weights: np.ndarray, tile: int, rng: np.random.Generator, limit: int):
    p = weights / weights.sum()
    for _ in range(limit):
        i = int(rng.choice(len(p), p=p))
        yield i, random_window(reader.sources[i], tile, rng)


# ---------------------------------------------------------------------------- datasets


class SatellitePretrainDataset(Dataset):
    """Two augmented views of a tile: ``dataset[i]`` -> (view_q, view_k) or None.

    Views are float32 (C, image_size, image_size), normalised. ``windows`` (grid sampling) fixes
    the tile of each index; otherwise (random sampling) index i picks a source in proportion to
    ``weights`` and a random window in it, redrawn up to ``max_tries`` times until its nodata
    fraction is at most ``max_nodata``. With ``partners`` (temporal positives) the key view is
    the same window of another acquisition of the same footprint.
    """

    def __init__(
        self,
        reader: TileReader,
        transform,
        tile: int,
        max_nodata: float,
        max_tries: int,
        windows: list[tuple[int, Window]] | None = None,
        weights: np.ndarray | None = None,
        length: int = 0,
        partners: dict[int, list[int]] | None = None,
    ) -> None:
        self.reader = reader
        self._transform = transform  # or a () -> transform factory, called on the first per-sample view
        self.tile, self.max_nodata, self.max_tries = tile, max_nodata, max_tries
        self.windows = windows
        self.cumulative = None if weights is None else np.cumsum(weights)
        self.length = len(windows) if windows is not None else length
        self.partners = partners or {}
        self.make_views = None  # () -> fedmoco.gpu_augment.SatelliteViews, set by build_pretrain_data

    def __len__(self) -> int:
        return self.length

    @property
    def transform(self):
        """The per-sample view (torchvision v2), built on first use: batched views never need it."""
        if isinstance(self._transform, partial):
            self._transform = self._transform()
        return self._transform

    def _pick(self, index: int, filled: torch.dtype | None = None) -> tuple[int, Window, Any]:
        """(source, window, tile): a masked tile (``reader.read``), or with ``filled`` (a dtype)
        a (filled tensor, nodata fraction) pair (``reader.read_filled``)."""
        read, fraction = self._reading(filled)
        if self.windows is not None:
            i, window = self.windows[index]
            return i, window, read(i, window)
        total = int(self.cumulative[-1])
        # An epoch as long as the area (the default) walks the sources in proportion to their
        # area, index by index. A shorter one (samples_per_epoch, or the 2^20 cap) draws each
        # sample's source at random by area: index by index it would only reach the first ones.
        slot = index % total if self.length >= total else int(torch.randint(0, total, ()))
        i = int(np.searchsorted(self.cumulative, slot, side="right"))
        for _ in range(self.max_tries):
            window = random_window(self.reader.sources[i], self.tile)
            tile = read(i, window)
            if fraction(tile) <= self.max_nodata:
                return i, window, tile
        raise RasterReadError(
            self.reader.sources[i].name,
            TOO_MUCH_NODATA,
            f"no tile with at most {self.max_nodata:.0%} nodata in {self.max_tries} random windows",
        )

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        try:
            i, window, tile = self._pick(index, filled=torch.float32)
        except RasterReadError as exc:
            log.warning("sample %d dropped: %s", index, exc)
            return None
        key_tile = self._key_tile(i, window, tile, filled=torch.float32)
        with one_thread():
            return self.transform(tile[0]), self.transform(key_tile[0])

    def batched_views(self):
        """(dataset of filled float16 tiles, SatelliteViews), or None for a dataset built without
        them. The tiles come from the raster cache when there is one, else from GDAL reads
        rounded to the cache's float16: the same tiles, so a seeded run's draws do not depend
        on whether a cache could be built."""
        if self.make_views is None:
            return None
        return SatelliteTiles(self), self.make_views()

    def _reading(self, filled: torch.dtype | None):
        """(read(i, window), nodata fraction of what read returns) for :meth:`_pick`."""
        if filled is not None:
            return partial(self.reader.read_filled, dtype=filled), lambda pair: pair[1]
        return self.reader.read, nodata_fraction

    def _key_tile(self, i: int, window: Window, tile: Any, filled: torch.dtype | None = None) -> Any:
        """The same window on another date when temporal partners exist, else ``tile``."""
        partners = self.partners.get(i)
        if not partners:
            return tile
        read, fraction = self._reading(filled)
        j = partners[int(torch.randint(0, len(partners), ()))]
        try:
            other = read(j, window)
        except RasterReadError as exc:
            log.warning("temporal partner not used: %s", exc)
            return tile
        # A cut swath or masked clouds would teach nodata, not seasons: keep the query's date.
        return other if fraction(other) <= self.max_nodata else tile


class SatelliteRecordView(Dataset):
    """One view per raster, for a DP release: ``view[j]`` -> (view, view) or None, each view
    float32 (C, image_size, image_size) in the federation's units.

    The unit a site adds or removes is a raster, and one raster owns many tiles, so a release
    reads ONE tile of raster j, at a random window drawn from the item's own randomness, and
    item j is a function of raster j and the options alone. Nothing the training data decides
    from all rasters enters it:

    - the rasters are those the scan read without error, whatever the others hold (not the
      band-count majority, not the random nodata probe, whose draws run across rasters);
      one with another number of bands than the federation's channels is left out;
    - each raster's band names, wavelengths and roles are its own (training takes them from
      the first raster);
    - tiles are read from the files through an uncached reader (whether a raster fits the
      raster cache depends on the rasters before it, and the cache rounds to float16);
    - nodata is filled with the federation's mean and the view normalised with its constants.

    A raster without a usable tile in ``max_tries`` windows gives None (left out of the sums).
    """

    def __init__(self, rasters: list[tuple[RasterSource, list[int]]], opts: SatelliteOptions, image_size: int,
                 target: Normalization) -> None:
        n_bands = len(target.mean) - len(opts.indices)
        kept, layouts = [], []
        for source, positions in rasters:
            if len(positions) != n_bands:
                log.info("release: %s left out: %d bands, the federation's encoder takes %d", source.name,
                         len(positions), n_bands)
                continue
            try:
                layouts.append(_layout(source, [positions], opts))
            except DataError as exc:
                log.info("release: %s left out: %s", source.name, exc)
                continue
            kept.append(source)
        self.layouts = layouts
        self.reader = TileReader(kept, Layout([lay.positions[0] for lay in layouts], [None] * n_bands, None, {},
                                              opts.indices), opts.gdal_cache_mb,
                                 fill=np.asarray(target.mean[:n_bands], np.float32))
        self.tile, self.max_nodata, self.max_tries = opts.tile(image_size), opts.max_nodata, opts.max_tries
        self._make = partial(pretrain_transform, opts, image_size, target)
        self._transforms: dict[tuple, Any] = {}

    def __len__(self) -> int:
        return len(self.reader.sources)

    def _transform(self, j: int):
        lay = self.layouts[j]
        key = (tuple(lay.wavelengths or ()), tuple(sorted(lay.roles.items())))
        if key not in self._transforms:
            self._transforms[key] = self._make(lay.wavelengths, lay.roles)
        return self._transforms[key]

    def __getitem__(self, j: int):
        if not 0 <= j < len(self):
            raise IndexError(j)
        source = self.reader.sources[j]
        try:
            for _ in range(self.max_tries):
                tile = self.reader.read(j, random_window(source, self.tile))
                if nodata_fraction(tile) <= self.max_nodata:
                    with one_thread():
                        view = self._transform(j)(self.reader.filled(tile))
                    return view, view
        except RasterReadError as exc:
            log.warning("release: %s left out: %s", source.name, exc)
        return None


def _release_view(rasters: list[tuple[RasterSource, list[int]]], opts: SatelliteOptions, image_size: int,
                  target: Normalization | None) -> Dataset | str:
    """The release view (fedmoco.data.ReleaseView): :class:`SatelliteRecordView` in the
    federation's normalisation; a reason when the federation fixed none (the site's own
    statistics fill nodata and normalise every tile, so one raster would move them all)."""
    if target is None:
        return ("the tiles are normalised and their nodata filled with statistics of all the site's rasters, so "
                "one raster moves every summary: the federation must fix run_config input-mean and input-std")
    return SatelliteRecordView(rasters, opts, image_size, target)


class SatelliteTiles(Dataset):
    """The tiles of a :class:`SatellitePretrainDataset` before augmentation, for batched views.

    ``dataset[i]`` -> filled reflectance (bands, t, t) float16, or a (query, key) pair of them
    when the source dataset has temporal partners; None when unreadable. A raster smaller
    than the tile is resized to it so that every tile of a batch has one shape.
    """

    def __init__(self, source: SatellitePretrainDataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def _filled(self, pair: tuple[torch.Tensor, float]) -> torch.Tensor:
        # float16, what the cache holds: half the bytes through worker IPC and the host-device copy
        x, t = pair[0], self.source.tile
        if x.shape[-2:] != (t, t):
            x = torch.nn.functional.interpolate(x[None].float(), size=(t, t), mode="bilinear",
                                                align_corners=False)[0].half()
        return x

    def __getitem__(self, index: int):
        if not 0 <= index < len(self.source):
            raise IndexError(index)
        try:
            i, window, tile = self.source._pick(index, filled=torch.float16)
        except RasterReadError as exc:
            log.warning("sample %d dropped: %s", index, exc)
            return None
        with one_thread():
            if not self.source.partners:
                return self._filled(tile)
            return self._filled(tile), self._filled(self.source._key_tile(i, window, tile, filled=torch.float16))


class SatelliteLabelledDataset(Dataset):
    """Grid tiles with the label of their file: ``dataset[i]`` -> (image, label) or None.

    Images are float32 (C, image_size, image_size), normalised, deterministic.
    """

    def __init__(self, reader: TileReader, transform, windows: list[tuple[int, Window]], labels: list[int]):
        self.reader, self.transform, self.windows, self.labels = reader, transform, windows, labels

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int):
        i, window = self.windows[index]
        try:
            tile = self.reader.read(i, window)
        except RasterReadError as exc:
            log.warning("sample %d dropped: %s", index, exc)
            return None
        with one_thread():
            return self.transform(self.reader.filled(tile)), self.labels[i]


def temporal_partners(sources: Sequence[RasterSource]) -> dict[int, list[int]]:
    """Per source, the other sources on the same grid with a different acquisition date."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(sources):
        if s.date is not None:
            t = s.grid.transform
            key = (s.grid.crs, s.grid.width, s.grid.height, tuple(round(v, 6) for v in t[:6]))
            groups.setdefault(key, []).append(i)
    out: dict[int, list[int]] = {}
    for members in groups.values():
        for i in members:
            others = [j for j in members if sources[j].date != sources[i].date]
            if others:
                out[i] = others
    return out


# ---------------------------------------------------------------------------- builders


def _describe(reader: TileReader, extra: str, skipped: Counter) -> str:
    products = sum(1 for s in reader.sources if len(s.paths) > 1)
    layout = reader.layout
    return (
        f"satellite: {len(reader.sources)} rasters ({products} per-band products), "
        f"{layout.in_channels} channels [{', '.join(layout.channel_names)}], {extra}; {format_skipped(skipped)}"
    )


def _satellite_views(*args):
    from fedmoco.gpu_augment import SatelliteViews  # only sites that batch their views pay the import

    return SatelliteViews(*args)


def build_pretrain_data(root: Path, cfg: DataConfig) -> PretrainData:
    """Unlabelled two-view tiles from the rasters under ``root``.

    in_channels = selected bands + indices. The Normalization (reflectance mean/std per
    channel) is estimated from ``stats_tiles`` tiles drawn with ``cfg.seed``.
    """
    opts = parse_options(cfg.options)
    tile = opts.tile(cfg.image_size)
    scan = scan_folder(Path(root), opts)
    skipped = scan.skipped
    reader = TileReader(scan.sources, scan.layout, opts.gdal_cache_mb)
    rng = np.random.default_rng(cfg.seed)
    windows = None
    if opts.sampling == "grid":
        keep, windows = usable_grid_windows(reader, tile, opts.grid_stride(cfg.image_size), opts.max_nodata, skipped)
    else:
        keep = probe_random(reader, tile, opts.max_nodata, opts.max_tries, rng, skipped)
    if not keep:
        raise DataError(f"{root}: no raster has a usable tile ({format_skipped(skipped)})")
    if windows is not None:
        remap = {old: new for new, old in enumerate(keep)}
        windows = [(remap[i], w) for i, w in windows]
    reader = _subset(reader, keep)
    weights = np.array([max(1, (s.grid.width * s.grid.height) // (tile * tile)) for s in reader.sources], float)
    if windows is not None:
        candidates = _sample_windows(windows, rng)
    else:
        candidates = _random_tiles(reader, weights, tile, rng, opts.stats_tiles * opts.max_tries)
    # Statistics from the rasters' own pixels, before the cache is attached: the float16 cache
    # would shift them (by up to 2^-11 relative), and a checkpoint's normalization must not
    # depend on whether a site's cache was on.
    normalization = cfg.run_normalization(reader.layout.in_channels, lambda: _cached_statistics(
        Path(root), scan.sources, opts, cfg,
        lambda: estimate_normalization(reader, candidates, opts.stats_tiles, opts.max_nodata),
        reader.layout.in_channels, reader.layout.positions))
    plan = cache_plan(reader, opts)
    attach_cache(reader, Path(root), opts, cfg, plan)
    reader.fill = np.asarray(normalization.mean[: reader.layout.n_bands], np.float32)
    shared_handles().close()  # workers open their own handles; none are inherited open

    wavelengths = reader.layout.wavelengths
    if wavelengths is None and opts.haze_p > 0:
        log.info("satellite: band wavelengths unknown, haze augmentation off (set the wavelengths option)")
    transform = partial(pretrain_transform, opts, cfg.image_size, normalization, wavelengths, reader.layout.roles)
    partners = temporal_partners(reader.sources) if opts.temporal else {}
    if opts.temporal and not partners:
        log.warning("satellite: temporal=true but no two acquisitions of one footprint carry dates")
    length = len(windows) if windows is not None else (opts.samples_per_epoch or auto_epoch_length(weights))
    dataset = SatellitePretrainDataset(
        reader, transform, tile, opts.max_nodata, opts.max_tries, windows, weights, length, partners
    )
    dataset.make_views = partial(_satellite_views, opts, cfg.image_size, normalization, wavelengths,
                                 reader.layout.roles)
    extra = (
        f"{len(windows)} grid tiles" if windows is not None else f"{length} random {tile} px tiles per epoch"
    ) + (f", {len(partners)} rasters with temporal partners" if partners else "")
    return PretrainData(dataset, reader.layout.in_channels, normalization, skipped, _describe(reader, extra, skipped),
                        cache_bytes=sum(p.nbytes for p in plan if p.cached),
                        cache_skipped=sum(not p.cached for p in plan),
                        release_view=partial(_release_view, scan.readable, opts, cfg.image_size))


def auto_epoch_length(weights: np.ndarray) -> int:
    """Random tiles per epoch when ``samples_per_epoch`` is 0: about one pass over the area
    (``weights``: tiles per raster), at most MAX_AUTO_EPOCH. Every tile is drawn at random
    anyway, so a longer epoch would only delay the epoch's checkpoint and metrics; and the
    sampler holds one index per sample."""
    area = int(weights.sum())
    if area > MAX_AUTO_EPOCH:
        log.info("satellite: the rasters hold %s tiles; an epoch draws %s of them at random "
                 "(set samples_per_epoch for another length)", f"{area:,}", f"{MAX_AUTO_EPOCH:,}")
    return min(area, MAX_AUTO_EPOCH)


def build_labelled_data(
    root: Path, cfg: DataConfig, labels_csv: Path | None, normalization: Normalization | None,
    exclude: Sequence[Path] = (),
) -> LabelledData:
    """Labelled grid tiles: each tile gets its file's label (sub-folder name or CSV).

    For a per-band product the label is that of its first band file. With ``normalization``
    (from the pretraining checkpoint) it is used as is; its channel count must match.
    """
    opts = parse_options(cfg.options)
    tile = opts.tile(cfg.image_size)
    root = Path(root)
    scan = scan_folder(root, opts, exclude=[*exclude, *([labels_csv] if labels_csv else [])])
    skipped = scan.skipped
    if normalization is not None and normalization.channels != scan.layout.in_channels:
        raise DataError(
            f"{root}: the checkpoint's normalization has {normalization.channels} channels but the "
            f"selected bands give {scan.layout.in_channels} ({', '.join(scan.layout.channel_names)}); select the "
            "encoder's bands with the data option bands (1-based indices or names, docs/satellite.md)"
        )
    reader = TileReader(scan.sources, scan.layout, opts.gdal_cache_mb)
    keep, windows = usable_grid_windows(reader, tile, opts.grid_stride(cfg.image_size), opts.max_nodata, skipped)
    if not keep:
        raise DataError(f"{root}: no raster has a usable tile ({format_skipped(skipped)})")
    remap = {old: new for new, old in enumerate(keep)}
    windows = [(remap[i], w) for i, w in windows]
    reader = _subset(reader, keep)
    labels, classes, file_labels = _source_labels(root, reader.sources, labels_csv)
    if normalization is None:
        rng = np.random.default_rng(cfg.seed)
        normalization = estimate_normalization(reader, _sample_windows(windows, rng), opts.stats_tiles, opts.max_nodata)
    reader.fill = np.asarray(normalization.mean[: reader.layout.n_bands], np.float32)
    shared_handles().close()
    transform = eval_transform(opts, cfg.image_size, normalization, reader.layout.roles)
    dataset = SatelliteLabelledDataset(reader, transform, windows, labels)
    return LabelledData(dataset, classes, reader.layout.in_channels, normalization, skipped,
                        sample_labels=[labels[i] for i, _ in windows], covered_labels=file_labels)
