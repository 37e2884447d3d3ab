"""Data options: command-line strings and native values parse; bad ones name option and value."""

from __future__ import annotations

import re

import pytest

from domains.satellite.options import SatelliteOptions, parse_options
from fedmoco.cli import parse_options as cli_parse_options
from fedmoco.errors import DataError


def test_defaults():
    opts = parse_options({})
    assert opts == SatelliteOptions()
    assert opts.tile(64) == 64 and opts.grid_stride(64) == 64
    assert (opts.sampling, opts.max_nodata, opts.gdal_cache_mb, opts.crop_scale) == ("random", 0.1, 64, (0.2, 1.0))


def test_command_line_values_as_the_cli_passes_them():
    # fedmoco.cli turns "1,2,3" into a tuple and "true" stays a string: both must work.
    raw = cli_parse_options(
        [
            "bands=B02,b03,B04,B08",
            "tile_size=96",
            "sampling=grid",
            "stride=48",
            "max_nodata=0.25",
            "temporal=true",
            "indices=ndvi,ndwi",
            "band_roles=red=B04,nir=B08",
            "crop_scale=0.5,1.0",
            "wavelengths=490,560,665,842",
            "resampling=nearest",
        ]
    )
    opts = parse_options(raw)
    assert opts.bands == ("B02", "b03", "B04", "B08")
    assert (opts.tile_size, opts.sampling, opts.stride, opts.max_nodata, opts.temporal) == (96, "grid", 48, 0.25, True)
    assert opts.indices == ("ndvi", "ndwi") and opts.band_roles == {"red": "B04", "nir": "B08"}
    assert opts.crop_scale == (0.5, 1.0) and opts.wavelengths == (490.0, 560.0, 665.0, 842.0)
    assert parse_options(cli_parse_options(["bands=1,2,3"])).bands == (1, 2, 3)
    assert parse_options(cli_parse_options(["bands=4"])).bands == (4,)


def test_native_values_from_a_node_config():
    opts = parse_options({"bands": [2, 3, 4, 8], "temporal": False, "max-nodata": 0.0, "blur_sigma": (0.5, 2)})
    assert opts.bands == (2, 3, 4, 8) and opts.temporal is False and opts.max_nodata == 0.0
    assert opts.blur_sigma == (0.5, 2.0)


def test_unknown_key_is_named():
    with pytest.raises(DataError, match=r"satellite data option 'tilesize' is unknown; known options: .*tile_size"):
        parse_options({"tilesize": 64})


@pytest.mark.parametrize(
    "key,value,why",
    [
        ("tile_size", "big", "expected an integer"),
        ("tile_size", 4, "must be >= 8"),
        ("tile_size", 1.5, "expected an integer"),
        ("sampling", "sliding", "choose one of random, grid"),
        ("max_nodata", 1.5, "must be <= 1.0"),
        ("max_nodata", -0.1, "must be >= 0.0"),
        ("scale", 0, "must be > 0.0"),
        ("bands", "0,1", "band indices start at 1"),
        ("bands", "B02,B02", "a band is selected twice"),
        ("bands", "", "expected band indices"),
        ("indices", "evi", "unknown index 'evi'"),
        ("band_roles", "swir=B11", "expected role=band pairs"),
        ("crop_scale", "0.8,0.2", "expected 0.0 < min <= max <= 1.0"),
        ("crop_scale", "0.5", "expected two numbers min,max"),
        ("temporal", "maybe", "expected true or false"),
        ("resampling", "magic", "choose one of nearest"),
        ("gdal_cache_mb", 0, "must be >= 1"),
        ("wavelengths", "490,-1", "must be > 0.0"),
        ("jitter_p", True, "expected a number"),
        # inf passed, and made every file "all nodata" (scale) or every value inf (offset)
        ("scale", "inf", "expected a finite number"),
        ("offset", "-inf", "expected a finite number"),
    ],
)
def test_bad_value_names_option_and_value(key, value, why):
    with pytest.raises(DataError) as err:
        parse_options({key: value})
    assert str(err.value).startswith(f"satellite data option {key}={value!r}: ")
    assert re.search(re.escape(why), str(err.value))
