"""Satellite domain: multispectral rasters (Sentinel-2, Landsat, 4-band commercial) for MoCo.

Implements the data contract of :mod:`fedmoco.data` (``build_pretrain_data``,
``build_labelled_data``) over folders of GeoTIFFs or any GDAL format, read window by window.
See docs/satellite.md for the data options.
"""

from domains.satellite.dataset import build_labelled_data, build_pretrain_data
from domains.satellite.demo import make_demo_archive
from domains.satellite.groups import group_keys
from domains.satellite.reader import RasterReadError, read_tile

__all__ = ["RasterReadError", "build_labelled_data", "build_pretrain_data", "group_keys", "make_demo_archive",
           "read_tile"]
