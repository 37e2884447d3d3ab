"""Augmentations for multispectral tiles: small composable transforms on (C, H, W) tensors.

Geometric operations and blur come from torchvision.transforms.v2, which handles any channel
count; it is imported where a pipeline is built, because importing torchvision loads its models
and torch._dynamo (2-4 s), which a site making its views per batch (fedmoco.gpu_augment) never needs. The radiometric ones are hand-written because torchvision's are RGB-only (ColorJitter
mixes channels through hue/saturation, Grayscale assumes RGB weights): here brightness and
contrast are drawn per band, haze follows the wavelength of each band, and band dropout acts
on whole channels. All randomness comes from torch's generator, which DataLoader seeds per
worker.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from domains.satellite.options import SatelliteOptions
from fedmoco.data import Normalization

# Haze is stated at this wavelength (nm, Sentinel-2 B02 blue) and scaled to the others.
HAZE_REFERENCE_NM = 490.0
# A zero denominator (both bands 0, e.g. filled nodata) must not give NaN.
_INDEX_EPS = 1e-6


def _coin(p: float) -> bool:
    return p > 0 and (p >= 1 or float(torch.rand(())) < p)


class RandomRot90(nn.Module):
    """Rotate by k * 90 degrees, k uniform in {0, 1, 2, 3}.

    Overhead imagery has no canonical up. Multiples of 90 degrees are exact pixel permutations,
    unlike v2.RandomRotation, which interpolates and leaves empty corners.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()))
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


class PerBandBrightnessContrast(nn.Module):
    """Multiply each band by its own gain and stretch it about its own mean, with prob ``p``.

    Gains are uniform in [1 - brightness, 1 + brightness] and contrast factors in
    [1 - contrast, 1 + contrast], drawn independently per band: sensors, sun angle and
    atmosphere change bands differently, which an RGB ColorJitter cannot express.
    Input (C, H, W) in reflectance.
    """

    def __init__(self, brightness: float, contrast: float, p: float = 1.0) -> None:
        super().__init__()
        self.brightness, self.contrast, self.p = brightness, contrast, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _coin(self.p):
            return x
        c = x.shape[-3]
        gain = 1 + (torch.rand(c, 1, 1) * 2 - 1) * self.brightness
        stretch = 1 + (torch.rand(c, 1, 1) * 2 - 1) * self.contrast
        mean = x.mean(dim=(-2, -1), keepdim=True)
        return ((x - mean) * stretch + mean) * gain


class Haze(nn.Module):
    """Add a path-radiance offset that is strongest in the blue bands, with prob ``p``.

    offset_b = s * (490 nm / wavelength_b) ** exponent, s uniform in [0, max_strength]
    (reflectance units at 490 nm). The exponent sits between aerosol (~1.3) and Rayleigh (4)
    scattering. Input (C, H, W) in reflectance; ``wavelengths`` in nm, one per channel.
    """

    def __init__(self, wavelengths: Sequence[float], max_strength: float, exponent: float = 2.0, p: float = 1.0):
        super().__init__()
        weights = torch.tensor([(HAZE_REFERENCE_NM / w) ** exponent for w in wavelengths], dtype=torch.float32)
        self.register_buffer("weights", weights.view(-1, 1, 1))
        self.max_strength, self.p = max_strength, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _coin(self.p):
            return x
        return x + float(torch.rand(())) * self.max_strength * self.weights.to(x.dtype)


class GaussianNoise(nn.Module):
    """Add zero-mean Gaussian noise, sigma uniform in [0, max_std], with prob ``p``.

    Hand-written because v2.GaussianNoise clips to [0, 1], which would cut valid reflectances
    above 1 (snow, specular glint) and negative offsets.
    """

    def __init__(self, max_std: float, p: float = 1.0) -> None:
        super().__init__()
        self.max_std, self.p = max_std, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _coin(self.p):
            return x
        return x + torch.randn_like(x) * (float(torch.rand(())) * self.max_std)


class AppendIndices(nn.Module):
    """Append normalised-difference indices as extra channels: (C, H, W) -> (C + n, H, W).

    ``roles`` maps blue/green/red/nir to channel positions. NDVI = (nir - red) / (nir + red);
    NDWI (McFeeters) = (green - nir) / (green + nir). Values are clamped to [-1, 1], since
    negative reflectances (offsets, noise) can push the ratio outside.
    """

    NEEDS = {"ndvi": ("nir", "red"), "ndwi": ("green", "nir")}

    def __init__(self, indices: Sequence[str], roles: Mapping[str, int]) -> None:
        super().__init__()
        self.pairs = [tuple(roles[r] for r in self.NEEDS[name]) for name in indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pairs:
            return x
        extra = []
        for a, b in self.pairs:
            xa, xb = x[..., a, :, :], x[..., b, :, :]
            denom = xa + xb
            denom = torch.where(denom.abs() < _INDEX_EPS, torch.full_like(denom, _INDEX_EPS), denom)
            extra.append(((xa - xb) / denom).clamp(-1, 1))
        return torch.cat([x, torch.stack(extra, dim=-3)], dim=-3)


class BandDropout(nn.Module):
    """Zero each channel with probability ``p``, always keeping at least one.

    Applied after normalisation, so a dropped band reads as its mean. It keeps the encoder
    from leaning on a single band that a site may lack or have saturated.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0:
            return x
        c = x.shape[-3]
        drop = torch.rand(c) < self.p
        if bool(drop.all()):
            drop[int(torch.randint(0, c, ()))] = False
        if not bool(drop.any()):
            return x
        return x * (~drop).to(x.dtype).view(-1, 1, 1)


def blur_kernel_size(sigma_max: float) -> int:
    """Odd kernel covering +-3 sigma of the widest blur."""
    return 2 * math.ceil(3 * sigma_max) + 1


def pretrain_transform(
    opts: SatelliteOptions,
    image_size: int,
    normalization: Normalization,
    wavelengths: Sequence[float] | None,
    roles: Mapping[str, int],
) -> v2.Compose:
    """The random view: reflectance tile (bands, h, w) -> normalised (C, image_size, image_size).

    Geometry first, then radiometry in reflectance units (where haze and noise have physical
    sizes), then indices, normalisation and band dropout. Haze is left out when
    ``wavelengths`` is None.
    """
    from torchvision.transforms import v2

    steps: list[nn.Module] = [v2.RandomResizedCrop(image_size, scale=opts.crop_scale, antialias=True)]
    if opts.flip:  # overhead views have no preferred orientation, unless option flip=false says so
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()]
    steps.append(PerBandBrightnessContrast(opts.brightness, opts.contrast, p=opts.jitter_p))
    if wavelengths is not None and opts.haze_p > 0 and opts.haze_max > 0:
        steps.append(Haze(wavelengths, opts.haze_max, opts.haze_exponent, p=opts.haze_p))
    if opts.blur_p > 0:
        kernel = min(blur_kernel_size(opts.blur_sigma[1]), image_size - 1 + image_size % 2)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=opts.blur_sigma)], p=opts.blur_p))
    if opts.noise_p > 0 and opts.noise_std > 0:
        steps.append(GaussianNoise(opts.noise_std, p=opts.noise_p))
    steps += [
        AppendIndices(opts.indices, roles),
        v2.Normalize(normalization.mean, normalization.std),
        BandDropout(opts.band_dropout),
    ]
    return v2.Compose(steps)


def eval_transform(
    opts: SatelliteOptions, image_size: int, normalization: Normalization, roles: Mapping[str, int]
) -> v2.Compose:
    """The deterministic view: reflectance tile -> normalised (C, image_size, image_size)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            AppendIndices(opts.indices, roles),
            v2.Normalize(normalization.mean, normalization.std),
        ]
    )
