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
SENTINEL2_WAVELENGTHS = np.array([SENTINEL2[b][0] for b in SENTINEL2_ORDER], np.float32)  # nm
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


# --------------------------------------------------------------------------- land-cover task


def _class_texture(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """(size, size) multiplicative texture of one land-cover class, around 1.

    water: smooth with faint wind ripples; vegetation: parcels with crop rows at a random
    angle; bare soil: fine speckle and moisture blotches; urban: blocks of roofs split by
    darker streets and shadows (the highest-frequency texture).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if cls == 0:
        return 1 + 0.03 * np.sin(along / rng.uniform(1.5, 3.0)) + 0.02 * _smooth_field(rng, 1, size, size, 4)[0]
    if cls == 1:
        rows = 1 + 0.12 * np.sin(2 * np.pi * along / rng.uniform(3.0, 6.0))
        parcels = 1 + 0.15 * np.sign(_smooth_field(rng, 1, size, size, max(3, size // 16))[0])
        return rows * parcels
    if cls == 2:
        return 1 + 0.10 * rng.standard_normal((size, size)) + 0.15 * _smooth_field(rng, 1, size, size, max(3, size // 12))[0]
    block = int(rng.integers(5, 9))
    street = (((xx.astype(int) % block) < 2) | ((yy.astype(int) % block) < 2)).astype(np.float32)
    roofs = rng.uniform(0.7, 1.4, size=(size // block + 2, size // block + 2))
    roof = roofs[(yy // block).astype(int), (xx // block).astype(int)]
    return roof * (1 - 0.55 * street) * (1 + 0.05 * rng.standard_normal((size, size)))


def _class_spectrum(rng: np.random.Generator, cls: int) -> np.ndarray:
    """One patch's 13-band spectrum of ``cls``: the library curve with its natural variants
    (turbid water, dry or stressed vegetation, wet or dry soil, bright or dark roofs)."""
    sig = SIGNATURES[cls].copy()
    if cls == 0:
        sig[1:5] += rng.uniform(0.0, 0.04) * np.array([0.6, 1.0, 0.9, 0.5], np.float32)  # sediment
    elif cls == 1:
        vigour = rng.uniform(0.55, 1.1)
        sig[5:10] *= vigour  # red edge and NIR plateau
        sig[3] *= 2.0 - vigour  # stressed canopies reflect more red
    elif cls == 2:
        sig *= rng.uniform(0.6, 1.15)  # moisture darkens soil across the spectrum
    else:
        sig *= rng.uniform(0.7, 1.3)
    return sig * np.exp(rng.normal(0.0, 0.05, sig.shape)).astype(np.float32)


def landcover_patch(
    rng: np.random.Generator, size: int, n_bands: int, cls: int, *, dominance: tuple[float, float] = (0.45, 0.7),
) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance (n_bands, size, size) float32 of a patch meant to be dominated by ``cls``,
    and its class map (size, size).

    ``cls`` covers a random share in ``dominance``; other classes fill the rest in smooth
    blobs (one of them may end up larger: the label is the map's majority, see
    :func:`make_landcover_archive`). Each class has its own spectrum variant and texture; the patch gets an
    illumination gain and an additive haze that falls with wavelength (both per patch), so
    brightness alone does not give the class away.
    """
    fields = _smooth_field(rng, 4, size, size, cells=max(3, size // 16))
    share = rng.uniform(*dominance)
    others = np.argmax(np.delete(fields, cls, axis=0), axis=0)
    others = np.arange(4)[np.arange(4) != cls][others]
    cut = np.quantile(fields[cls], 1.0 - share)
    classes = np.where(fields[cls] >= cut, cls, others)
    cube = np.zeros((13, size, size), np.float32)
    for c in range(4):
        mask = classes == c
        if mask.any():
            cube[:, mask] = (_class_spectrum(rng, c)[:, None] * _class_texture(rng, c, size)[mask][None])
    # Sun angle, atmosphere and sensor gain differ between acquisitions far more than classes
    # differ in brightness: a brightness-only classifier must fail.
    haze = rng.uniform(0.0, 0.08) * (SENTINEL2_WAVELENGTHS[0] / SENTINEL2_WAVELENGTHS) ** 2
    cube = cube * rng.uniform(0.6, 1.5) + haze[:, None, None].astype(np.float32)
    cube += rng.normal(0.0, 0.004, cube.shape).astype(np.float32)
    if n_bands == 4:
        cube = cube[FOUR_BAND_COLUMNS]
    return np.clip(cube, 0.0005, 1.5).astype(np.float32), classes


def make_landcover_archive(
    out_dir: Path | str, *, n_scenes: int = 4, patches: int = 4, patch_size: int = 32, bands: int = 4,
    seed: int = 0, labels: bool = True, first_scene: int = 0,
) -> Path:
    """A synthetic land-cover archive for the classification task; returns ``out_dir``.

    With ``labels``: ``out_dir/patches/scene_XXX/patch_YY.tif`` (``patches`` x ``patches``
    GeoTIFF patches of ``patch_size`` px per scene, uint16 DN = reflectance x 10000) and
    ``out_dir/labels.csv`` with columns ``path,label,group``: ``label`` the class covering most
    of the patch (water, vegetation, bare_soil, urban; see :func:`landcover_patch`), ``group`` the scene
    (neighbouring patches must never straddle a train/test split). Without ``labels``:
    one mosaic GeoTIFF per scene, ``out_dir/scene_XXX.tif``, for unlabelled pretraining.
    ``first_scene`` offsets scene numbers and footprints so archives never share a scene.
    Everything is synthetic; the output is a pure function of the arguments.
    """
    if bands not in (4, 13):
        raise ValueError(f"bands={bands}: the demo archive has 4 or 13 bands")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    names = _band_names(bands)
    rows = []
    for s in range(first_scene, first_scene + n_scenes):
        x0, y0 = 400_000.0 + 20_000.0 * s, 5_200_000.0
        made = [[landcover_patch(rng, patch_size, bands, int(c)) for c in row]
                for row in rng.integers(4, size=(patches, patches))]
        cubes = [[cube for cube, _ in row] for row in made]
        majority = [[int(np.bincount(m.ravel(), minlength=4).argmax()) for _, m in row] for row in made]
        if not labels:
            mosaic = np.concatenate([np.concatenate(row, axis=2) for row in cubes], axis=1)
            write_raster(out / f"scene_{s:03d}.tif", to_dn(mosaic), transform=from_origin(x0, y0, 10.0, 10.0),
                         nodata=0, descriptions=names)
            continue
        for i, row in enumerate(cubes):
            for j, cube in enumerate(row):
                rel = Path(f"scene_{s:03d}") / f"patch_{i * patches + j:02d}.tif"
                transform = from_origin(x0 + 10.0 * patch_size * j, y0 - 10.0 * patch_size * i, 10.0, 10.0)
                write_raster(out / "patches" / rel, to_dn(cube), transform=transform, nodata=0, descriptions=names)
                rows.append((rel.as_posix(), CLASSES[majority[i][j]], f"scene_{s:03d}"))
    if labels:
        lines = ["path,label,group"] + [",".join(r) for r in rows]
        (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return out


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
