"""Satellite domain: multispectral rasters (Sentinel-2, Landsat, 4-band commercial) for MoCo.

Implements the data contract of :mod:`fedmoco.data` (``build_pretrain_data``,
``build_labelled_data``) over folders of GeoTIFFs or any GDAL format, read window by window.
See docs/satellite.md for the data options.
"""

from domains import lazy_exports

# Loaded on first use (PEP 562): every federated round is a fresh process, and a site pays
# only for the submodules it touches (torchvision's per-sample transforms are not needed to
# train from the cache with batched views).
_WHERE = {
    "build_labelled_data": "domains.satellite.dataset", "build_pretrain_data": "domains.satellite.dataset",
    "make_demo_archive": "domains.satellite.demo", "group_keys": "domains.satellite.groups",
    "RasterReadError": "domains.satellite.reader", "read_tile": "domains.satellite.reader",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

__all__ = ["RasterReadError", "build_labelled_data", "build_pretrain_data", "group_keys", "make_demo_archive",
           "read_tile"]
