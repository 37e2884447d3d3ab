"""Windowing numbers, augmentation bounds and option validation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Rand2DElasticd, RandRotated, RandScaleCropd

from domains.medical.options import CT_PRESETS, MedicalOptions
from domains.medical.transforms import (
    RandWindowd,
    ViewPipeline,
    eval_pipeline,
    percentile_window,
    pretrain_pipeline,
)
from fedmoco.data import Normalization
from fedmoco.errors import DataError

DOCS = Path(__file__).resolve().parents[3] / "docs" / "medical.md"
QUIET = {"flip_prob": 0, "rotate_deg": 0, "crop_scale": 1.0, "window_level_jitter": 0,
         "window_width_jitter": 0, "intensity_prob": 0, "gamma_prob": 0, "noise_prob": 0,
         "smooth_prob": 0}
UNIT = Normalization([0.0], [1.0])  # leave [0, 1] values as they are


def hu(values, size=8) -> torch.Tensor:
    row = torch.tensor(values, dtype=torch.float32)
    return row.repeat(size, 1)[None]  # (1, size, len(values))


def test_ct_soft_tissue_window_by_hand():
    out = RandWindowd()({"image": hu([-160, 40, 240, 1000, -1000]), "window": CT_PRESETS["soft_tissue"]})
    # window 40 +- 200 HU: (HU + 160) / 400, clipped
    assert out["image"][0, 0].tolist() == [0.0, 0.5, 1.0, 1.0, 0.0]
    assert "window" not in out


def test_lung_window_by_hand():
    out = RandWindowd()({"image": hu([-1350, -600, 150]), "window": CT_PRESETS["lung"]})
    assert out["image"][0, 0].tolist() == [0.0, 0.5, 1.0]


def test_window_jitter_stays_within_its_bounds():
    t = RandWindowd(level_jitter=0.1, width_jitter=0.2)
    t.set_random_state(0)
    values = [float(t({"image": hu([40.0]), "window": (40.0, 400.0)})["image"][0, 0, 0]) for _ in range(300)]
    # centre 40 +- 40 HU, width 400 * (1 +- 0.2): HU 40 maps into [120/320, 200/320]
    assert min(values) >= 0.375 - 1e-6 and max(values) <= 0.625 + 1e-6
    assert max(values) - min(values) > 0.15  # it does jitter


def test_a_window_marked_false_is_never_jittered():
    """(centre, width, False) marks a cached base already windowed by percentiles: jitter
    would window it twice. BASE_WINDOW (0.5, 1.0) then only clamps to [0, 1], whatever the draw."""
    t = RandWindowd(level_jitter=0.2, width_jitter=0.2)
    t.set_random_state(0)
    image = hu([-0.2, 0.0, 0.25, 0.5, 0.9, 1.3])
    for _ in range(5):
        out = t({"image": image, "window": (0.5, 1.0, False)})["image"]
        assert out[0, 0].tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.9, 1.0], abs=1e-6)


def test_percentile_window_by_hand():
    image = torch.arange(10000, dtype=torch.float32).reshape(1, 100, 100)
    lo, hi = percentile_window(image, (0.5, 99.5))
    assert (lo, hi) == pytest.approx((49.995, 9949.005))
    out = RandWindowd(percentiles=(0.5, 99.5))({"image": image, "window": None})["image"]
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert float(out[0, 50, 0]) == pytest.approx((5000 - 49.995) / (9949.005 - 49.995), abs=1e-6)
    # a constant image does not divide by zero
    assert percentile_window(torch.full((1, 4, 4), 7.0), (1, 99)) == (7.0, 8.0)


def test_percentiles_on_a_large_image_use_a_subsample_close_to_the_exact_value():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (1, 1024, 1024)).astype(np.float32)
    exact = np.percentile(image, [0.5, 99.5])
    np.testing.assert_allclose(percentile_window(image, (0.5, 99.5)), exact, atol=1.5)


def run(opts: dict, image: torch.Tensor, window=(40.0, 400.0), size=None, seed=0) -> torch.Tensor:
    o = MedicalOptions.parse({**QUIET, **opts})
    p = ViewPipeline(pretrain_pipeline(o, size or image.shape[-1]), UNIT)
    p.set_random_state(seed)
    return p({"image": image, "window": window})


def test_flip_is_horizontal_only():
    image = torch.zeros(1, 16, 16)
    image[0, 2, 3] = 40.0  # one bright pixel (0.5 after the window), everything else -> 0.4
    expected = RandWindowd()({"image": image, "window": (40.0, 400.0)})["image"]
    for seed in range(10):
        out = run({"flip_prob": 1.0}, image, seed=seed)
        torch.testing.assert_close(out, torch.flip(expected, dims=[-1]))


def test_crop_keeps_at_least_crop_scale_of_the_area():
    crop = next(t for t in pretrain_pipeline(MedicalOptions.parse({"crop_scale": 0.5}), 32).transforms
                if isinstance(t, RandScaleCropd))
    crop.set_random_state(0)
    areas = [crop({"image": torch.zeros(1, 100, 100)})["image"].shape[-2:].numel() for _ in range(200)]
    assert min(areas) >= 0.5 * 100 * 100 - 150  # each side >= sqrt(0.5), rounded to pixels
    assert max(areas) > 0.9 * 100 * 100


def test_rotation_range_and_elastic_option():
    transforms = pretrain_pipeline(MedicalOptions.parse({"elastic_prob": 0.5}), 32).transforms
    rotate = next(t for t in transforms if isinstance(t, RandRotated))
    assert rotate.rand_rotate.range_x == pytest.approx((-math.radians(10), math.radians(10)))
    assert any(isinstance(t, Rand2DElasticd) for t in transforms)
    assert not any(isinstance(t, Rand2DElasticd) for t in pretrain_pipeline(MedicalOptions(), 32).transforms)


def test_default_views_are_in_range_independent_and_seeded():
    image = torch.linspace(-1000, 1000, 96 * 96).reshape(1, 96, 96)
    o = MedicalOptions.parse({})
    p = ViewPipeline(pretrain_pipeline(o, 64), UNIT)
    p.set_random_state(3)
    sample = {"image": image, "window": (40.0, 400.0)}
    q, k = p(sample), p(sample)
    assert q.shape == (1, 64, 64) and q.dtype == torch.float32
    assert 0.0 <= float(q.min()) and float(q.max()) <= 1.0
    assert not torch.equal(q, k)
    p.set_random_state(3)
    torch.testing.assert_close(p(sample), q)


def test_eval_view_is_the_centre_square_and_deterministic():
    image = torch.zeros(1, 40, 80)
    image[..., :, 20:60] = 240.0  # the centre 40 columns are bright (1.0 after the window)
    p = ViewPipeline(eval_pipeline(MedicalOptions(), 20), UNIT)
    out = p({"image": image, "window": (40.0, 400.0)})
    assert out.shape == (1, 20, 20) and bool((out == 1.0).all())
    torch.testing.assert_close(out, p({"image": image, "window": (40.0, 400.0)}))


def test_view_pipeline_normalises():
    p = ViewPipeline(eval_pipeline(MedicalOptions(), 8), Normalization([0.5], [0.25]))
    out = p({"image": hu([40.0] * 8), "window": (40.0, 400.0)})
    assert torch.allclose(out, torch.zeros_like(out))  # (0.5 - 0.5) / 0.25


# ------------------------------------------------------------------ options


def test_options_parse_strings_and_native_values():
    o = MedicalOptions.parse({"modalities": "ct, cr", "percentiles": "1,99", "cache": "false",
                              "slices": "3", "crop_scale": 1, "gamma": (0.9, 1.1)})
    assert o.modalities == ("CT", "CR") and o.percentiles == (1.0, 99.0) and o.cache is False
    assert o.slices == 3 and o.in_channels == 3 and o.crop_scale == 1.0 and o.gamma == (0.9, 1.1)
    assert MedicalOptions.parse(None) == MedicalOptions()


def test_unknown_option_is_named():
    with pytest.raises(DataError, match=r"--data-option crop_size: unknown option .*crop_scale"):
        MedicalOptions.parse({"crop_size": 0.5})


@pytest.mark.parametrize("key,value,message", [
    ("crop_scale", 1.5, "must be in (0, 1]"),
    ("slices", 2, "odd number"),
    ("channels", 2, "must be 1 or 3"),
    ("ct_window", "liver", "choose one of soft_tissue, lung, bone"),
    ("window", "auto", "choose one of percentile, file"),
    ("percentiles", "99,1", "0 <= low < high <= 100"),
    ("gamma", "0,1", "0 < low <= high"),
    ("flip_prob", 2, "probability"),
    ("rotate_deg", "lots", "expected a finite number"),
    ("cache", "maybe", "expected true or false"),
    ("percentiles", "1,2,3", "expected 2 comma-separated finite numbers"),
    # NaN passes every range check and inf most, and either turns the views into NaN
    ("intensity_shift", "inf", "expected a finite number"),
    ("window_level_jitter", "nan", "expected a finite number"),
    ("noise_std", float("nan"), "expected a finite number"),
    ("gamma", "0.5,inf", "expected 2 comma-separated finite numbers"),
    # ... and a finite but absurd value costs memory (a 1e9 px smoothing kernel) or the image
    ("smooth_sigma", "0.5,1e9", "0 < low <= high <= 16"),
    ("noise_std", 5, "must be in [0, 1]"),
    ("intensity_shift", 2, "must be in [0, 1]"),
    ("window_level_jitter", 1.5, "must be in [0, 1]"),
    ("gamma", "0.5,20", "0 < low <= high <= 10"),
    ("elastic_magnitude", "1,1000", "0 <= low <= high <= 100"),
])
def test_bad_option_values_are_named(key, value, message):
    with pytest.raises(DataError) as err:
        MedicalOptions.parse({key: value})
    assert str(err.value).startswith(f"--data-option {key}=") and message in str(err.value)


def test_slices_and_channels_together_are_refused():
    with pytest.raises(DataError, match="slices > 1 already sets the channels"):
        MedicalOptions.parse({"slices": 3, "channels": 3})


def test_every_option_is_documented_with_its_default():
    text = DOCS.read_text()
    for name in MedicalOptions.names():
        row = re.search(rf"^\| `{name}` \|([^|]*)\|", text, re.M)
        assert row, f"docs/medical.md has no table row for option {name}"
