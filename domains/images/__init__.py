"""Ordinary image folders (PNG, JPEG, TIFF; grayscale or RGB) with the MoCo v2 recipe.

This is the engine's generic domain: exported images, benchmarks, and anything that is
not DICOM or a multi-band raster.

Options (``DataConfig.options`` / ``--data-option key=value``):

``channels``: ``auto`` (default: 3 if any of the first 64 images is colour, else 1), 1 or 3.
``crop_scale_min``: lower bound of RandomResizedCrop's area scale, default 0.2 (MoCo v2).
"""

from __future__ import annotations

from domains.images.dataset import build_labelled_data, build_pretrain_data
from domains.images.demo import make_demo_images

__all__ = ["build_pretrain_data", "build_labelled_data", "make_demo_images"]
