"""Small DICOM files whose headers ask for gigabytes are refused from the header, and the
refusal itself costs next to no memory (peak RSS measured in a fresh subprocess).

Each file is generated here:

* RLE Lossless, Rows = Columns = 65535, NumberOfFrames = 1000 (one 66-byte fragment per frame);
* JPEG-LS, 16000 x 16000 x 12 bit: a real 16 x 16 JPEG-LS codestream whose frame header
  (SOF55) is patched to 16000 x 16000, so a decoder would allocate the whole image;
* NumberOfFrames = 2,000,000 with 16 x 16 RLE frames in a file of under 1 KB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, JPEGLSLossless, RLELossless, generate_uid

from domains.medical.demo import write_dicom
from domains.medical.index import scan
from domains.medical.options import MedicalOptions
from domains.medical.reader import INCONSISTENT, TOO_LARGE, DicomLimits, DicomReadError, read_dicom, read_header

ROOT = Path(__file__).resolve().parents[3]
PEAK_MB = 150  # what refusing one bomb may add to a process's peak RSS


def encapsulated(path: Path, syntax: str, rows: int, columns: int, frames: int, fragments: list[bytes],
                 bits: int = 16) -> Path:
    """A Part-10 file with encapsulated pixel data (one fragment per frame) and this header."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = encapsulate(fragments, has_bot=False)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def rle_frame() -> bytes:
    """One RLE frame: the 64-byte header (1 segment at offset 64) and a 2-byte segment."""
    header = np.zeros(16, "<u4")
    header[:2] = (1, 64)
    return header.tobytes() + bytes([0x81, 0])  # "repeat the next byte 128 times"


def rle_bomb(folder: Path) -> Path:
    return encapsulated(folder / "rle-65535.dcm", RLELossless, 65535, 65535, 1000, [rle_frame()] * 1000)


def jpegls_bomb(folder: Path) -> Path:
    import jpeg_ls

    small = np.zeros((16, 16), np.uint16)
    small[0, 0] = 4095  # 12-bit samples
    stream = bytearray(jpeg_ls.encode(small).tobytes())
    sof = stream.index(b"\xff\xf7")  # SOF55: length(2) precision(1) height(2) width(2)
    stream[sof + 5:sof + 9] = (16000).to_bytes(2, "big") * 2
    return encapsulated(folder / "jpegls-16000.dcm", JPEGLSLossless, 16000, 16000, 1, [bytes(stream)])


def frames_bomb(folder: Path) -> Path:
    return encapsulated(folder / "frames-2m.dcm", RLELossless, 16, 16, 2_000_000, [rle_frame()] * 4)


BOMBS = {"rle": rle_bomb, "jpegls": jpegls_bomb, "frames": frames_bomb}


def peak_delta_mb(code: str) -> tuple[float, dict]:
    """Run ``code`` in a fresh interpreter after the imports; (peak RSS it added in MB, its result).

    ``code`` sets ``result`` (JSON-able). ru_maxrss is the process's peak, so the delta over
    the value after imports is what ``code`` needed at its worst moment.
    """
    script = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from domains.medical.reader import DicomReadError, read_dicom, read_header
        from domains.medical.index import scan
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = None
    """) + textwrap.dedent(code) + textwrap.dedent("""
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"delta_mb": (after - before) / 1024, "result": result}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return data["delta_mb"], data["result"]


def test_rle_65535_squared_by_1000_is_refused_by_read_header(tmp_path):
    path = rle_bomb(tmp_path)
    assert path.stat().st_size < 100_000
    with pytest.raises(DicomReadError) as err:
        read_header(path)
    assert err.value.reason == TOO_LARGE
    assert "NumberOfFrames 1000" not in str(err.value)  # 1000 frames are allowed; the frame size is not
    assert str(err.value) == (f"{path}: too large: Rows x Columns = 65535 x 65535 = 4294836225 pixels per frame "
                              f"is over max_frame_pixels 33554432")


def test_jpegls_16000_squared_is_refused_before_decoding(tmp_path):
    path = jpegls_bomb(tmp_path)
    assert path.stat().st_size < 3000
    with pytest.raises(DicomReadError) as err:
        read_dicom(path)
    assert err.value.reason == TOO_LARGE and "16000 x 16000 = 256000000 pixels" in str(err.value)
    # Raising max_frame_pixels alone is not enough: one frame would need 16000**2 x (2 + 4) bytes.
    with pytest.raises(DicomReadError) as err:
        read_dicom(path, limits=DicomLimits(max_frame_pixels=10**9))
    assert err.value.reason == TOO_LARGE
    assert "decoding 1 frame(s) needs 1465 MiB, over max_decoded_mb 512" in str(err.value)


def test_two_million_frames_in_a_tiny_file_are_refused_at_index_time(tmp_path):
    path = frames_bomb(tmp_path)
    assert path.stat().st_size < 1000
    with pytest.raises(DicomReadError) as err:
        read_header(path)
    assert err.value.reason == TOO_LARGE and "NumberOfFrames 2000000 is over max_frames 10000" in str(err.value)
    # With the frame cap lifted, the file still cannot hold what it claims.
    with pytest.raises(DicomReadError) as err:
        read_header(path, DicomLimits(max_frames=10**7))
    assert err.value.reason == INCONSISTENT
    assert "NumberOfFrames 2000000 cannot fit in" in str(err.value)


def test_refusing_bombs_keeps_memory_bounded(tmp_path):
    """Every bomb read as a sample, then the folder indexed, in one fresh process (one import
    of the medical stack): the peak RSS they add together stays under PEAK_MB."""
    folder = tmp_path / "archive"
    folder.mkdir()
    paths = [str(make(folder)) for make in BOMBS.values()]
    write_dicom(folder / "good.dcm", np.zeros((32, 32), np.uint16))
    delta, result = peak_delta_mb(f"""
        from pathlib import Path
        reasons = []
        for path in {paths!r}:
            try:
                read_dicom(path)
            except DicomReadError as exc:
                reasons.append(exc.reason)
        root = Path({str(folder)!r})
        records, skipped = scan(root, sorted(root.iterdir()), None)
        result = [reasons, [r.path for r in records], dict(skipped)]
    """)
    assert result == [[TOO_LARGE] * 3, ["good.dcm"], {TOO_LARGE: 3}]
    assert delta < PEAK_MB, f"+{delta:.0f} MB"


def test_limits_are_data_options_and_reach_the_index(tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    write_dicom(folder / "mf.dcm", np.zeros((5, 16, 16), np.uint16))
    write_dicom(folder / "one.dcm", np.zeros((16, 16), np.uint16))
    opts = MedicalOptions.parse({"max_frames": "4", "max_frame_pixels": 4096, "max_decoded_mb": "1"})
    assert opts.limits == DicomLimits(4096, 4, 1.0)
    cache = tmp_path / "cache.json"
    records, skipped = scan(folder, sorted(folder.iterdir()), cache, opts.limits)
    assert [r.path for r in records] == ["one.dcm"] and skipped == Counter({TOO_LARGE: 1})
    # The cache remembers its limits: looser ones re-read the headers instead of trusting old skips.
    records, skipped = scan(folder, sorted(folder.iterdir()), cache, DicomLimits())
    assert [r.path for r in records] == ["mf.dcm", "one.dcm"] and not skipped
    with pytest.raises(Exception) as err:
        MedicalOptions.parse({"max_decoded_mb": "0"})
    assert str(err.value) == "--data-option max_decoded_mb=0.0: must be > 0"


def test_each_frame_read_of_a_multiframe_file_validates_its_header_once(tmp_path, monkeypatch):
    import domains.medical.reader as reader

    path = write_dicom(tmp_path / "mf.dcm", np.arange(6 * 8 * 8, dtype=np.uint16).reshape(6, 8, 8))
    calls = []
    original = reader._validate
    monkeypatch.setattr(reader, "_validate", lambda *a, **k: calls.append(1) or original(*a, **k))
    frames = [read_dicom(path, [f]).pixels[0, 0] for f in range(6)]
    assert len(calls) == 1
    assert all(np.array_equal(frames[f], np.arange(f * 64, (f + 1) * 64).reshape(8, 8)) for f in range(6))
    path.write_bytes(path.read_bytes())  # a rewritten file (new mtime) is validated again
    import os
    os.utime(path, ns=(1, 1))
    read_dicom(path, [0])
    assert len(calls) == 2
