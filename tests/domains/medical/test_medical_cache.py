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


def _cached_copy(demo_archive, cache_dir, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(demo_archive, root)
    ds = _data(root, cache_dir).dataset
    for i in range(len(ds)):
        ds.base(i)
    return root, ds


def test_touching_a_file_or_changing_options_rebuilds(demo_archive, cache_dir, tmp_path):
    root, ds = _cached_copy(demo_archive, cache_dir, tmp_path)
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
    assert ds.cache is None and not list(cache_dir.rglob("*.cache"))
    assert ds[0][0].shape == (1, 32, 32)


def test_without_a_cache_the_batched_views_see_the_same_bases_and_draws(demo_archive, cache_dir, first_batch):
    """A cache that is off, or could not be built (no room on its volume), must not change a
    seeded run: the bases are decoded per read, as the cache would have stored them."""
    cached = _data(demo_archive, cache_dir).dataset
    plain = _data(demo_archive, cache_dir, cache=False).dataset
    assert cached.cache is not None and plain.cache is None
    for i in range(len(cached)):
        (a, tag_a), (b, tag_b) = cached.base(i), plain.base(i)
        assert a.dtype == b.dtype == np.float16 and tag_a == tag_b
        np.testing.assert_array_equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(first_batch(cached), first_batch(plain)))


def test_a_file_rewritten_during_the_run_is_decoded_again(demo_archive, cache_dir, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(demo_archive, root)
    ds = _data(root, cache_dir).dataset
    old = [ds.base(i) for i in range(len(ds))]
    # Two single-file samples of one shape whose bases differ: copy one file over the other.
    by_shape = {}
    for i in range(len(ds)):
        files = {int(f) for f in ds.samples[i, :, 0]}
        rec = ds.records[next(iter(files))]
        if len(files) == 1 and rec.frames == 1:
            by_shape.setdefault((rec.rows, rec.columns, rec.modality), []).append(i)
    a, b = next((s[0], s[-1]) for s in by_shape.values()
                if len(s) > 1 and not np.array_equal(old[s[0]][0], old[s[-1]][0]))
    target = root / ds.records[int(ds.samples[a, 0, 0])].path
    shutil.copyfile(root / ds.records[int(ds.samples[b, 0, 0])].path, target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on a coarse clock

    decoded = []
    real = medical_dataset.read_dicom
    monkeypatch.setattr(medical_dataset, "read_dicom", lambda path, *a, **kw: decoded.append(path) or real(path, *a, **kw))
    base, tag = ds.base(a)  # same dataset, same cache file: the run goes on
    assert decoded == [target]
    np.testing.assert_array_equal(base, old[b][0])  # the new content, not the stale cached base
    assert tag == old[b][1]
    np.testing.assert_array_equal(ds.base(a)[0], old[b][0])
    assert len(decoded) == 1  # stored and re-stamped: read from the cache again
    for i in range(len(ds)):  # the other samples are still served from the cache
        if i != a:
            np.testing.assert_array_equal(ds.base(i)[0], old[i][0])
    assert len(decoded) == 1

    target.unlink()  # a file gone mid-run: skipped like an unreadable one, not served stale
    assert ds.base(a) is None


def test_a_disk_that_fills_up_during_the_run_costs_the_cache_not_the_run(demo_archive, cache_dir, tmp_path,
                                                                           monkeypatch, caplog):
    """The room check passed, then other files filled the volume. A store through the mapping
    would have killed the process with SIGBUS; through the file it is an OSError (ENOSPC): the
    sample is served from its decode, nothing is marked filled, and the site decodes from then on."""
    import fedmoco.cache

    reference = _data(demo_archive, tmp_path / "other-cache").dataset
    (expected, expected_tag), (expected_1, _) = reference.base(0), reference.base(1)
    ds = _data(demo_archive, cache_dir).dataset
    cache = ds.cache

    def full_disk(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fedmoco.cache.os, "pwrite", full_disk)
    base, tag = ds.base(0)
    np.testing.assert_array_equal(base, expected)
    assert tag == expected_tag and ds.cache is None and cache.filled() == 0
    assert "cannot store decoded samples ([Errno 28] No space left on device); decoding every epoch instead" \
        in caplog.text
    np.testing.assert_array_equal(ds.base(1)[0], expected_1)  # still served, now without a cache


def _count_decodes(monkeypatch, during=None):
    """Paths decoded from now on; ``during(path)`` runs inside each decode."""
    decoded = []
    real = medical_dataset.read_dicom

    def counting(path, *a, **kw):
        decoded.append(path)
        result = real(path, *a, **kw)
        if during is not None:
            during(path)
        return result

    monkeypatch.setattr(medical_dataset, "read_dicom", counting)
    return decoded


def test_a_file_rewritten_with_its_mtime_put_back_is_decoded_again(demo_archive, cache_dir, tmp_path, monkeypatch,
                                                                   rewrite_keeping_mtime):
    root, ds = _cached_copy(demo_archive, cache_dir, tmp_path)
    a = next(i for i in range(len(ds)) if len({int(f) for f in ds.samples[i, :, 0]}) == 1)
    target = root / ds.records[int(ds.samples[a, 0, 0])].path
    rewrite_keeping_mtime(target)
    decoded = _count_decodes(monkeypatch)
    assert ds.base(a) is not None and decoded == [target]  # in this run: not served from the cache
    path = ds.cache.path
    assert _data(root, cache_dir).dataset.cache.path != path  # the next run keys a new cache


def test_a_base_decoded_while_its_file_was_rewritten_is_never_served(demo_archive, cache_dir, tmp_path,
                                                                    monkeypatch, rewrite_keeping_mtime):
    """The decode may have read half of each version (size and mtime as before): it is stored
    under the stamp from before the decode, which the file no longer has, so the next read
    decodes the file again rather than serve the torn base."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(demo_archive, root)
    ds = _data(root, cache_dir).dataset  # nothing cached yet
    a = next(i for i in range(len(ds)) if len({int(f) for f in ds.samples[i, :, 0]}) == 1)
    decoded = _count_decodes(monkeypatch, during=lambda path: rewrite_keeping_mtime(path) if len(decoded) == 1 else None)
    assert ds.base(a) is not None and len(decoded) == 1  # decoded; the file rewritten meanwhile
    assert ds.base(a) is not None and len(decoded) == 2  # not served from the cache: decoded again
    assert ds.base(a) is not None and len(decoded) == 2  # the file now still: stored and served


def test_every_frame_of_a_rewritten_multi_frame_file_is_decoded_again(demo_archive, cache_dir, tmp_path):
    """Stamps are kept per sample: one frame decoded again must not let the file's other
    frames serve their old bases from the cache."""
    import pydicom

    root, ds = _cached_copy(demo_archive, cache_dir, tmp_path)
    mf = next(j for j, r in enumerate(ds.records) if r.frames > 1)
    frames = [i for i in range(len(ds)) if {int(f) for f in ds.samples[i, :, 0]} == {mf}]
    assert len(frames) > 2
    path = root / ds.records[mf].path
    dcm = pydicom.dcmread(path)
    dcm.PixelData = (dcm.pixel_array.max() - dcm.pixel_array).astype(dcm.pixel_array.dtype).tobytes()  # inverted
    dcm.save_as(path)
    fresh = _data(root, cache_dir, cache=False).dataset
    for i in frames:  # the first decodes again; so must the others
        np.testing.assert_array_equal(ds.base(i)[0], fresh.base(i)[0])
