"""Folder scan, skip reasons, the index cache and the 2.5D sample table."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections import Counter

import numpy as np
import pytest
from pydicom.uid import JPEGExtended12Bit

import domains.medical.index as index_module
from domains.medical import write_dicom
from domains.medical.dataset import index_folder
from domains.medical.index import FileRecord, build_samples, cache_file, scan
from domains.medical.options import MedicalOptions
from fedmoco.data import format_skipped, list_files
from fedmoco.errors import DataError

DEMO_SKIPS = Counter({"no pixel data": 2, "not DICOM": 1, "truncated pixel data": 1})


@pytest.fixture
def archive(demo_archive, tmp_path):
    """A private, writable copy of the demo archive."""
    return shutil.copytree(demo_archive, tmp_path / "archive")


@pytest.fixture
def count_reads(monkeypatch):
    calls = []
    real = index_module.read_header

    def counting(path, *limits):
        calls.append(path.name)
        return real(path, *limits)

    monkeypatch.setattr(index_module, "read_header", counting)
    return calls


def test_scan_finds_every_image_and_counts_skips_by_reason(demo_archive):
    records, skipped = scan(demo_archive, list_files(demo_archive), None)
    assert len(records) == 23 and sum(r.frames for r in records) == 28
    assert skipped == DEMO_SKIPS
    assert format_skipped(skipped) == "skipped 4 files: 2 no pixel data, 1 not DICOM, 1 truncated pixel data"
    assert Counter(r.modality for r in records) == Counter({"CT": 19, "CR": 4})
    multi = [r for r in records if r.frames > 1]
    assert len(multi) == 1 and multi[0].path.endswith("ct_enhanced.dcm") and multi[0].frames == 6
    assert [r.path for r in records] == sorted(r.path for r in records)


def test_cache_avoids_rereading_and_notices_changes(archive, cache_dir, count_reads):
    path = cache_file(archive, cache_dir)
    assert cache_dir in path.parents and archive not in path.parents
    before = sorted(p.name for p in archive.rglob("*"))
    first = scan(archive, list_files(archive), path)
    assert len(count_reads) == 27 and path.is_file()
    assert sorted(p.name for p in archive.rglob("*")) == before  # nothing written into the data
    assert str(archive) not in path.read_text() and str(archive.resolve()) not in path.read_text()
    count_reads.clear()
    assert scan(archive, list_files(archive), path) == first
    assert count_reads == []
    victim = next(archive.rglob("slice_002.dcm"))
    os.utime(victim, ns=(1, 1))  # same size, other mtime
    scan(archive, list_files(archive), path)
    assert count_reads == ["slice_002.dcm"]
    count_reads.clear()
    victim.write_bytes(b"not an image any more")
    records, skipped = scan(archive, list_files(archive), path)
    assert count_reads == ["slice_002.dcm"] and len(records) == 22 and skipped["not DICOM"] == 2


def test_a_file_rewritten_with_its_mtime_put_back_is_read_again(archive, cache_dir, count_reads,
                                                                 rewrite_keeping_mtime):
    path = cache_file(archive, cache_dir)
    scan(archive, list_files(archive), path)
    count_reads.clear()
    rewrite_keeping_mtime(next(archive.rglob("slice_002.dcm")))  # same size and mtime: its ctime moved
    scan(archive, list_files(archive), path)
    assert count_reads == ["slice_002.dcm"]


def test_damaged_index_cache_entries_are_read_again_not_a_traceback(archive, cache_dir, count_reads, caplog):
    """An edited or damaged index cache gave AttributeError / TypeError tracebacks mid-scan, and
    kept giving them until the cache was cleared (found by an audit). Each bad entry is ignored
    and its file read again; the records are as from a clean scan."""
    path = cache_file(archive, cache_dir)
    clean = scan(archive, list_files(archive), path)
    data = json.loads(path.read_text())
    names = sorted(k for k, e in data["files"].items() if "record" in e)
    data["files"][names[0]] = ["garbage"]
    del data["files"][names[1]]["record"]["channels"]
    data["files"][names[2]]["record"]["rows"] = "512"
    data["files"][names[3]]["record"]["positions"] = [1.0, 2.0]  # two positions for one frame
    path.write_text(json.dumps(data))
    count_reads.clear()
    with caplog.at_level(logging.WARNING):
        assert scan(archive, list_files(archive), path) == clean
    assert sorted(count_reads) == sorted(n.rsplit("/", 1)[-1] for n in names[:4])
    assert f"{path}: 4 damaged entries of the index cache ignored; those files were read again" in caplog.text
    data["files"] = ["not", "a", "mapping"]
    path.write_text(json.dumps(data))
    assert scan(archive, list_files(archive), path) == clean


def test_cache_holds_no_patient_identifier(demo_archive, cache_dir):
    path = cache_file(demo_archive, cache_dir)
    scan(demo_archive, list_files(demo_archive), path)
    text = path.read_text()
    assert json.loads(text)["version"] == 2
    for marker in ("Demo^Patient", "DEMO-0", "ACC-DEMO", "19500101", "PatientName"):
        assert marker not in text


def test_missing_decoder_is_not_cached(tmp_path, cache_dir, count_reads):
    pytest.importorskip("gdcm")
    pixels = (np.arange(64 * 64) % 4096).astype(np.uint16).reshape(64, 64)
    write_dicom(tmp_path / "data" / "j12.dcm", pixels, bits_stored=12, transfer_syntax=JPEGExtended12Bit)
    write_dicom(tmp_path / "data" / "ok.dcm", pixels, bits_stored=12)
    root = tmp_path / "data"
    path = cache_file(root, cache_dir)
    for _ in range(2):
        count_reads.clear()
        records, skipped = scan(root, list_files(root), path)
    if importlib.util.find_spec("libjpeg") is not None:
        pytest.skip("the jpeg12 extra is installed: the file decodes")
    # re-read on every scan, so installing the GPL extra later needs no cache clearing
    assert count_reads == ["j12.dcm"] and skipped == Counter({"no decoder": 1}) and len(records) == 1


def test_unwritable_cache_is_reported_and_ignored(demo_archive, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        records, _ = scan(demo_archive, list_files(demo_archive), cache_file(demo_archive, blocker))
    assert len(records) == 23 and "cannot write the index cache" in caplog.text


def test_modality_filter_and_option_cache_dir(demo_archive, cache_dir):
    records, skipped = index_folder(demo_archive, MedicalOptions.parse({"modalities": "CT", "cache_dir": str(cache_dir)}))
    assert {r.modality for r in records} == {"CT"} and skipped["modality not in CT"] == 4
    assert cache_file(demo_archive, cache_dir).is_file()
    records, _ = index_folder(demo_archive, MedicalOptions.parse({"cache": False, "modalities": "CR,MR"}))
    assert len(records) == 4


def test_data_config_cache_settings_govern_the_index_too(demo_archive, tmp_path):
    """DataConfig(cache=False) (--no-cache, check-site) writes no header index; DataConfig's
    cache folder is the index's folder, as it is the sample cache's."""
    from fedmoco.data import DataConfig, build_pretrain_data

    off, on = tmp_path / "off", tmp_path / "on"
    build_pretrain_data("medical", demo_archive, DataConfig(image_size=32, cache=False, cache_dir=str(off)))
    assert not off.exists()
    build_pretrain_data("medical", demo_archive, DataConfig(image_size=32, cache_dir=str(on)))
    assert cache_file(demo_archive, on).is_file() and cache_file(demo_archive, on).parent.parent == on


def test_folders_without_usable_images_are_data_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data folder is empty"):
        index_folder(tmp_path / "empty", MedicalOptions(cache=False))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no usable DICOM image among 1 files; skipped 1 files: 1 not DICOM"):
        index_folder(tmp_path / "junk", MedicalOptions(cache=False))


def rec(path, frames=1, series=None, positions=(None,), instance=None, rows=4) -> FileRecord:
    return FileRecord(path=path, modality="CT", frames=frames, rows=rows, columns=4, channels=1,
                      series=series, positions=positions, instance=instance)


def test_samples_one_per_frame():
    records = [rec("a", frames=3, positions=(0.0, 1.0, 2.0)), rec("b")]
    assert build_samples(records, 1)[:, 0].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]


def test_25d_neighbours_by_slice_position():
    records = [
        rec("s10", series="A", positions=(10.0,)),  # file order is not slice order
        rec("s0", series="A", positions=(0.0,)),
        rec("s5", series="A", positions=(5.0,)),
        rec("mf", frames=2, positions=(7.0, 3.0)),  # a multi-frame stack of its own, descending z
        rec("cr"),  # no series: a stack of one
        rec("other_size", series="A", positions=(2.0,), rows=8),  # same series, other size
    ]
    samples = build_samples(records, 3)
    assert samples.shape == (7, 3, 2)
    rows = {tuple(s[1]): [tuple(c) for c in s] for s in samples.tolist()}
    assert rows[(0, 0)] == [(2, 0), (0, 0), (0, 0)]  # z 5, 10, 10 (edge repeated)
    assert rows[(1, 0)] == [(1, 0), (1, 0), (2, 0)]  # z 0, 0, 5
    assert rows[(2, 0)] == [(1, 0), (2, 0), (0, 0)]  # z 0, 5, 10
    assert rows[(3, 0)] == [(3, 1), (3, 0), (3, 0)]  # frame 0 is z 7: its lower neighbour is frame 1
    assert rows[(4, 0)] == [(4, 0)] * 3
    assert rows[(5, 0)] == [(5, 0)] * 3
    assert [s[1] for s in samples.tolist()] == [[0, 0], [1, 0], [2, 0], [3, 0], [3, 1], [4, 0], [5, 0]]


def test_25d_falls_back_to_instance_number():
    records = [rec("x", series="B", instance=2), rec("y", series="B", instance=1), rec("z", series="B", instance=3)]
    samples = build_samples(records, 3)
    assert [tuple(c) for c in samples[0].tolist()] == [(1, 0), (0, 0), (2, 0)]
