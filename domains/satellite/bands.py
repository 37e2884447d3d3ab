"""What the satellite domain knows about spectral bands: names, wavelengths, roles.

Only well-established sensor facts live here (Sentinel-2 MSI band centres, the usual order
of 4-band commercial products); everything else is configurable through data options.
"""

from __future__ import annotations

import re
from typing import Sequence

# Sentinel-2 MSI: name -> (central wavelength in nm, native resolution in m). The order of
# this dict is the order of the 13 bands in a stacked L1C product (B8A after B08).
SENTINEL2: dict[str, tuple[float, int]] = {
    "B01": (443.0, 60),
    "B02": (490.0, 10),
    "B03": (560.0, 10),
    "B04": (665.0, 10),
    "B05": (705.0, 20),
    "B06": (740.0, 20),
    "B07": (783.0, 20),
    "B08": (842.0, 10),
    "B8A": (865.0, 20),
    "B09": (945.0, 60),
    "B10": (1375.0, 60),
    "B11": (1610.0, 20),
    "B12": (2190.0, 20),
}
SENTINEL2_ORDER: list[str] = list(SENTINEL2)

# Commercial 4-band products (PlanetScope, SPOT, Pleiades multispectral) in the order most of
# them ship: blue, green, red, near infrared. Wavelengths are the Sentinel-2 equivalents.
ROLE_WAVELENGTHS: dict[str, float] = {"blue": 490.0, "green": 560.0, "red": 665.0, "nir": 842.0}
FOUR_BAND_ORDER: list[str] = ["blue", "green", "red", "nir"]

# The band each role means in a Sentinel-2 product.
SENTINEL2_ROLES: dict[str, str] = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08"}

# Aliases met in band descriptions of commercial products.
_ROLE_ALIASES: dict[str, str] = {
    "blue": "blue",
    "b": "blue",
    "green": "green",
    "g": "green",
    "red": "red",
    "r": "red",
    "nir": "nir",
    "near-infrared": "nir",
    "near infrared": "nir",
    "nearinfrared": "nir",
}

# A file holding one band of a product: <scene>_B04.jp2, <scene>_B8A_20m.tif, LC08_..._SR_B4.TIF.
BAND_FILE_RE = re.compile(
    r"^(?P<scene>.+?)[_\-.](?P<band>B(?:0[1-9]|1[0-2]|[1-9]|8A))(?:[_\-](?P<res>\d+)m)?$",
    re.IGNORECASE,
)
# Resolution sub-folders of a Sentinel-2 L2A product (IMG_DATA/R10m, R20m, R60m): band files of
# one scene are spread over them, so they are grouped as if they were in the parent folder.
RESOLUTION_DIR_RE = re.compile(r"^R\d+m$", re.IGNORECASE)


def band_sort_key(name: str) -> tuple[int, int]:
    """Order band names numerically with B8A right after B08 (``B2`` and ``B02`` are equal)."""
    m = re.fullmatch(r"B(\d+)(A?)", name.upper())
    if m is None:
        return (10_000, 0)
    return (int(m.group(1)), 1 if m.group(2) else 0)


def role_of(name: str | None) -> str | None:
    """The role (blue/green/red/nir) a band description names, or None."""
    if not name:
        return None
    return _ROLE_ALIASES.get(name.strip().lower())


def wavelength_of(name: str | None) -> float | None:
    """Central wavelength (nm) for a Sentinel-2 band name or a role name, else None."""
    if not name:
        return None
    if _is_sentinel2_name(name):
        return SENTINEL2[name.strip().upper()][0]
    role = role_of(name)
    return ROLE_WAVELENGTHS[role] if role else None


def _is_sentinel2_name(name: str) -> bool:
    # Only two-digit names are taken as Sentinel-2: Landsat writes B4, B5 for bands with other
    # wavelengths, so a bare B5 is not guessed.
    return name.strip().upper() in SENTINEL2


def default_names(count: int) -> list[str] | None:
    """Names assumed for an undescribed file with ``count`` bands (13: Sentinel-2; 4: BGRN)."""
    if count == 13:
        return list(SENTINEL2_ORDER)
    if count == 4:
        return list(FOUR_BAND_ORDER)
    return None


def infer_wavelengths(names: Sequence[str | None]) -> list[float] | None:
    """Wavelengths (nm) for the selected bands, or None when any band is unknown."""
    out = [wavelength_of(n) for n in names]
    if any(w is None for w in out):
        return None
    return [float(w) for w in out]  # type: ignore[arg-type]


def infer_roles(names: Sequence[str | None]) -> dict[str, int]:
    """Map role -> position among the selected bands, from Sentinel-2 names or role names."""
    roles: dict[str, int] = {}
    for pos, name in enumerate(names):
        if not name:
            continue
        role = role_of(name)
        if role is None and _is_sentinel2_name(name):
            role = next((r for r, b in SENTINEL2_ROLES.items() if b == name.strip().upper()), None)
        if role is not None and role not in roles:
            roles[role] = pos
    return roles
