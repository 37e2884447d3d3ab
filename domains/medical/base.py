"""Cached medical bases and percentile windows, without MONAI.

A *base* is a sample windowed to window units and resized once (fedmoco.cache); the batched
views (fedmoco.gpu_augment) start from it. Kept apart from :mod:`.transforms` because MONAI's
package import loads all of MONAI (networks, torchvision, scipy, scikit-learn: 3-7 s), which
a site that makes its views per batch never needs: every federated round is a fresh process.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from .options import MedicalOptions

IMAGE = "image"
WINDOW = "window"


def percentile_window(image: Any, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(low, high) percentiles of ``image`` over all channels, from at most ~65k pixels.

    ``ScaleIntensityRangePercentiles`` sorts every pixel (torch.quantile): 10 ms for a
    512x512 slice. A regular 1-in-k grid subsample gives the same 0.5/99.5 percentiles to
    within a grey level or so at a tenth of the cost.
    """
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    step = max(1, math.ceil(math.sqrt(arr[0].size / 65536)))
    sub = arr[..., ::step, ::step]
    lo, hi = np.percentile(sub, percentiles)
    if not hi > lo:  # a constant image: any non-empty range maps it to 0
        hi = lo + 1.0
    return float(lo), float(hi)


# -- cached bases (fedmoco.cache) ---------------------------------------------------------
# A base is the sample windowed to *window units*: t = (x - (centre - width / 2)) / width, so
# the nominal window is [0, 1] and a jittered window is an affine map of t. Values are kept
# over the range any jittered window can reach (window_reach), so jitter sees exactly what it
# would see in modality units. Percentile windows are applied in full (never jittered).
JITTERED, FIXED = 1, 2  # cache tags
BASE_WINDOW = (0.5, 1.0)  # the nominal window in window units
# Options that shape a base; a change rebuilds the cache. The rest are augmentations.
BASE_OPTIONS = ("modalities", "slices", "channels", "ct_window", "window", "percentiles", "crop_scale",
                "window_level_jitter", "window_width_jitter")


def base_size(opts: MedicalOptions, image_size: int) -> int:
    """Side of a cached base: the smallest crop (``crop_scale`` of the area) still spans
    ``image_size`` pixels, so the views are never upsampled from the cache."""
    return int(math.ceil(image_size / math.sqrt(opts.crop_scale)))


def window_reach(opts: MedicalOptions) -> tuple[float, float]:
    """(low, high) in window units that the most extreme jittered window can map to [0, 1]."""
    half = (1.0 + opts.window_width_jitter) / 2
    return 0.5 - opts.window_level_jitter - half, 0.5 + opts.window_level_jitter + half


def to_base(sample: Mapping[str, Any], opts: MedicalOptions, size: int) -> tuple[np.ndarray, int]:
    """A loaded sample -> (float16 (C, size, size) in window units, tag JITTERED or FIXED)."""
    image = torch.as_tensor(sample[IMAGE], dtype=torch.float32)
    window = sample.get(WINDOW)
    if window is None:
        lo, hi = percentile_window(image, opts.percentiles)
        t, tag = ((image - lo) / (hi - lo)).clamp(0.0, 1.0), FIXED
    else:
        centre, width = float(window[0]), float(window[1])
        reach = window_reach(opts)
        t, tag = ((image - (centre - width / 2)) / width).clamp(*reach), JITTERED
    h, w = t.shape[-2:]
    mode = "area" if h >= size and w >= size else "bilinear"
    t = torch.nn.functional.interpolate(t[None], size=(size, size), mode=mode,
                                        **({"align_corners": False} if mode == "bilinear" else {}))[0]
    return t.to(torch.float16).numpy(), tag


def from_base(base: np.ndarray, tag: int) -> dict[str, Any]:
    """The sample dict the pipelines expect, from a cached base."""
    window = BASE_WINDOW if tag == JITTERED else (*BASE_WINDOW, False)
    return {IMAGE: torch.from_numpy(np.asarray(base, dtype=np.float32)), WINDOW: window}
