"""Ordinary image folders (PNG, JPEG, TIFF; grayscale or RGB) with the MoCo v2 recipe.

This is the engine's generic domain: exported images, benchmarks, and anything that is
not DICOM or a multi-band raster.

Options (``DataConfig.options`` / ``--data-option key=value``):

``channels``: ``auto`` (default: 3 if any of the first 64 images is colour, else 1), 1 or 3.
``crop_scale_min``: lower bound of RandomResizedCrop's area scale, default 0.2 (MoCo v2).
``flip``: random horizontal flip, default true; ``flip=false`` for text, laterality markers
or any class that a mirror image changes.
``offset`` / ``ramp`` / ``noise``: shortcut-resistant intensity nuisance per view, in [0, 1]
of full scale (defaults 0.2 / 0.3 / 0.05; 0 turns each off): a random additive offset, a
linear ramp in a random direction and Gaussian pixel noise, each applied with p = 0.8, so
the two views of an image cannot be matched by background level, illumination gradient or
noise grain (``IntensityNuisance``; the effect is measured in docs/benchmarks.md).
``max_pixels``: width x height a file's header may declare, checked before anything is
decoded, default 2**25 (33.5 M, as for DICOM frames). A larger file is skipped and counted
like an unreadable one: a 700-byte PNG may claim 65535 x 65535 pixels (4.3 G), which PIL
would try to allocate (its own bomb check stops only beyond 179 M). ``fedmoco check-site``
counts such files by reason from their headers.
"""

from __future__ import annotations

from domains.images.dataset import build_labelled_data, build_pretrain_data
from domains.images.demo import make_demo_images

__all__ = ["build_pretrain_data", "build_labelled_data", "make_demo_images"]
