"""The medical sample cache: later epochs never decode, and any change to the data rebuilds it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import domains.medical.dataset as medical_dataset
from domains.medical.transforms import FIXED, JITTERED
from fedmoco.data import DataConfig, build_pretrain_data


def _data(root, cache_dir, **kw):
    return build_pretrain_data("medical", root, DataConfig(image_size=32, options={"cache_dir": str(cache_dir)}, **kw))


def test_second_epoch_and_second_run_read_the_cache_only(demo_archive, cache_dir, monkeypatch):
    ds = _data(demo_archive, cache_dir).dataset
    first = [ds.base(i) for i in range(len(ds))]
    assert ds.cache.filled() == len(ds)
    assert {tag for _, tag in first} == {JITTERED, FIXED}  # CT windows jitter, percentile CRs do not

    def no_decoding(*a, **kw):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(medical_dataset, "read_dicom", no_decoding)
    again = _data(demo_archive, cache_dir).dataset  # a new process / a later round
    torch.manual_seed(0)
    q, k = again[0]
    assert q.shape == k.shape == (1, 32, 32) and not torch.equal(q, k)
    for i in range(len(again)):
        base, tag = again.base(i)
        np.testing.assert_array_equal(base, first[i][0])
        assert tag == first[i][1]


def test_cached_base_is_the_windowed_resized_sample(demo_archive, cache_dir):
    ds = _data(demo_archive, cache_dir).dataset
    i = next(i for i in range(len(ds)) if ds.base(i)[1] == JITTERED)
    sample = ds.load(i)
    centre, width = sample["window"]
    image = sample["image"].float()
    expected = ((image - (centre - width / 2)) / width).clamp(-0.2, 1.2)
    side = ds.cache.shape[-1]
    expected = torch.nn.functional.interpolate(expected[None], size=(side, side), mode="bilinear",
                                               align_corners=False)[0] if image.shape[-1] < side else \
        torch.nn.functional.interpolate(expected[None], size=(side, side), mode="area")[0]
    np.testing.assert_allclose(ds.base(i)[0].astype(np.float32), expected.numpy(), atol=2e-3)


def test_touching_a_file_or_changing_options_rebuilds(demo_archive, cache_dir, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(demo_archive, root)
    ds = _data(root, cache_dir).dataset
    for i in range(len(ds)):
        ds.base(i)
    path = ds.cache.path
    victim = root / ds.records[0].path
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = _data(root, cache_dir).dataset
    assert rebuilt.cache.path != path and rebuilt.cache.filled() == 0 and not path.exists()
    other = build_pretrain_data("medical", root, DataConfig(
        image_size=32, options={"cache_dir": str(cache_dir), "ct_window": "lung"})).dataset
    assert other.cache.path != rebuilt.cache.path


@pytest.mark.parametrize("off", [{"cache": False}, {"options": {"cache": "false"}}])
def test_cache_can_be_turned_off(demo_archive, cache_dir, off):
    options = {"cache_dir": str(cache_dir), **off.pop("options", {})}
    ds = build_pretrain_data("medical", demo_archive, DataConfig(image_size=32, options=options, **off)).dataset
    assert ds.cache is None and ds.batched_views() is None
    assert ds[0][0].shape == (1, 32, 32)
