"""The images recipe's flip option and its shortcut-resistant intensity nuisance."""

import pytest
import torch

from domains.images import build_pretrain_data
from domains.images.dataset import IntensityNuisance, moco_v2_transform, parse_options
from domains.satellite.augment import pretrain_transform
from domains.satellite.options import parse_options as satellite_options
from fedmoco.data import DataConfig, Normalization
from fedmoco.errors import DataError

NORM1 = Normalization([0.0], [1.0])


def _names(transform) -> set[str]:
    return {type(t).__name__ for t in transform.transforms}


def test_flip_is_on_by_default_and_turns_off():
    assert "RandomHorizontalFlip" in _names(moco_v2_transform(16, 1, 0.2, NORM1))
    assert "RandomHorizontalFlip" not in _names(moco_v2_transform(16, 1, 0.2, NORM1, flip=False))
    assert parse_options({})["flip"] is True
    assert parse_options({"flip": "false"})["flip"] is False
    assert parse_options({"flip": "off"})["flip"] is False


def test_flip_off_never_mirrors_a_chiral_image():
    # left column bright, full-frame crop: a mirrored view would have its bright column on the right
    img = torch.zeros(1, 16, 16, dtype=torch.uint8)
    img[:, :, :3] = 255
    t = moco_v2_transform(16, 1, 1.0, NORM1, flip=False)
    torch.manual_seed(0)
    for _ in range(40):
        v = t(img)[0]
        assert v[:, :4].mean() > v[:, -4:].mean()
    t_flip = moco_v2_transform(16, 1, 1.0, NORM1, flip=True)
    mirrored = sum(bool(t_flip(img)[0][:, :4].mean() < t_flip(img)[0][:, -4:].mean()) for _ in range(40))
    assert mirrored > 0  # the default does mirror


def test_defaults_and_option_errors_name_the_option(demo_images):
    opts = parse_options({})
    assert (opts["offset"], opts["ramp"], opts["noise"]) == (0.2, 0.3, 0.05)
    assert "IntensityNuisance" in _names(moco_v2_transform(16, 1, 0.2, NORM1, offset=0.2))
    assert "IntensityNuisance" not in _names(moco_v2_transform(16, 1, 0.2, NORM1))
    with pytest.raises(DataError, match=r"--data-option ramp: must be a number in \[0, 1\].*'steep'"):
        build_pretrain_data(demo_images, DataConfig(options={"ramp": "steep"}))
    with pytest.raises(DataError, match=r"--data-option noise: must be a number in \[0, 1\]"):
        build_pretrain_data(demo_images, DataConfig(options={"noise": 1.5}))
    with pytest.raises(DataError, match="--data-option flip: must be true or false, got 'sideways'"):
        build_pretrain_data(demo_images, DataConfig(options={"flip": "sideways"}))


def test_offset_is_one_constant_per_view_within_bounds():
    torch.manual_seed(1)
    x = torch.rand(3, 8, 8)
    t = IntensityNuisance(offset=0.2, ramp=0.0, noise=0.0, p=1.0)
    deltas = []
    for _ in range(200):
        d = t(x) - x
        assert torch.allclose(d, d.flatten()[0].expand_as(d), atol=1e-6)  # same everywhere, every channel
        deltas.append(float(d.flatten()[0]))
    assert max(map(abs, deltas)) <= 0.2 + 1e-6
    assert min(deltas) < -0.1 and max(deltas) > 0.1  # both signs, spread over the range


def test_ramp_is_a_plane_with_bounded_peak_to_peak():
    torch.manual_seed(2)
    x = torch.zeros(1, 16, 16)
    t = IntensityNuisance(offset=0.0, ramp=0.3, noise=0.0, p=1.0)
    spans = []
    for _ in range(200):
        d = t(x)[0]
        # a plane: second differences vanish along both axes
        assert torch.allclose(d[:, 2:] - 2 * d[:, 1:-1] + d[:, :-2], torch.zeros(16, 14), atol=1e-5)
        assert torch.allclose(d[2:] - 2 * d[1:-1] + d[:-2], torch.zeros(14, 16), atol=1e-5)
        assert abs(float(d.mean())) < 1e-5  # centred: a ramp, not an offset
        spans.append(float(d.max() - d.min()))
    assert max(spans) <= 0.3 + 1e-6 and max(spans) > 0.2


def test_noise_std_is_bounded_and_strengths_zero_is_identity():
    torch.manual_seed(3)
    x = torch.rand(1, 64, 64)
    t = IntensityNuisance(offset=0.0, ramp=0.0, noise=0.05, p=1.0)
    stds = [float((t(x) - x).std()) for _ in range(100)]
    assert max(stds) <= 0.05 * 1.1 and max(stds) > 0.03
    assert torch.equal(IntensityNuisance(0.0, 0.0, 0.0, p=1.0)(x), x)
    assert torch.equal(IntensityNuisance(0.2, 0.3, 0.05, p=0.0)(x), x)  # p = 0: never applied


def test_satellite_flip_option_drops_flips_and_rotations():
    norm = Normalization([0.1] * 4, [0.05] * 4)
    roles = {"blue": 0, "green": 1, "red": 2, "nir": 3}
    on = _names(pretrain_transform(satellite_options({}), 32, norm, None, roles))
    off = _names(pretrain_transform(satellite_options({"flip": "false"}), 32, norm, None, roles))
    assert {"RandomHorizontalFlip", "RandomVerticalFlip", "RandomRot90"} <= on
    assert not {"RandomHorizontalFlip", "RandomVerticalFlip", "RandomRot90"} & off
