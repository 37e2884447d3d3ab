"""Intensity windowing and anatomy-safe augmentations, built from MONAI dictionary transforms.

A sample entering a pipeline is ``{"image": (C, H, W) float32 in modality units,
"window": (centre, width) or None}``; ``None`` means "window by percentiles". The pipeline
windows to [0, 1] first, then augments, then clips to [0, 1]; :class:`ViewPipeline`
normalises the result and returns a tensor. Defaults and their reasons: docs/medical.md.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Hashable, Iterator, Mapping

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    CenterSpatialCrop,
    Compose,
    MapTransform,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandomizableTransform,
    RandRotated,
    RandScaleCropd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRanged,
)

from fedmoco.data import Normalization, one_thread

from .base import (  # noqa: F401  (re-exported: the base helpers lived here)
    BASE_OPTIONS,
    BASE_WINDOW,
    FIXED,
    IMAGE,
    JITTERED,
    WINDOW,
    base_size,
    from_base,
    percentile_window,
    to_base,
    window_reach,
)
from .options import MedicalOptions


class RandWindowd(RandomizableTransform, MapTransform):
    """Map modality values to [0, 1] through a window, with optional level/width jitter.

    MONAI has the window (``ScaleIntensityRange``) and the percentile mapping
    (``ScaleIntensityRangePercentiles``) but nothing that jitters a window per sample, and the
    window differs per sample (CT preset, the file's own, percentiles), so this transform reads
    it from ``data["window"]`` and delegates the mapping to ``ScaleIntensityRange``.

    ``level_jitter`` shifts the centre by ``U(-j, j) * width``; ``width_jitter`` scales the
    width by ``1 + U(-j, j)``. Percentile windows are never jittered, nor is a window given
    as ``(centre, width, False)`` (a cached base already windowed by percentiles).
    """

    def __init__(
        self,
        keys: str = IMAGE,
        window_key: str = WINDOW,
        percentiles: tuple[float, float] = (0.5, 99.5),
        level_jitter: float = 0.0,
        width_jitter: float = 0.0,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.window_key = window_key
        self.percentiles = percentiles
        self.level_jitter = level_jitter
        self.width_jitter = width_jitter
        self._level_u = 0.0
        self._width_u = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._level_u = self.R.uniform(-1.0, 1.0)
        self._width_u = self.R.uniform(-1.0, 1.0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        window = d.pop(self.window_key, None)
        if self.level_jitter or self.width_jitter:
            self.randomize()
        for key in self.key_iterator(d):
            if window is None:
                lo, hi = percentile_window(d[key], self.percentiles)
                scale = ScaleIntensityRange(lo, hi, b_min=0.0, b_max=1.0, clip=True)
            else:
                centre, width = float(window[0]), float(window[1])
                if len(window) < 3 or window[2]:
                    centre += self.level_jitter * self._level_u * width
                    width *= 1.0 + self.width_jitter * self._width_u
                scale = ScaleIntensityRange(
                    centre - width / 2, centre + width / 2, b_min=0.0, b_max=1.0, clip=True
                )
            d[key] = scale(d[key])
        return d


class AdaptiveResized(MapTransform):
    """Resize to a fixed size with "area" when shrinking and "bilinear" when enlarging.

    Area averaging is the anti-aliasing: MONAI's ``anti_aliasing=True`` Gaussian costs
    10-200 ms per call here because every random crop size builds a new convolution
    primitive, which made the resize the bottleneck of the whole pipeline.
    """

    def __init__(self, keys: Any, size: int) -> None:
        super().__init__(keys)
        self.shrink = Resize((size, size), mode="area")
        self.enlarge = Resize((size, size), mode="bilinear")
        self.size = size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            h, w = d[key].shape[-2:]
            d[key] = (self.shrink if h >= self.size and w >= self.size else self.enlarge)(d[key])
        return d


class SquareCentreCropd(MapTransform):
    """Crop the largest centred square (MONAI's CenterSpatialCrop needs a fixed size)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            side = min(d[key].shape[-2:])
            d[key] = CenterSpatialCrop((side, side))(d[key])
        return d


def pretrain_pipeline(opts: MedicalOptions, image_size: int) -> Compose:
    """The random view: window (jittered) -> crop -> resize -> geometry -> exposure -> clip.

    Output ``image`` is (C, image_size, image_size) in [0, 1].
    """
    k = [IMAGE]
    side = math.sqrt(opts.crop_scale)  # RandScaleCrop scales each side; area >= crop_scale
    spatial = [
        RandWindowd(
            percentiles=opts.percentiles,
            level_jitter=opts.window_level_jitter,
            width_jitter=opts.window_width_jitter,
        ),
        RandScaleCropd(k, roi_scale=side, max_roi_scale=1.0, random_size=True),
        AdaptiveResized(k, image_size),
        # spatial_axis=1 is the column axis of (C, H, W): horizontal only, never vertical.
        RandFlipd(k, prob=opts.flip_prob, spatial_axis=1),
    ]
    if opts.rotate_deg > 0 and opts.rotate_prob > 0:
        spatial.append(
            RandRotated(k, range_x=math.radians(opts.rotate_deg), prob=opts.rotate_prob,
                        keep_size=True, padding_mode="zeros")
        )
    if opts.elastic_prob > 0:
        spacing = max(2.0, opts.elastic_spacing * image_size)
        spatial.append(
            Rand2DElasticd(k, spacing=(spacing, spacing), magnitude_range=opts.elastic_magnitude,
                           prob=opts.elastic_prob, padding_mode="zeros")
        )
    intensity = [
        RandScaleIntensityd(k, factors=opts.intensity_scale, prob=opts.intensity_prob),
        RandShiftIntensityd(k, offsets=opts.intensity_shift, prob=opts.intensity_prob),
        RandAdjustContrastd(k, gamma=opts.gamma, prob=opts.gamma_prob),
        RandGaussianSmoothd(k, sigma_x=opts.smooth_sigma, sigma_y=opts.smooth_sigma, prob=opts.smooth_prob),
        RandGaussianNoised(k, std=opts.noise_std, prob=opts.noise_prob),
        ScaleIntensityRanged(k, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ]
    return Compose(spatial + intensity)


def eval_pipeline(opts: MedicalOptions, image_size: int) -> Compose:
    """The deterministic view: window (no jitter) -> centre square -> resize. [0, 1] output."""
    k = [IMAGE]
    return Compose([
        RandWindowd(percentiles=opts.percentiles),
        SquareCentreCropd(k),
        AdaptiveResized(k, image_size),
    ])


@contextlib.contextmanager
def _plain_tensors() -> Iterator[None]:
    """Skip MONAI's MetaTensor bookkeeping (half the pipeline's time; we keep no metadata)."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


class ViewPipeline:
    """sample dict -> normalised float32 tensor (C, S, S). Picklable (DataLoader workers)."""

    def __init__(self, compose: Compose, normalization: Normalization) -> None:
        self.compose = compose
        self.normalization = normalization
        # One RandomState shared by every random transform, reseeded in place: the datasets
        # reseed per sample, and Compose.set_random_state builds a new RandomState per
        # transform (2 ms per sample; an in-place reseed costs microseconds).
        self._random = np.random.RandomState(0)
        for transform in compose.transforms:
            if isinstance(transform, Randomizable):
                transform.set_random_state(state=self._random)

    def set_random_state(self, seed: int) -> None:
        self._random.seed(seed % (2**32))

    def __call__(self, sample: Mapping[str, Any]) -> torch.Tensor:
        with _plain_tensors(), one_thread():
            image = self.compose(dict(sample))[IMAGE]
        image = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        return self.normalization.apply(image.to(torch.float32).contiguous())
