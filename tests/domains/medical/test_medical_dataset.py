"""build_pretrain_data / build_labelled_data over generated folders."""

from __future__ import annotations

import csv
import logging
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from domains.medical import build_labelled_data, build_pretrain_data, write_dicom
from fedmoco.data import DataConfig, Normalization, collate_views
from fedmoco.errors import DataError

QUIET = {"flip_prob": 0, "rotate_deg": 0, "crop_scale": 1.0, "window_level_jitter": 0,
         "window_width_jitter": 0, "intensity_prob": 0, "gamma_prob": 0, "noise_prob": 0,
         "smooth_prob": 0}


def cfg(cache_dir, size=32, **options) -> DataConfig:
    return DataConfig(image_size=size, seed=0, options={"cache_dir": str(cache_dir), **options})


def ct_series(root, values_hu, series="1.2.3", size=16):
    """Single-frame CT files of constant HU, one per value, at z = 0, 5, 10, ..."""
    for s, value in enumerate(values_hu):
        write_dicom(root / f"s{s}.dcm", np.full((size, size), value + 1024, np.uint16), bits_stored=12,
                    attributes={"Modality": "CT", "RescaleIntercept": -1024, "RescaleSlope": 1,
                                "SeriesInstanceUID": series, "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                                "ImagePositionPatient": [0, 0, 5.0 * s]})
    return root


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * 0.25 + 0.5


def test_pretrain_data_over_the_demo_archive(demo_archive, cache_dir):
    data = build_pretrain_data(demo_archive, cfg(cache_dir))
    assert len(data.dataset) == 28 and data.in_channels == 1
    assert data.normalization.to_dict() == {"mean": [0.5], "std": [0.25]}
    assert sum(data.skipped.values()) == 4
    assert "28 samples from 23 DICOM files (CR 4, CT 24)" in data.description
    for i in range(len(data.dataset)):
        q, k = data.dataset[i]
        assert q.shape == k.shape == (1, 32, 32) and q.dtype == torch.float32
        assert 0.0 <= float(unnormalise(q).min()) and float(unnormalise(q).max()) <= 1.0 + 1e-6
        assert not torch.equal(q, k)


@pytest.mark.parametrize("sample_cache", [False, True])
def test_ct_window_through_the_dataset_by_hand(tmp_path, cache_dir, sample_cache):
    root = ct_series(tmp_path / "ct", [40, -160, 240])
    data = build_pretrain_data(root, replace(cfg(cache_dir, size=16, **QUIET), cache=sample_cache))
    assert (data.dataset.cache is not None) == sample_cache
    values = [float(data.dataset[i][0].mean()) for i in range(3)]
    assert values == [0.0, -2.0, 2.0]  # windowed 0.5, 0, 1 -> (x - 0.5) / 0.25 (exact in float16 too)
    lung = build_pretrain_data(root, replace(cfg(cache_dir, size=16, ct_window="lung", **QUIET), cache=sample_cache))
    # (HU + 1350) / 1500: 40 -> 0.92667 -> 1.70667. Decoded exactly without the sample cache;
    # the cache stores window units as float16 (docs/engine.md): half a float16 step at 0.93
    # is 2**-12 window units, 2**-10 after (x - 0.5) / 0.25.
    expected = (1390 / 1500 - 0.5) / 0.25
    got = float(lung.dataset[0][0].mean())
    assert got == pytest.approx(expected, abs=2**-10 if sample_cache else 1e-5)
    if sample_cache:
        assert got == pytest.approx((float(np.float16(1390 / 1500)) - 0.5) / 0.25, abs=1e-6)


@pytest.mark.parametrize("sample_cache", [False, True])
def test_a_monochrome1_ct_under_a_preset_is_the_inverted_image_not_a_blank_one(tmp_path, cache_dir, sample_cache):
    """MONOCHROME1 pixels are reflected to MONOCHROME2's convention, so they are no longer HU; the
    preset's centre was not reflected with them, and every such CT came out blank at 1.0 (found by
    an audit). The soft-tissue preset (40, 400) on 40 / -160 / 240 HU: MONOCHROME2 gives 0.5 / 0 / 1,
    MONOCHROME1 (bright = low value) 0.5 / 1 / 0."""
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        root = tmp_path / photometric
        for s, value in enumerate([40, -160, 240]):
            write_dicom(root / f"s{s}.dcm", np.full((16, 16), value + 1024, np.uint16), bits_stored=12,
                        photometric=photometric, attributes={"Modality": "CT", "RescaleIntercept": -1024,
                                                             "RescaleSlope": 1})
        data = build_pretrain_data(root, replace(cfg(cache_dir, size=16, **QUIET), cache=sample_cache))
        windowed = [float(unnormalise(data.dataset[i][0]).mean()) for i in range(3)]
        want = [0.5, 0.0, 1.0] if photometric == "MONOCHROME2" else [0.5, 1.0, 0.0]
        assert windowed == pytest.approx(want, abs=1e-3)


def test_a_data_folder_whose_name_is_not_utf8_is_indexed_and_cached(tmp_path, cache_dir):
    """POSIX names are bytes: a folder named b"ct_\xff" (an export from an older system) crashed
    the index cache and the sample cache, which hashed its name as UTF-8, with a traceback."""
    import os

    root = ct_series(Path(os.fsdecode(os.fsencode(tmp_path) + b"/ct_\xff")), [40, -160])
    data = build_pretrain_data(root, cfg(cache_dir, size=16, **QUIET))
    assert data.dataset.cache is not None and len(data.dataset) == 2
    assert float(data.dataset[0][0].mean()) == 0.0  # 40 HU in the default CT window: 0.5
    assert len(list((cache_dir / "medical-index").glob("*.json"))) == 1


def test_25d_channels_are_neighbouring_slices(tmp_path, cache_dir):
    root = ct_series(tmp_path / "ct", [-160, -60, 40, 140])
    data = build_pretrain_data(root, cfg(cache_dir, size=16, slices=3, **QUIET))
    assert data.in_channels == 3 and data.normalization.channels == 3
    q, _ = data.dataset[1]  # centre z = 5: neighbours z = 0, 10
    assert unnormalise(q).mean(dim=(1, 2)).tolist() == pytest.approx([0.0, 0.25, 0.5])
    q, _ = data.dataset[3]  # the last slice repeats itself above
    assert unnormalise(q).mean(dim=(1, 2)).tolist() == pytest.approx([0.5, 0.75, 0.75])


def test_25d_stacks_keep_to_one_image_plane_of_a_series(tmp_path, cache_dir):
    """An MR 3-plane localizer is one series: stacked by the series alone, a sample mixed axial,
    sagittal and coronal slices (found by an audit). Each plane now stacks on its own."""
    planes = {"ax": ([1, 0, 0, 0, 1, 0], -160), "sag": ([0, 1, 0, 0, 0, -1], 40), "cor": ([1, 0, 0, 0, 0, -1], 240)}
    root = tmp_path / "loc"
    for name, (iop, hu) in planes.items():
        normal = np.cross(iop[:3], iop[3:])
        for j, offset in enumerate((-10.0, 0.0, 10.0)):
            write_dicom(root / f"{name}{j}.dcm", np.full((16, 16), hu + 1024 + 10 * j, np.uint16), bits_stored=12,
                        attributes={"Modality": "CT", "RescaleIntercept": -1024, "RescaleSlope": 1,
                                    "SeriesInstanceUID": "1.2.3", "ImageOrientationPatient": iop,
                                    "ImagePositionPatient": [float(v) for v in offset * normal]})
    data = build_pretrain_data(root, cfg(cache_dir, size=16, slices=3, **QUIET))
    for i in range(len(data.dataset)):
        q, _ = data.dataset[i]
        hu = unnormalise(q).mean(dim=(1, 2)) * 400 + 40 - 200  # back to HU (soft-tissue window 40 / 400)
        plane = min(planes, key=lambda p: abs(planes[p][1] + 10 - float(hu[1])))
        assert all(abs(float(v) - planes[plane][1] - 10) <= 11 for v in hu), (i, hu.tolist())


def test_orientation_noise_around_zero_keeps_one_stack(tmp_path, cache_dir):
    """-2e-10 rounded to -0.0 and printed '-0': one axial series split into two stacks (found by
    a review)."""
    root = tmp_path / "ax"
    for s, (hu, iop) in enumerate([(-160, [1, 0, 0, 0, 1, 0]), (40, [1, -2.05e-10, 0, 0, 1, 0]),
                                    (240, [1, 0, 0, 0, 1, 0])]):
        write_dicom(root / f"s{s}.dcm", np.full((16, 16), hu + 1024, np.uint16), bits_stored=12,
                    attributes={"Modality": "CT", "RescaleIntercept": -1024, "RescaleSlope": 1,
                                "SeriesInstanceUID": "1.2.3", "ImageOrientationPatient": iop,
                                "ImagePositionPatient": [0, 0, 5.0 * s]})
    data = build_pretrain_data(root, cfg(cache_dir, size=16, slices=3, **QUIET))
    q, _ = data.dataset[1]
    assert unnormalise(q).mean(dim=(1, 2)).tolist() == pytest.approx([0.0, 0.5, 1.0])  # -160, 40, 240 HU


def test_a_cache_filled_by_an_older_decoder_is_not_served(tmp_path, cache_dir, monkeypatch):
    """The sample cache's key had no decode version: after the MONOCHROME1 and Planar
    Configuration fixes a site kept serving the blank and mosaic bases it had cached (found by a
    review). A new DECODE_VERSION keys a new, empty cache."""
    import domains.medical.dataset as medical

    root = ct_series(tmp_path / "ct", [40, -160])
    data = build_pretrain_data(root, cfg(cache_dir, size=16, **QUIET))
    data.dataset[0]
    assert data.dataset.cache.filled() == 1
    monkeypatch.setattr(medical, "DECODE_VERSION", medical.DECODE_VERSION + 1)
    again = build_pretrain_data(root, cfg(cache_dir, size=16, **QUIET))
    assert again.dataset.cache.filled() == 0 and again.dataset.cache.path != data.dataset.cache.path


def test_rgb_becomes_luma_and_gray_can_be_replicated(tmp_path, cache_dir):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 255  # pure red: luma 0.299
    write_dicom(tmp_path / "us" / "rgb.dcm", rgb, photometric="RGB", attributes={"Modality": "US"})
    gray = build_pretrain_data(tmp_path / "us", cfg(cache_dir, size=8, **QUIET))
    assert float(unnormalise(gray.dataset[0][0]).mean()) == pytest.approx(0.299, abs=1e-3)
    colour = build_pretrain_data(tmp_path / "us", cfg(cache_dir, size=8, channels=3, **QUIET))
    assert unnormalise(colour.dataset[0][0]).mean(dim=(1, 2)).tolist() == pytest.approx([1, 0, 0], abs=1e-3)
    ct = build_pretrain_data(ct_series(tmp_path / "ct", [40]), cfg(cache_dir, size=8, channels=3, **QUIET))
    assert ct.in_channels == 3 and unnormalise(ct.dataset[0][0]).mean(dim=(1, 2)).tolist() == [0.5] * 3


def test_file_broken_after_indexing_gives_none_and_a_warning(tmp_path, demo_archive, cache_dir, caplog):
    root = shutil.copytree(demo_archive, tmp_path / "copy")
    data = build_pretrain_data(root, cfg(cache_dir))
    i = next(i for i in range(len(data.dataset)) if data.dataset.file_of(i) == root / "patient_00/ct/slice_000.dcm")
    victim = data.dataset.file_of(i)
    victim.write_bytes(victim.read_bytes()[:-1000])  # uncompressed in the demo's rotation
    with caplog.at_level(logging.WARNING):
        assert data.dataset[i] is None
    assert f"{victim}: truncated pixel data: the file holds 7192 of 8192 bytes" in caplog.text
    batch, dropped = collate_views([data.dataset[i], data.dataset[i + 1]])
    assert dropped == 1 and batch[0].shape == (1, 1, 32, 32)


def test_same_torch_seed_same_views(demo_archive, cache_dir):
    data = build_pretrain_data(demo_archive, cfg(cache_dir))
    torch.manual_seed(5)
    a = data.dataset[3]
    torch.manual_seed(5)
    b = data.dataset[3]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_dataloader_workers_pickle_and_augment_differently(tmp_path, cache_dir):
    root = ct_series(tmp_path / "ct", [40])
    shutil.copy(root / "s0.dcm", root / "s1.dcm")  # two identical images
    data = build_pretrain_data(root, cfg(cache_dir, size=16))
    pickle.loads(pickle.dumps(data.dataset))
    loader = DataLoader(data.dataset, batch_size=1, num_workers=2, collate_fn=collate_views,
                        generator=torch.Generator().manual_seed(0))
    (first, _), (second, _) = list(loader)
    assert not torch.equal(first[0], second[0])  # worker 0 and worker 1 did not replay each other


def test_labelled_data_labels_by_folder(labelled_archive, cache_dir):
    data = build_labelled_data(labelled_archive, cfg(cache_dir), None, None)
    assert data.classes == ["abdomen", "chest", "head"] and data.in_channels == 1
    ds = data.dataset
    labels = [ds.label_of(i) for i in range(len(ds))]
    for i in range(len(ds)):
        folder = ds.file_of(i).relative_to(labelled_archive).parts[0]
        assert data.classes[labels[i]] == folder
    image, label = ds[0]
    assert image.shape == (1, 32, 32) and label == labels[0]
    torch.testing.assert_close(ds[0][0], image)  # a single deterministic view
    assert sum(data.skipped.values()) == 4


def test_labelled_data_from_csv_and_given_normalization(labelled_archive, tmp_path, cache_dir):
    files = sorted(p for p in labelled_archive.rglob("*") if p.is_file() and "unsorted" not in p.parts)
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for p in files:
            writer.writerow([p.relative_to(labelled_archive).as_posix(), "xray" if p.parent.name == "cr" else "ct"])
    norm = Normalization([0.0], [1.0])
    data = build_labelled_data(labelled_archive, cfg(cache_dir), csv_path, norm)
    assert data.classes == ["ct", "xray"] and data.normalization is norm
    image, _ = data.dataset[0]
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0  # identity normalisation
    with pytest.raises(DataError, match="normalization has 3 channels but the medical options give 1"):
        build_labelled_data(labelled_archive, cfg(cache_dir), None, Normalization([0.5] * 3, [0.25] * 3))


def test_unknown_option_fails_before_any_scan(tmp_path):
    with pytest.raises(DataError, match="--data-option windw: unknown option"):
        build_pretrain_data(tmp_path, DataConfig(options={"windw": "lung"}))


def test_stacked_slices_refuse_a_release_and_single_slices_offer_every_sample(tmp_path, cache_dir):
    """With slices > 1 one slice file sits in up to ``slices`` samples, so one file would move
    several summaries of a release accounted for one: the release view is a refusal naming the
    option. One slice per sample: every sample, in the federation's units when given."""
    root = ct_series(tmp_path / "ct", [-160, -60, 40, 140])
    stacked = build_pretrain_data(root, cfg(cache_dir, size=16, slices=3, **QUIET))
    reason = stacked.release_view(Normalization([0.5] * 3, [0.25] * 3))
    assert isinstance(reason, str) and reason.startswith("medical option slices=3 stacks neighbouring slice files")
    single = build_pretrain_data(root, cfg(cache_dir, size=16, **QUIET))
    plain = single.release_view(None)  # fixed window constants: no site statistics, and no cache
    assert len(plain) == len(single.dataset) and plain.cache is None and single.dataset.cache is not None
    fed = single.release_view(Normalization([0.4], [0.5]))
    torch.manual_seed(0)
    q, _ = single.dataset[2]
    torch.manual_seed(0)
    q_fed, _ = fed[2]
    assert torch.allclose(q_fed, (q * 0.25 + 0.5 - 0.4) / 0.5, atol=1e-6)


def test_a_multi_frame_file_is_one_record_of_a_release(tmp_path, cache_dir):
    """A release reads one random frame of each file, so a 4-frame file moves one released item
    as a single-frame file does; training still sees every frame."""
    from fedmoco.data import OneItemPerRecord
    from fedmoco.privacy import _read_alone

    root = tmp_path / "mf"
    ct_series(root, [-160, -60])  # two single-frame files
    frames = np.stack([np.full((16, 16), hu + 1024, np.uint16) for hu in (0, 100, 200, 300)])
    write_dicom(root / "multi.dcm", frames, bits_stored=12,
                attributes={"Modality": "CT", "RescaleIntercept": -1024, "RescaleSlope": 1})
    data = build_pretrain_data(root, cfg(cache_dir, size=16, **QUIET))
    assert len(data.dataset) == 6  # every frame trains
    view = data.release_view(None)
    assert isinstance(view, OneItemPerRecord) and len(view) == 3  # one item per file
    multi = next(j for j, g in enumerate(view.groups) if len(g) == 4)
    drawn = {round(float(unnormalise(_read_alone(view, multi, seed)[0]).mean()), 3) for seed in range(12)}
    assert len(drawn) > 1  # which frame is the item's own draw
    assert sorted(len(g) for g in view.groups) == [1, 1, 4]
