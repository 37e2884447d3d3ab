"""The scene of a raster, for grouped splits: acquisitions of one footprint stay together.

Two dates of the same tile (or the band files of one product) show the same ground; a split
that puts one in train and the other in test measures memory of a place, not land cover.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from domains.satellite.reader import RasterReadError, open_raster
from fedmoco.labels import hash_group


def group_keys(paths: Sequence[Path], salt: bytes) -> list[str | None]:
    """Per file, a salted BLAKE2b hash (hex) of its footprint: CRS and bounds on the file's
    pixel grid (each bound divided by the pixel size, rounded). In pixels rather than CRS
    units, so that a geographic CRS, whose unit is a degree, does not merge every file within
    one degree into a group. None for a file without georeference (its own file is its group)
    or one that does not open."""
    out: list[str | None] = []
    for path in paths:
        try:
            with open_raster(path) as src:
                if src.crs is None:
                    out.append(None)
                    continue
                xres, yres = (abs(r) or 1.0 for r in src.res)
                left, bottom, right, top = src.bounds
                bounds = (round(left / xres), round(bottom / yres), round(right / xres), round(top / yres))
                key = f"{src.crs.to_string()}|{bounds}"
        except (RasterReadError, OSError):
            out.append(None)
            continue
        out.append(hash_group(key, salt))
    return out


group_keys.source = "scene"  # type: ignore[attr-defined]  # what fedmoco reports as the group kind
