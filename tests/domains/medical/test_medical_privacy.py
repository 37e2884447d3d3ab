"""No patient identifier leaves the loader: train and evaluate on identifier-bearing DICOMs,
then search every byte the run wrote (logs, metrics, checkpoint, plots, index cache)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pydicom
import pytest

from domains.medical import make_demo_archive, write_dicom
from fedmoco.cli import main

IDENTIFIERS = {
    "PatientName": "Quixote^Dulcinea^Toboso",
    "PatientID": "PID-5521973-X",
    "PatientBirthDate": "19510823",
    "AccessionNumber": "ACC7734119Q",
}
# What must never appear: each value, and each component of the name. Each patient's
# PatientID is IDENTIFIERS["PatientID"] plus its folder number, so the needle is a prefix of
# every stamped ID, and knn / linear-probe still see one group per patient (one shared ID
# would make the whole archive one patient, which their grouped split rightly refuses).
NEEDLES = sorted({*IDENTIFIERS.values(), "Quixote", "Dulcinea", "Toboso"})


def identifiers_for(path) -> dict[str, str]:
    """IDENTIFIERS, with the PatientID of the patient_NN folder ``path`` sits in (99 outside one)."""
    patient = next((part.removeprefix("patient_") for part in path.parts if part.startswith("patient_")), "99")
    return {**IDENTIFIERS, "PatientID": IDENTIFIERS["PatientID"] + patient}


def stamp_identifiers(root) -> int:
    """Put IDENTIFIERS into every DICOM object under ``root``; return how many were stamped."""
    stamped = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name == "truncated.dcm":  # cannot be re-saved: write a fresh cut-off one
            pixels = np.full((64, 64), 1000, np.uint16)
            write_dicom(path, pixels, attributes={"Modality": "CT", **identifiers_for(path)})
            path.write_bytes(path.read_bytes()[:-3000])
            stamped += 1
            continue
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        for keyword, value in identifiers_for(path).items():
            setattr(ds, keyword, value)
        ds.save_as(path)
        stamped += 1
    return stamped


@pytest.fixture
def log_sink():
    """Every record of fedmoco, the domains and pydicom at DEBUG, whatever the CLI configures."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    loggers = [logging.getLogger(n) for n in ("fedmoco", "domains", "pydicom")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield stream
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_no_identifier_in_anything_a_run_writes(tmp_path, tiny_pretrain_args, capsys, log_sink):
    # Two patients per class folder: the grouped split needs each class in two patient groups.
    data = make_demo_archive(tmp_path / "hospital", n_patients=6, labelled=True)
    assert stamp_identifiers(data) == 5 * 6 + 1 + 6 + 3  # 5 CT series, 1 multi-frame, 6 CR, 3 junk
    # positive control: the search finds them where they are
    assert all(n.encode() in next(data.rglob("IM0001")).read_bytes() for n in IDENTIFIERS.values())

    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["pretrain", "--domain", "medical", "--data", str(data), "--out", str(run),
                 *tiny_pretrain_args, "--data-option", f"cache_dir={cache}"]) == 0
    assert main(["knn", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(data), "--k", "5"]) == 0
    assert main(["linear-probe", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(data),
                 "--epochs", "2"]) == 0

    written = sorted(p for d in (run, cache) for p in d.rglob("*") if p.is_file())
    names = {p.name for p in written}
    assert {"checkpoint.pt", "metrics.jsonl", "config.json", "loss.png", "knn.json"} <= names
    assert any(p.suffix == ".json" and "medical-index" in p.parts for p in written)
    captured = capsys.readouterr()
    texts = {"stdout": captured.out, "stderr": captured.err, "log records": log_sink.getvalue()}
    assert "skipped 4 files" in texts["stderr"] + texts["log records"]
    for needle in NEEDLES:
        for path in written:
            assert needle.encode() not in path.read_bytes(), f"{needle!r} leaked into {path}"
            assert needle.encode("utf-16-le") not in path.read_bytes(), f"{needle!r} leaked into {path}"
        for where, text in texts.items():
            assert needle not in text, f"{needle!r} leaked into {where}"
