"""Multispectral augmentations, each checked against what it must do to a known tensor."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from domains.satellite.augment import (
    AppendIndices,
    BandDropout,
    GaussianNoise,
    Haze,
    PerBandBrightnessContrast,
    RandomRot90,
    blur_kernel_size,
    eval_transform,
    pretrain_transform,
)
from domains.satellite.options import parse_options
from fedmoco.data import Normalization


def ramp(c: int = 4, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.arange(c * h * w, dtype=torch.float32).reshape(c, h, w) / (c * h * w)


def test_rot90_is_an_exact_permutation_and_hits_all_four_angles():
    x = ramp()
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        y = RandomRot90()(x)
        k = next(k for k in range(4) if torch.equal(y, torch.rot90(x, k, dims=(-2, -1))))
        seen.add(k)
        assert torch.equal(torch.sort(y.flatten())[0], torch.sort(x.flatten())[0])
    assert seen == {0, 1, 2, 3}


def test_brightness_is_independent_per_band_and_contrast_keeps_the_band_mean():
    x = ramp(6) + 0.1
    torch.manual_seed(1)
    y = PerBandBrightnessContrast(brightness=0.4, contrast=0.0)(x)
    ratios = (y / x).flatten(1)
    # one gain per band, constant over its pixels, within [0.6, 1.4], not all equal
    assert torch.allclose(ratios.min(1).values, ratios.max(1).values, rtol=1e-5)
    gains = ratios[:, 0]
    assert ((gains >= 0.6) & (gains <= 1.4)).all() and gains.std() > 0.01
    z = PerBandBrightnessContrast(brightness=0.0, contrast=0.4)(x)
    assert torch.allclose(z.mean(dim=(1, 2)), x.mean(dim=(1, 2)), atol=1e-6)
    spread = z.std(dim=(1, 2)) / x.std(dim=(1, 2))
    assert ((spread >= 0.6 - 1e-5) & (spread <= 1.4 + 1e-5)).all() and spread.std() > 0.01


def test_haze_is_an_additive_offset_strongest_in_blue():
    wavelengths = [490.0, 560.0, 665.0, 842.0, 2190.0]
    x = torch.full((5, 4, 4), 0.2)
    torch.manual_seed(2)
    y = Haze(wavelengths, max_strength=0.1, exponent=2.0)(x)
    offset = (y - x)[:, 0, 0]
    assert torch.allclose(y - x, offset.view(-1, 1, 1).expand_as(x))  # spatially uniform
    assert 0 < offset[0] <= 0.1
    expected = offset[0] * torch.tensor([(490.0 / w) ** 2 for w in wavelengths])
    assert torch.allclose(offset, expected, rtol=1e-5)
    assert (offset[:-1] > offset[1:]).all()  # decreasing with wavelength
    assert offset[3] / offset[0] == pytest.approx((490 / 842) ** 2, rel=1e-5)


def test_probability_zero_leaves_the_input_alone():
    x = ramp()
    for t in (PerBandBrightnessContrast(0.4, 0.4, p=0.0), Haze([490.0] * 4, 0.1, p=0.0), GaussianNoise(0.1, p=0.0)):
        assert torch.equal(t(x), x)


def test_noise_is_zero_mean_with_bounded_sigma():
    torch.manual_seed(3)
    x = torch.zeros(4, 64, 64)
    y = GaussianNoise(0.05)(x)
    assert abs(float(y.mean())) < 0.005 and 0 < float(y.std()) <= 0.05 * 1.05
    assert float(y.min()) < 0  # not clipped to [0, 1]


def test_band_dropout_zeroes_whole_bands_and_keeps_one():
    torch.manual_seed(4)
    x = torch.ones(13, 4, 4)
    dropped_any = False
    for _ in range(50):
        y = BandDropout(0.3)(x)
        per_band = y.flatten(1)
        assert ((per_band == 0).all(1) | (per_band == 1).all(1)).all()
        assert (per_band == 1).all(1).sum() >= 1
        dropped_any |= bool((per_band == 0).all(1).any())
    assert dropped_any
    assert (BandDropout(0.999)(torch.ones(3, 2, 2)).flatten(1) == 1).all(1).sum() == 1


def test_ndvi_and_ndwi_by_hand():
    # blue, green, red, nir
    x = torch.tensor([0.05, 0.1, 0.1, 0.4]).view(4, 1, 1).expand(4, 2, 2).clone()
    x[:, 1, 1] = 0.0  # filled nodata: zero denominator must not give NaN
    out = AppendIndices(["ndvi", "ndwi"], {"blue": 0, "green": 1, "red": 2, "nir": 3})(x)
    assert out.shape == (6, 2, 2)
    assert out[4, 0, 0] == pytest.approx((0.4 - 0.1) / (0.4 + 0.1))  # 0.6
    assert out[5, 0, 0] == pytest.approx((0.1 - 0.4) / (0.1 + 0.4))  # -0.6
    assert out[4, 1, 1] == 0 and out[5, 1, 1] == 0 and torch.isfinite(out).all()


def test_blur_kernel_covers_three_sigma():
    assert blur_kernel_size(1.0) == 7 and blur_kernel_size(2.0) == 13 and blur_kernel_size(0.3) == 3


@pytest.mark.parametrize("channels,indices", [(4, ""), (13, ""), (4, "ndvi,ndwi")])
def test_pretrain_pipeline_shapes_and_no_rgb_only_operations(channels, indices):
    opts = parse_options({"indices": indices} if indices else {})
    n_out = channels + len(opts.indices)
    norm = Normalization([0.1] * n_out, [0.05] * n_out)
    wavelengths = [490.0, 560.0, 665.0, 842.0] if channels == 4 else [443.0 + 100 * i for i in range(13)]
    roles = {"blue": 0, "green": 1, "red": 2, "nir": 3}
    t = pretrain_transform(opts, 32, norm, wavelengths, roles)
    names = {type(s).__name__ for s in t.transforms}
    assert not names & {"ColorJitter", "Grayscale", "RandomGrayscale", "RGB"}
    assert {"RandomResizedCrop", "RandomHorizontalFlip", "RandomVerticalFlip", "RandomRot90", "Haze"} <= names
    torch.manual_seed(5)
    tile = torch.rand(channels, 48, 48) * 0.3
    q, k = t(tile), t(tile)
    assert q.shape == k.shape == (n_out, 32, 32) and q.dtype == torch.float32
    assert not torch.equal(q, k)
    e = eval_transform(opts, 32, norm, roles)
    assert torch.equal(e(tile), e(tile)) and e(tile).shape == (n_out, 32, 32)


def test_eval_view_is_the_normalised_tile():
    opts = parse_options({})
    norm = Normalization([0.1, 0.2], [0.5, 0.25])
    tile = torch.tensor([0.6, 0.7]).view(2, 1, 1).expand(2, 16, 16)
    out = eval_transform(opts, 16, norm, {})(tile)
    assert torch.allclose(out[0], torch.full((16, 16), 1.0)) and torch.allclose(out[1], torch.full((16, 16), 2.0))


def test_blur_from_torchvision_works_on_13_channels():
    x = torch.zeros(13, 15, 15)
    x[:, 7, 7] = 1
    y = v2.GaussianBlur(7, sigma=1.0)(x)
    assert y.shape == x.shape and torch.allclose(y.sum(dim=(1, 2)), torch.ones(13), atol=1e-4)
    assert torch.allclose(y[0], y[12])
