"""Batched views (fedmoco.gpu_augment) against the per-sample CPU pipelines, on CPU tensors.

Three levels: the geometry is exact (flips, quarter turns) or matches MONAI's rotation; with
the random steps switched off both pipelines give the same image; with the defaults the
parameter distributions and the distributions of output pixels agree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.transforms import RandScaleCropd, Rotate
from torchvision.transforms import v2

from domains.medical.options import MedicalOptions
from domains.medical.transforms import JITTERED, ViewPipeline, from_base, pretrain_pipeline
from domains.satellite.augment import pretrain_transform
from domains.satellite.options import parse_options
from fedmoco.data import Normalization
from fedmoco.gpu_augment import (MedicalViews, SatelliteViews, quarter_turn_matrix, resample,
                                 rotation_matrix)


def test_quarter_turns_and_flips_are_exact():
    x = torch.rand(4, 3, 10, 10)
    box = torch.tensor([[0, 0, 10, 10]] * 4)
    for k in range(4):
        out = resample(x, box, 10, quarter_turn_matrix(torch.full((4,), k)))
        torch.testing.assert_close(out, torch.rot90(x, k, dims=(-2, -1)), atol=1e-6, rtol=0)  # pixel centres onto centres


def test_rotation_matches_monai():
    x = torch.rand(1, 40, 40)
    ref = Rotate(math.radians(15), keep_size=True, padding_mode="zeros")(x)
    out = resample(x[None], torch.tensor([[0, 0, 40, 40]]), 40, rotation_matrix(torch.tensor([math.radians(15)])),
                   zero_outside=True)[0]
    inner = (slice(None), slice(8, 32), slice(8, 32))
    assert (out - ref)[inner].abs().max() < 1e-4  # interior: the same bilinear interpolation
    assert (out - ref).abs().mean() < 0.02  # the corners' zero padding agrees but for edge pixels


def _medical(**kw):
    return MedicalOptions.parse(kw)


def _norm(c=1):
    return Normalization([0.5] * c, [0.25] * c)


def test_medical_views_equal_monai_with_random_steps_off():
    opts = _medical(crop_scale=1.0, flip_prob=0, rotate_prob=0, intensity_prob=0, gamma_prob=0, noise_prob=0,
                    smooth_prob=0, window_level_jitter=0, window_width_jitter=0)
    base = (torch.rand(1, 24, 24) * 1.4 - 0.2).half()  # window units, beyond [0, 1] on purpose
    cpu = ViewPipeline(pretrain_pipeline(opts, 24), _norm())(from_base(base.numpy(), JITTERED))
    batched = MedicalViews(opts, 24, _norm()).view(base[None].float(), torch.tensor([True]))[0]
    torch.testing.assert_close(batched, cpu, atol=1e-4, rtol=1e-4)


def _monai_crop_sizes(opts, side, n):
    t = RandScaleCropd(["image"], roi_scale=math.sqrt(opts.crop_scale), max_roi_scale=1.0, random_size=True)
    t.set_random_state(0)
    out = []
    for _ in range(n):
        out.append(t({"image": torch.zeros(1, side, side)})["image"].shape[1:])
    return np.asarray(out, float)


def test_medical_parameter_distributions_match_the_pipeline():
    opts = _medical()
    p = MedicalViews(opts, 32, _norm()).sample_params(20000, 46, torch.device("cpu"))
    sizes = p["box"][:, 2:].numpy()
    ref = _monai_crop_sizes(opts, 46, 3000)
    assert sizes.min() == ref.min() and sizes.max() == ref.max() == 46
    assert abs(sizes.mean() - ref.mean()) < 0.3
    starts = p["box"][:, :2].numpy()
    assert (starts >= 0).all() and (starts + sizes <= 46).all()
    rotated = p["angle"] != 0
    assert abs(rotated.float().mean() - opts.rotate_prob) < 0.02
    assert p["angle"].abs().max() <= math.radians(opts.rotate_deg)
    assert abs(p["flip"].float().mean() - opts.flip_prob) < 0.02
    assert abs((p["scale"] != 0).float().mean() - opts.intensity_prob) < 0.02
    assert p["scale"].abs().max() <= opts.intensity_scale and p["shift"].abs().max() <= opts.intensity_shift
    assert abs((p["gamma"] != 1).float().mean() - opts.gamma_prob) < 0.02
    assert p["gamma"].min() >= opts.gamma[0] and p["gamma"].max() <= opts.gamma[1]
    assert abs(p["smooth"].float().mean() - opts.smooth_prob) < 0.02
    assert abs((p["noise_std"] != 0).float().mean() - opts.noise_prob) < 0.02
    assert p["noise_std"].max() <= opts.noise_std


def _pixel_stats(views: torch.Tensor) -> tuple[float, float, float]:
    return float(views.mean()), float(views.std()), float((views <= views.min() + 1e-6).float().mean())


def test_medical_output_distribution_matches_monai():
    torch.manual_seed(0)
    opts = _medical()
    yy, xx = torch.meshgrid(torch.linspace(-0.2, 1.2, 46), torch.linspace(-0.2, 1.2, 46), indexing="ij")
    base = (0.6 * yy + 0.4 * xx)[None].half()  # a ramp in window units
    pipe = ViewPipeline(pretrain_pipeline(opts, 32), _norm())
    cpu = []
    for seed in range(300):
        pipe.set_random_state(seed)
        cpu.append(pipe(from_base(base.numpy(), JITTERED)))
    cpu = torch.stack(cpu)
    batched = MedicalViews(opts, 32, _norm()).view(base[None].float().expand(300, -1, -1, -1),
                                                   torch.ones(300, dtype=torch.bool))
    for a, b in zip(_pixel_stats(cpu), _pixel_stats(batched)):
        assert abs(a - b) < 0.06, (_pixel_stats(cpu), _pixel_stats(batched))
    # The mean image (where the ramp sits on average) agrees too.
    assert (cpu.mean(0) - batched.mean(0)).abs().mean() < 0.06


def _satellite(**kw):
    return parse_options(kw)


def test_satellite_views_equal_torchvision_with_random_steps_off():
    opts = _satellite(flip="false", crop_scale="1,1", jitter_p=0, haze_p=0, noise_p=0, blur_p=0, band_dropout=0)
    norm = Normalization([0.1, 0.2, 0.3, 0.4], [0.05, 0.1, 0.1, 0.2])
    x = torch.rand(4, 32, 32)
    cpu = pretrain_transform(opts, 32, norm, None, {})(x)
    batched = SatelliteViews(opts, 32, norm, None, {}).view(x[None])[0]
    torch.testing.assert_close(batched, cpu, atol=1e-5, rtol=1e-5)


def test_satellite_parameter_and_output_distributions_match_torchvision():
    torch.manual_seed(0)
    opts = _satellite()
    norm = Normalization([0.2] * 4, [0.1] * 4)
    wl = [490.0, 560.0, 665.0, 842.0]
    views = SatelliteViews(opts, 32, norm, wl, {})
    p = views.sample_params(20000, 32, 32, torch.device("cpu"))
    area = (p["box"][:, 2] * p["box"][:, 3]) / 1024
    ref = [v2.RandomResizedCrop(32, scale=opts.crop_scale).make_params([torch.zeros(1, 32, 32)]) for _ in range(3000)]
    ref_area = np.asarray([r["height"] * r["width"] / 1024 for r in ref])
    assert abs(float(area.mean()) - ref_area.mean()) < 0.02 and float(area.max()) <= 1.0
    assert abs(p["rot90"].float().mean() - 1.5) < 0.05 and abs(p["hflip"].float().mean() - 0.5) < 0.02
    assert abs((p["haze"] > 0).float().mean() - opts.haze_p) < 0.02
    assert abs(p["drop"].float().mean() - opts.band_dropout) < 0.01 and not p["drop"].all(dim=1).any()
    tile = 0.1 + 0.3 * torch.rand(4, 32, 32)
    cpu_t = pretrain_transform(opts, 32, norm, wl, {})
    cpu = torch.stack([cpu_t(tile) for _ in range(300)])
    batched = views.view(tile[None].expand(300, -1, -1, -1))
    for c in range(4):
        assert abs(float(cpu[:, c].mean() - batched[:, c].mean())) < 0.15
        assert abs(float(cpu[:, c].std() / batched[:, c].std()) - 1) < 0.1


@pytest.mark.parametrize("flip", ["true", "false"])
def test_satellite_flip_option_is_honoured(flip):
    p = SatelliteViews(_satellite(flip=flip), 16, Normalization([0.0], [1.0]), None, {}).sample_params(
        500, 16, 16, torch.device("cpu"))
    moved = p["hflip"].any() or p["vflip"].any() or (p["rot90"] != 0).any()
    assert bool(moved) == (flip == "true")
