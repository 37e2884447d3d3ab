"""The satellite domain's data options (``--data-option key=value``), parsed and validated.

Values arrive as strings from the command line or as native values from a federation's
node_config; both are accepted. Every option, its default and why, is in docs/satellite.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from domains.satellite.reader import (DEFAULT_MAX_BLOCK_MB, DEFAULT_MAX_COMPRESSION_RATIO, DEFAULT_MAX_RASTER_PIXELS,
                                      RESAMPLING_METHODS)
from fedmoco.data import parse_bool
from fedmoco.errors import DataError

INDICES = ("ndvi", "ndwi")
ROLES = ("blue", "green", "red", "nir")


@dataclass(frozen=True)
class SatelliteOptions:
    """Validated options. ``tile_size`` 0 means "same as the image size"."""

    # reading
    bands: tuple[int | str, ...] | None = None
    scale: float | None = None
    offset: float | None = None
    resolution: float | None = None
    resampling: str = "bilinear"
    gdal_cache_mb: int = 64
    max_block_mb: float = DEFAULT_MAX_BLOCK_MB
    max_raster_pixels: int = DEFAULT_MAX_RASTER_PIXELS
    max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO
    cache: bool = True  # decoded-raster cache (fedmoco.cache); false reads every tile through GDAL
    cache_max_gb: float = 16.0  # rasters are cached while their caches fit in this; the rest read through GDAL
    # sampling
    tile_size: int = 0
    sampling: str = "random"
    stride: int = 0
    samples_per_epoch: int = 0
    max_nodata: float = 0.1
    max_tries: int = 20
    stats_tiles: int = 256
    temporal: bool = False
    # extra channels
    indices: tuple[str, ...] = ()
    band_roles: Mapping[str, int | str] = field(default_factory=dict)
    wavelengths: tuple[float, ...] | None = None
    # augmentations
    flip: bool = True  # flips and 90-degree rotations; off for oblique views or sun-angle shadows
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    haze_p: float = 0.3
    haze_max: float = 0.08
    haze_exponent: float = 2.0
    noise_p: float = 0.5
    noise_std: float = 0.01
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    band_dropout: float = 0.1

    def tile(self, image_size: int) -> int:
        """Tile edge in pixels read from disk."""
        return self.tile_size or image_size

    def grid_stride(self, image_size: int) -> int:
        """Grid step in pixels (defaults to the tile edge: non-overlapping tiles)."""
        return self.stride or self.tile(image_size)


class _Invalid(ValueError):
    """Why a value is wrong; parse_options names the option and the whole value."""


def _number(kind: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    what = "an integer" if kind is int else "a number"

    def parse(value: Any):
        if isinstance(value, bool):
            raise _Invalid(f"expected {what}")
        try:
            if kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                out = int(value) if isinstance(value, (int, float)) else int(str(value).strip())
            else:
                out = float(value)
        except (TypeError, ValueError):
            raise _Invalid(f"expected {what}") from None
        if out != out or out in (float("inf"), float("-inf")):  # NaN, or inf: scale=inf made every file "all nodata"
            raise _Invalid(f"expected a finite {what.split()[-1]}")
        if lo is not None and (out < lo or (lo_open and out == lo)):
            raise _Invalid(f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and out > hi:
            raise _Invalid(f"must be <= {hi}")
        return out

    return parse


_probability = _number(float, 0.0, 1.0)


def _items(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _bool(value: Any) -> bool:
    try:
        return parse_bool(value)
    except ValueError:
        raise _Invalid("expected true or false") from None


def _choice(*choices: str):
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise _Invalid(f"choose one of {', '.join(choices)}")
        return text

    return parse


def _bands(value: Any) -> tuple[int | str, ...]:
    items = _items(value)
    if not items:
        raise _Invalid("expected band indices (1-based) or band descriptions, comma-separated")
    out: list[int | str] = []
    for item in items:
        text = str(item).strip()
        if text.lstrip("-").isdigit():
            if int(text) < 1:
                raise _Invalid("band indices start at 1")
            out.append(int(text))
        else:
            out.append(text)
    if len({str(b).upper() for b in out}) != len(out):
        raise _Invalid("a band is selected twice")
    return tuple(out)


def _indices(value: Any) -> tuple[str, ...]:
    items = [str(v).strip().lower() for v in _items(value)]
    if items in (["none"], []):
        return ()
    unknown = [i for i in items if i not in INDICES]
    if unknown:
        raise _Invalid(f"unknown index {unknown[0]!r}; choose from {', '.join(INDICES)}")
    return tuple(dict.fromkeys(items))


def _roles(value: Any) -> dict[str, int | str]:
    pairs = value.items() if isinstance(value, Mapping) else (str(p).partition("=")[::2] for p in _items(value))
    out: dict[str, int | str] = {}
    for role, band in pairs:
        role, band = str(role).strip().lower(), str(band).strip()
        if role not in ROLES or not band:
            raise _Invalid(f"expected role=band pairs with roles from {', '.join(ROLES)}, e.g. red=B04,nir=B08")
        out[role] = int(band) if band.isdigit() else band
    return out


def _floats(value: Any) -> tuple[float, ...]:
    positive = _number(float, 0.0, lo_open=True)
    return tuple(positive(v) for v in _items(value))


def _range(lo: float, hi: float):
    def parse(value: Any) -> tuple[float, float]:
        items = _items(value)
        if len(items) != 2:
            raise _Invalid("expected two numbers min,max")
        a, b = (_number(float)(v) for v in items)
        if not lo < a <= b <= hi:
            raise _Invalid(f"expected {lo} < min <= max <= {hi}")
        return a, b

    return parse


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "bands": _bands,
    "scale": _number(float, 0.0, lo_open=True),
    "offset": _number(float),
    "resolution": _number(float, 0.0, lo_open=True),
    "resampling": _choice(*RESAMPLING_METHODS),
    "gdal_cache_mb": _number(int, 1),
    "max_block_mb": _number(float, 0.0, lo_open=True),
    "max_raster_pixels": _number(int, 1),
    "max_compression_ratio": _number(float, 1.0),
    "cache": _bool,
    "cache_max_gb": _number(float, 0.0),
    "tile_size": _number(int, 8),
    "sampling": _choice("random", "grid"),
    "stride": _number(int, 1),
    "samples_per_epoch": _number(int, 0),
    "max_nodata": _probability,
    "max_tries": _number(int, 1),
    "stats_tiles": _number(int, 1),
    "temporal": _bool,
    "indices": _indices,
    "band_roles": _roles,
    "wavelengths": _floats,
    "flip": _bool,
    "crop_scale": _range(0.0, 1.0),
    "jitter_p": _probability,
    "brightness": _number(float, 0.0, 1.0),
    "contrast": _number(float, 0.0, 1.0),
    "haze_p": _probability,
    "haze_max": _number(float, 0.0, 1.0),
    "haze_exponent": _number(float, 0.0, 8.0),
    "noise_p": _probability,
    "noise_std": _number(float, 0.0, 1.0),
    "blur_p": _probability,
    "blur_sigma": _range(0.0, 16.0),
    "band_dropout": _number(float, 0.0, 0.9),
}
assert set(_PARSERS) == {f.name for f in fields(SatelliteOptions)}


def parse_options(options: Mapping[str, Any] | None) -> SatelliteOptions:
    """Validate ``DataConfig.options`` for the satellite domain.

    Raises DataError naming an unknown key, or the option and value that is wrong.
    """
    parsed: dict[str, Any] = {}
    for key, value in (options or {}).items():
        name = str(key).strip().replace("-", "_")
        if name not in _PARSERS:
            raise DataError(
                f"satellite data option {key!r} is unknown; known options: {', '.join(sorted(_PARSERS))}"
            )
        try:
            parsed[name] = _PARSERS[name](value)
        except _Invalid as why:
            raise DataError(f"satellite data option {key}={value!r}: {why}") from None
    return SatelliteOptions(**parsed)
