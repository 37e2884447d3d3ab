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
import torch.nn.functional as F
from monai.transforms import RandScaleCropd, Rotate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from domains.medical.options import MedicalOptions
from domains.medical.transforms import JITTERED, ViewPipeline, from_base, pretrain_pipeline
from domains.satellite.augment import pretrain_transform
from domains.satellite.options import parse_options
from fedmoco.data import Normalization
from fedmoco.gpu_augment import (MedicalViews, SatelliteViews, _affine_grid, add_noise_, adjust_contrast_,
                                 reflect_blur_matrix, resample, resize_weights, rotation_matrix)


def test_resize_weights_by_hand():
    # A 2-pixel crop at pixel 1 of a 4-pixel axis, enlarged to 4: output centres fall at 0.25,
    # 0.75, 1.25, 1.75 crop pixels; bilinear between the crop's pixel centres (0.5, 1.5),
    # the crop's edge pixel repeated beyond them, nothing from outside the crop.
    w = resize_weights(torch.tensor([1]), torch.tensor([2]), 4, 4)[0]
    expected = torch.tensor([[0, 1, 0, 0], [0, 0.75, 0.25, 0], [0, 0.25, 0.75, 0], [0, 0, 1, 0]])
    torch.testing.assert_close(w, expected)
    # Shrinking 4 pixels to 2 averages pairs (the antialiased triangle spans 2 pixels each way).
    w = resize_weights(torch.tensor([0]), torch.tensor([4]), 4, 2)[0]
    torch.testing.assert_close(w, torch.tensor([[3, 3, 1, 0], [0, 1, 3, 3]]) / 7)
    # Same size: the identity.
    torch.testing.assert_close(resize_weights(torch.tensor([0]), torch.tensor([5]), 5, 5)[0], torch.eye(5))


def test_reflect_blur_matrix_by_hand():
    k = reflect_blur_matrix(torch.tensor([[0.25, 0.5, 0.25]]), 4)[0]
    # reflect padding: pixel -1 reads pixel 1, pixel 4 reads pixel 2
    expected = torch.tensor([[0.5, 0.5, 0, 0], [0.25, 0.5, 0.25, 0], [0, 0.25, 0.5, 0.25], [0, 0, 0.5, 0.5]])
    torch.testing.assert_close(k, expected)


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


def _views(opts, size, per_image):
    views = MedicalViews(opts, size, _norm())
    views.per_image = per_image
    return views


@pytest.mark.parametrize("per_image", [True, False])
def test_medical_views_equal_monai_with_random_steps_off(per_image):
    opts = _medical(crop_scale=1.0, flip_prob=0, rotate_prob=0, intensity_prob=0, gamma_prob=0, noise_prob=0,
                    smooth_prob=0, window_level_jitter=0, window_width_jitter=0)
    base = (torch.rand(1, 24, 24) * 1.4 - 0.2).half()  # window units, beyond [0, 1] on purpose
    cpu = ViewPipeline(pretrain_pipeline(opts, 24), _norm())(from_base(base.numpy(), JITTERED))
    batched = _views(opts, 24, per_image).view(base[None].float(), torch.tensor([True]))[0]
    torch.testing.assert_close(batched, cpu, atol=1e-4, rtol=1e-4)


def test_affine_grid_is_torchs():
    theta = torch.randn(5, 2, 3)
    torch.testing.assert_close(_affine_grid(theta, 17), F.affine_grid(theta, (5, 1, 17, 17), align_corners=False),
                               atol=1e-5, rtol=0)


def test_per_image_rotation_matches_monai_including_the_zero_padded_corners():
    opts = _medical(crop_scale=1.0, flip_prob=0, rotate_prob=1.0, intensity_prob=0, gamma_prob=0, noise_prob=0,
                    smooth_prob=0, window_level_jitter=0, window_width_jitter=0)
    views = _views(opts, 40, per_image=True)
    x = torch.rand(2, 1, 40, 40)
    p = views.sample_params(2, 40, torch.device("cpu"))
    p["angle"] = torch.tensor([math.radians(15), math.radians(-7)])
    out = views.view(x, torch.ones(2, dtype=torch.bool), p, normalise=False)
    for i in range(2):
        ref = Rotate(float(p["angle"][i]), keep_size=True, padding_mode="zeros")(x[i])
        torch.testing.assert_close(out[i], torch.as_tensor(ref), atol=1e-4, rtol=0)


def test_per_image_geometry_equals_the_batched_grid_and_monai_order():
    """The CPU path (window the crop, resize, flip, then rotate) against the batched path (one
    grid sample from the windowed base) and MONAI's steps, with the same parameters."""
    torch.manual_seed(1)
    opts = _medical(intensity_prob=0, gamma_prob=0, noise_prob=0, smooth_prob=0)
    views = MedicalViews(opts, 32, _norm())
    # smooth bases (detail far above a pixel): one interpolation and two then differ by little
    base = F.interpolate(torch.rand(6, 1, 5, 5), size=(46, 46), mode="bilinear", align_corners=False) * 1.4 - 0.2
    jittered = torch.tensor([True, True, False, True, False, True])
    p = views.sample_params(6, 46, torch.device("cpu"))
    p["angle"][:3] = 0  # three images without rotation, three with
    p["angle"][3:] = torch.tensor([0.1, -0.15, 0.05])
    p["flip"][:] = torch.tensor([True, False, True, True, False, False])
    outs = {}
    for per_image in (True, False):
        views.per_image = per_image
        outs[per_image] = views.view(base, jittered, p, normalise=False)
    torch.testing.assert_close(outs[True][:3], outs[False][:3], atol=1e-4, rtol=0)  # crop + resize + flip: exact
    inner = (slice(None), slice(None), slice(8, 24), slice(8, 24))
    diff = (outs[True][3:] - outs[False][3:])[inner].abs()  # one interpolation against two
    assert diff.max() < 0.05 and diff.mean() < 0.005, (diff.max(), diff.mean())
    # MONAI's order on image 3: window, crop, resize, flip, rotate with zero padding.
    top, left, h, w = p["box"][3].long().tolist()
    gain = 1 / (1 + opts.window_width_jitter * p["width_u"][3])
    centre = 0.5 + opts.window_level_jitter * p["level_u"][3]
    crop = ((base[3, :, top:top + h, left:left + w] - (centre - 0.5 / gain)) * gain).clamp(0, 1)
    resized = F.interpolate(crop[None], size=(32, 32), mode="bilinear", align_corners=False)[0].flip(-1)
    ref = torch.as_tensor(Rotate(float(p["angle"][3]), keep_size=True, padding_mode="zeros")(resized)).clamp(0, 1)
    torch.testing.assert_close(outs[True][3], ref, atol=1e-4, rtol=0)


def test_window_deferred_into_the_intensity_step_gives_the_same_views():
    """The CPU path clamps an unrotated crop and applies the window's gain and offset together
    with the intensity scale and shift, after the resize: the same images as windowing first."""
    torch.manual_seed(3)
    opts = _medical(rotate_prob=0, intensity_prob=1.0, gamma_prob=0, noise_prob=0, smooth_prob=0)
    views = MedicalViews(opts, 32, _norm())
    base = torch.rand(8, 1, 46, 46) * 1.6 - 0.3  # beyond the window on both sides
    jittered = torch.rand(8) < 0.5
    p = views.sample_params(8, 46, torch.device("cpu"))
    assert (p["scale"] != 0).all() and (p["shift"] != 0).all()
    outs = {}
    for per_image in (True, False):
        views.per_image = per_image
        outs[per_image] = views.view(base, jittered, p, normalise=False)
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_image", [True, False])
def test_adjust_contrast_is_monais_and_leaves_gamma_one_alone(per_image):
    from monai.transforms import AdjustContrast

    x = torch.rand(3, 1, 20, 20)
    x[1, :, :8] = x[1].min()  # a flat region at the image minimum: t = 0 exactly, 0 ** gamma = 0
    gamma = torch.tensor([1.0, 0.8, 1.25])
    out = adjust_contrast_(x.clone(), gamma, per_image)
    torch.testing.assert_close(out[0], x[0])
    for i in (1, 2):
        torch.testing.assert_close(out[i], torch.as_tensor(AdjustContrast(float(gamma[i]))(x[i])), atol=1e-5, rtol=1e-5)
    # the region at the minimum stays there: 0 ** gamma = 0, up to the floor that keeps log and exp
    # off their slow paths (at most e^-69 of the range, see adjust_contrast_)
    assert (out[1, :, :8] - x[1].min()).abs().max() <= 1e-29


@pytest.mark.parametrize("per_image", [True, False])
def test_smoothing_is_monais_gaussian_smooth(per_image):
    from monai.transforms import GaussianSmooth

    torch.manual_seed(0)
    opts = _medical(crop_scale=1.0, flip_prob=0, rotate_prob=0, intensity_prob=0, gamma_prob=0, noise_prob=0,
                    smooth_prob=1.0, window_level_jitter=0, window_width_jitter=0)
    views = _views(opts, 24, per_image)
    base = torch.rand(4, 1, 24, 24)
    p = views.sample_params(4, 24, torch.device("cpu"))
    # kernels of 3, 5, 7 and 9 taps (MONAI truncates each at its own 4 sigma), and unequal axes
    p["sigma"] = torch.tensor([[0.25, 0.3], [0.5, 1.0], [0.8, 0.4], [1.0, 1.0]])
    out = views.view(base, torch.ones(4, dtype=torch.bool), p, normalise=False)
    for i in range(4):
        ref = GaussianSmooth(sigma=p["sigma"][i].tolist(), approx="erf")(base[i])
        torch.testing.assert_close(out[i], torch.as_tensor(ref).clamp(0, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("per_image", [True, False])
def test_add_noise_has_each_images_std_and_spares_the_others(per_image):
    torch.manual_seed(0)
    x = torch.zeros(3, 2, 64, 64)
    out = add_noise_(x, torch.tensor([0.0, 0.02, 0.1]), per_image)
    assert (out[0] == 0).all()
    assert abs(float(out[1].std()) - 0.02) < 0.001 and abs(float(out[2].std()) - 0.1) < 0.005
    assert abs(float(out[2].mean())) < 0.005


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


@pytest.mark.parametrize("per_image", [True, False])
def test_medical_output_distribution_matches_monai(per_image):
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
    batched = _views(opts, 32, per_image).view(base[None].float().expand(300, -1, -1, -1),
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


def _torchvision_view(x, p, i, views, size, norm):
    """View i of tile x by torchvision's functionals with the drawn parameters ``p``, in the
    order of domains.satellite.augment.pretrain_transform (noise left out)."""
    top, left, h, w = p["box"][i].long().tolist()
    y = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True)
    if p["hflip"][i]:
        y = TF.horizontal_flip(y)
    if p["vflip"][i]:
        y = TF.vertical_flip(y)
    y = torch.rot90(y, int(p["rot90"][i]), dims=(-2, -1))
    stretch, gain = p["stretch"][i].view(-1, 1, 1), p["gain"][i].view(-1, 1, 1)
    mean = y.mean(dim=(-2, -1), keepdim=True)
    y = ((y - mean) * stretch + mean) * gain + p["haze"][i] * views.haze_weights[0]
    if p["blur"][i]:
        sigma = float(p["sigma"][i])
        y = TF.gaussian_blur(y, [views.kernel] * 2, [sigma, sigma])
    return TF.normalize(y, norm.mean, norm.std) * (~p["drop"][i]).float().view(-1, 1, 1)


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("tile", [32, 48, 20])  # the crop enlarged, shrunk (antialiased) or both
def test_satellite_views_are_torchvisions_for_the_same_draws(tile, per_image):
    torch.manual_seed(tile)
    norm = Normalization([0.1, 0.2, 0.3], [0.2, 0.1, 0.3])
    views = SatelliteViews(_satellite(), 32, norm, [490.0, 560.0, 665.0], {})
    views.per_image = per_image
    x = torch.rand(48, 3, tile, tile)
    p = views.sample_params(48, tile, tile, torch.device("cpu"))
    p["noise_std"].zero_()
    # every quarter turn, flip and blur occurs in 48 draws
    assert set(p["rot90"].tolist()) == {0, 1, 2, 3} and p["hflip"].any() and p["vflip"].any() and p["blur"].any()
    ref = torch.stack([_torchvision_view(x[i], p, i, views, 32, norm) for i in range(48)])
    torch.testing.assert_close(views.view(x, p), ref, atol=2e-5, rtol=1e-5)


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



def test_batched_views_never_read_a_device_value(host_reads):
    """The path a GPU takes (per_image False): every random step on, yet nothing the host must
    wait for, so the views queue behind the previous training step instead of draining it."""
    torch.manual_seed(0)
    med = _views(_medical(rotate_prob=0.5, smooth_prob=0.5, gamma_prob=0.5, noise_prob=0.5), 24, per_image=False)
    bases = (torch.rand(16, 1, 32, 32).half(), torch.tensor([1, 2] * 8))
    sat = SatelliteViews(_satellite(band_dropout=0.5, blur_p=0.5), 16, Normalization([0.1] * 3, [0.2] * 3),
                         [490.0, 560.0, 665.0], {})
    sat.per_image = False
    tiles = torch.rand(16, 3, 20, 20)
    with host_reads() as spy:
        med_q, med_k = med(bases)
        sat_q, sat_k = sat(tiles)
    assert spy.reads == []
    assert med_q.shape == med_k.shape == (16, 1, 24, 24) and sat_q.shape == sat_k.shape == (16, 3, 16, 16)
    assert torch.isfinite(med_q).all() and torch.isfinite(sat_q).all()


def test_band_dropout_keeps_one_band_where_it_drew_all():
    torch.manual_seed(0)
    views = SatelliteViews(_satellite(band_dropout=0.9), 16, Normalization([0.1] * 3, [0.2] * 3), None, {})
    p = views.sample_params(2000, 20, 20, torch.device("cpu"))
    assert not p["drop"].all(dim=1).any()
    # P(all 3 dropped) = 0.729: those rows keep exactly one band, uniformly chosen
    kept_one = (~p["drop"]).sum(dim=1) == 1
    assert abs(kept_one.float().mean() - (0.729 + 3 * 0.9**2 * 0.1)) < 0.03
    assert (~p["drop"][kept_one]).float().mean(dim=0).sub(1 / 3).abs().max() < 0.04
