"""A small synthetic Earth-observation archive for demos and tests.

Scenes are maps of four land-cover classes (water, vegetation, bare soil, urban) with distinct
reflectance spectra, so an encoder has something to learn. The archive covers the layouts a
site meets: 4- and 13-band, uint16 digital numbers and float32 reflectance, tiled and striped,
compressed and not, scale/offset metadata, nodata stripes, a Sentinel-2-like product stored as
one JPEG 2000 file per band at 10, 20 and 60 m, two dated acquisitions of one footprint, and
a few broken files. ``python -m domains.satellite.demo DIR`` writes one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from affine import Affine

from domains.satellite.bands import FOUR_BAND_ORDER, SENTINEL2, SENTINEL2_ORDER

CLASSES = ["water", "vegetation", "bare_soil", "urban"]
# Typical surface reflectance per Sentinel-2 band (B01 ... B12 with B8A), from the shapes of
# standard spectral library curves: water dark beyond green, vegetation with the red edge and
# high NIR, soil rising into the SWIR, urban flat and bright. B10 (cirrus) is near zero.
SIGNATURES = np.array(
    [
        [0.070, 0.060, 0.045, 0.025, 0.020, 0.015, 0.012, 0.010, 0.009, 0.005, 0.002, 0.005, 0.003],
        [0.030, 0.035, 0.070, 0.035, 0.100, 0.280, 0.360, 0.400, 0.410, 0.300, 0.005, 0.200, 0.100],
        [0.100, 0.120, 0.170, 0.220, 0.240, 0.260, 0.270, 0.280, 0.290, 0.250, 0.010, 0.330, 0.280],
        [0.140, 0.150, 0.160, 0.170, 0.180, 0.190, 0.200, 0.210, 0.210, 0.180, 0.008, 0.240, 0.220],
    ],
    np.float32,
)
# Blue, green, red, NIR of a 4-band product are Sentinel-2 B02, B03, B04, B08.
FOUR_BAND_COLUMNS = [SENTINEL2_ORDER.index(b) for b in ("B02", "B03", "B04", "B08")]
CRS = "EPSG:32632"
# Landsat Collection 2 surface-reflectance scaling, stored as GDAL band scale/offset.
LANDSAT_SCALE, LANDSAT_OFFSET = 2.75e-5, -0.2


def from_origin(west: float, north: float, xsize: float, ysize: float) -> Affine:
    """North-up transform of a grid whose top-left corner is (west, north)."""
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


def _smooth_field(rng: np.random.Generator, n: int, height: int, width: int, cells: int) -> np.ndarray:
    coarse = torch.from_numpy(rng.standard_normal((1, n, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0].numpy()


def synthetic_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    n_bands: int,
    class_bias: np.ndarray | None = None,
    vegetation_vigour: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance (n_bands, height, width) float32 and the class map (height, width).

    ``class_bias`` (4,) shifts the class proportions (a "site"); ``vegetation_vigour`` scales
    the vegetation red-edge/NIR plateau (a season).
    """
    bias = np.zeros(4, np.float32) if class_bias is None else np.asarray(class_bias, np.float32)
    fields = _smooth_field(rng, 4, height, width, cells=max(3, max(height, width) // 48))
    classes = np.argmax(fields + bias.reshape(-1, 1, 1), axis=0)
    signatures = SIGNATURES.copy()
    signatures[1, 4:10] *= vegetation_vigour
    if n_bands == 4:
        signatures = signatures[:, FOUR_BAND_COLUMNS]
    cube = signatures[classes].transpose(2, 0, 1)  # (bands, H, W)
    illumination = 1.0 + 0.05 * _smooth_field(rng, 1, height, width, cells=4)
    texture = 1.0 + 0.08 * _smooth_field(rng, 1, height, width, cells=max(4, max(height, width) // 8))
    noise = rng.normal(0.0, 0.004, cube.shape).astype(np.float32)
    cube = cube * illumination * texture + noise
    return np.clip(cube, 0.0005, 1.5).astype(np.float32), classes


def _band_names(n_bands: int) -> list[str]:
    return list(SENTINEL2_ORDER) if n_bands == 13 else list(FOUR_BAND_ORDER)


def to_dn(reflectance: np.ndarray, scale: float = 1e-4, offset: float = 0.0) -> np.ndarray:
    """Digital numbers (uint16) such that DN * scale + offset is the reflectance; 0 is kept
    free for nodata."""
    return np.clip(np.rint((reflectance - offset) / scale), 1, 65535).astype(np.uint16)


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    transform,
    nodata: float | None = None,
    descriptions: list[str] | None = None,
    tiled: bool = True,
    compress: str | None = "deflate",
    scales: tuple[float, float] | None = None,
    tags: dict[str, str] | None = None,
    driver: str = "GTiff",
) -> Path:
    """Write ``data`` (bands, H, W) as a georeferenced raster with the given layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver=driver,
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype.name,
        crs=CRS,
        transform=transform,
        nodata=nodata,
    )
    if driver == "GTiff":
        profile["tiled"] = tiled
        if tiled:
            profile.update(blockxsize=32, blockysize=32)
        if compress:
            profile["compress"] = compress
            if compress in ("deflate", "lzw", "zstd"):
                profile["predictor"] = 3 if data.dtype.kind == "f" else 2
    else:  # JP2OpenJPEG, lossless like Sentinel-2's own files
        profile.update(QUALITY="100", REVERSIBLE="YES")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, name)
        if scales is not None:
            dst.scales = (scales[0],) * data.shape[0]
            dst.offsets = (scales[1],) * data.shape[0]
        if tags:
            dst.update_tags(**tags)
    return path


def _nodata_stripes(dn: np.ndarray, tile: int) -> np.ndarray:
    """Blank a horizontal stripe, a vertical line and a cut corner, as at swath edges."""
    dn = dn.copy()
    h, w = dn.shape[1:]
    dn[:, h // 2 - tile // 8 : h // 2 + tile // 8, :] = 0
    dn[:, :, w - tile // 4 : w - tile // 4 + 2] = 0
    rows, cols = np.indices((h, w))
    dn[:, rows + cols < tile] = 0
    return dn


def _broken_files(root: Path, rng: np.random.Generator, n_bands: int, tile: int, transform) -> None:
    broken = root / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "not_a_raster.tif").write_text("field notes, not pixels\n")
    cube, _ = synthetic_scene(rng, tile, tile, n_bands)
    good = write_raster(broken / "truncated.tif", to_dn(cube), transform=transform, nodata=0)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 3])
    three, _ = synthetic_scene(rng, tile, tile, 4)
    write_raster(broken / "three_bands.tif", to_dn(three[:3]), transform=transform, nodata=0)
    write_raster(
        broken / "all_nodata.tif", np.zeros((n_bands, tile, tile), np.uint16), transform=transform, nodata=0
    )


def _band_file_product(root: Path, rng: np.random.Generator, tile: int, bias: np.ndarray, x0: float) -> None:
    """A Sentinel-2 L1C-like product: 13 single-band JPEG 2000 files at their native 10/20/60 m."""
    size10 = 6 * tile  # divisible by 6 so the 60 m bands cover exactly the same extent
    cube, _ = synthetic_scene(rng, size10, size10, 13, bias)
    scene = "T32TNS_20230601T103629"
    folder = root / "S2B_MSIL1C_20230601T103629_N0509_R008_T32TNS" / "IMG_DATA"
    for b, name in enumerate(SENTINEL2_ORDER):
        res = SENTINEL2[name][1]
        f = res // 10
        # Block means: what a coarser detector sees of the 10 m field.
        band = cube[b].reshape(size10 // f, f, size10 // f, f).mean(axis=(1, 3))
        write_raster(
            folder / f"{scene}_{name}.jp2",
            to_dn(band)[None],
            transform=from_origin(x0, 5_100_000.0, res, res),
            nodata=0,
            driver="JP2OpenJPEG",
        )


def make_demo_archive(
    out_dir: Path, *, bands: int = 4, seed: int = 0, tile_size: int = 64, labelled: bool = False
) -> Path:
    """Write a synthetic archive under ``out_dir`` and return ``out_dir``.

    ``bands`` is 4 (blue, green, red, NIR) or 13 (Sentinel-2). Scenes are 4 x 4 tiles of
    ``tile_size`` pixels at 10 m. ``seed`` makes it deterministic; different seeds give
    different sites (class proportions, gain, footprint). ``labelled=True`` writes instead
    six single-class-dominated tiles per class into per-class sub-folders (for kNN).
    """
    if bands not in (4, 13):
        raise ValueError(f"bands={bands}: the demo archive has 4 or 13 bands")
    if tile_size < 16:
        raise ValueError(f"tile_size={tile_size}: must be >= 16")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    site_bias = rng.normal(0.0, 0.4, 4).astype(np.float32)
    x0 = 300_000.0 + 10_000.0 * (seed % 50)
    names = _band_names(bands)
    t = tile_size

    if labelled:
        for c, cls in enumerate(CLASSES):
            for k in range(6):
                bias = site_bias.copy()
                bias[c] += 2.5  # the file's class covers most of it
                cube, _ = synthetic_scene(rng, t, t, bands, bias)
                transform = from_origin(x0 + 2_000.0 * k, 5_000_000.0 - 2_000.0 * c, 10.0, 10.0)
                write_raster(
                    out_dir / cls / f"{cls}_{k:02d}.tif", to_dn(cube), transform=transform, nodata=0, descriptions=names
                )
        return out_dir

    size = 4 * t
    gain = float(rng.uniform(0.9, 1.1))

    def scene(**kwargs) -> np.ndarray:
        return synthetic_scene(rng, size, size, bands, site_bias, **kwargs)[0] * gain

    def at(k: int):
        return from_origin(x0 + k * size * 10.0, 5_000_000.0, 10.0, 10.0)

    tag = f"{bands}band"
    write_raster(out_dir / f"{tag}_uint16_tiled_deflate.tif", to_dn(scene()), transform=at(0), nodata=0, descriptions=names)
    write_raster(
        out_dir / f"{tag}_uint16_striped_raw_nodata.tif",
        _nodata_stripes(to_dn(scene()), t),
        transform=at(1),
        nodata=0,
        tiled=False,
        compress=None,
    )
    floats = scene()
    floats[:, : t // 8, :] = np.nan  # a missing scan line block
    write_raster(
        out_dir / f"{tag}_float32_tiled_lzw.tif",
        floats,
        transform=at(2),
        nodata=float("nan"),
        compress="lzw",
        descriptions=names,
    )
    write_raster(
        out_dir / f"{tag}_uint16_scaled_offset.tif",
        to_dn(scene(), LANDSAT_SCALE, LANDSAT_OFFSET),
        transform=at(3),
        nodata=0,
        scales=(LANDSAT_SCALE, LANDSAT_OFFSET),
        descriptions=names,
    )
    # Two acquisitions of one footprint: spring and late-summer vegetation.
    for date, vigour in (("2023-04-15", 0.6), ("2023-08-15", 1.0)):
        series_rng = np.random.default_rng(seed + 1000)  # same land cover on both dates
        cube = synthetic_scene(series_rng, size, size, bands, site_bias, vegetation_vigour=vigour)[0]
        write_raster(
            out_dir / "timeseries" / f"{tag}_{date.replace('-', '')}.tif",
            to_dn(cube * gain),
            transform=at(4),
            nodata=0,
            descriptions=names,
            tags={"ACQUISITION_DATE": date},
        )
    if bands == 13:
        _band_file_product(out_dir, rng, t, site_bias, x0 + 5 * size * 10.0)
    _broken_files(out_dir, rng, bands, t, at(6))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--bands", type=int, default=4, choices=(4, 13))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--labelled", action="store_true")
    args = parser.parse_args(argv)
    out = make_demo_archive(args.out_dir, bands=args.bands, seed=args.seed, tile_size=args.tile_size, labelled=args.labelled)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
