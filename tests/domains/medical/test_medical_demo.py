"""The synthetic hospital archive: deterministic, varied, and as messy as promised."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pydicom

from domains.medical import DicomReadError, make_demo_archive, read_dicom
from domains.medical.demo import PHANTOMS, demo_syntaxes


def files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_same_seed_same_bytes_other_seed_other_hospital(tmp_path):
    start = time.perf_counter()
    a = make_demo_archive(tmp_path / "a", seed=3)
    assert time.perf_counter() - start < 5.0
    b = make_demo_archive(tmp_path / "b", seed=3)
    c = make_demo_archive(tmp_path / "c", seed=4)
    assert [p.relative_to(a) for p in files(a)] == [p.relative_to(b) for p in files(b)]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(files(a), files(b)))
    pa, pc = a / "patient_00" / "cr" / "IM0001", c / "patient_00" / "cr" / "IM0001"
    assert not np.array_equal(read_dicom(pa).pixels, read_dicom(pc).pixels)


def test_contents_cover_syntaxes_photometrics_and_failures(demo_archive):
    images, failures = [], Counter()
    for path in files(demo_archive):
        try:
            images.append(read_dicom(path))
        except DicomReadError as err:
            failures[err.reason] += 1
    assert failures == Counter({"no pixel data": 2, "not DICOM": 1, "truncated pixel data": 1})
    assert {img.transfer_syntax for img in images} == set(demo_syntaxes())
    cr = [img for img in images if img.modality == "CR"]
    assert len(cr) == 4 and {img.photometric_interpretation for img in cr} == {"MONOCHROME1"}
    assert any(img.number_of_frames == 6 and img.modality == "CT" for img in images)
    ct = np.concatenate([img.pixels.ravel() for img in images if img.modality == "CT"])
    assert ct.min() >= -1024 and (ct < -950).mean() > 0.2 and (ct > 500).any()  # air and bone in HU
    signed = {pydicom.dcmread(img.path, stop_before_pixels=True).PixelRepresentation for img in images
              if img.modality == "CT"}
    assert signed == {0, 1}  # both storage conventions, both rescaled to HU


def test_phantom_classes_differ_visibly(labelled_archive):
    """A crude rule on HU fractions tells the three phantoms apart: there is something to learn."""
    for folder in labelled_archive.iterdir():
        if folder.name not in PHANTOMS:
            continue
        for patient in folder.iterdir():
            volume = np.concatenate([read_dicom(p).pixels.ravel() for p in patient.rglob("*.dcm")])
            lung, bone = ((volume > -950) & (volume < -700)).mean(), (volume > 800).mean()
            guess = "head" if bone > 0.05 else "chest" if lung > 0.05 else "abdomen"
            assert guess == folder.name, (patient, lung, bone)


def test_labelled_layout(labelled_archive):
    top = sorted(p.name for p in labelled_archive.iterdir())
    assert top == ["abdomen", "chest", "head", "unsorted"]
    assert len(list((labelled_archive / "chest").iterdir())) == 2
    assert {p.name for p in (labelled_archive / "unsorted").iterdir()} == {
        "export_log.txt", "report_sr.dcm", "rtplan.dcm", "truncated.dcm"}
