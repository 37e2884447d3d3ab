"""read_dicom on generated files: modality units, every writable syntax, every error reason."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.pixels.decoders import JPEGLSLosslessDecoder
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    RTPlanStorage,
    SecondaryCaptureImageStorage,
)

from domains.medical import DicomImage, DicomReadError, read_dicom, read_header, write_dicom
from domains.medical.demo import WRITABLE_SYNTAXES, _item, write_non_image
from fedmoco.errors import DataError
from pydicom.sequence import Sequence as DicomSequence

_y, _x = np.mgrid[0:64, 0:64]
RAMP = (_x * 40 + _y * 24).astype(np.uint16)  # smooth 12-bit test card, 0 .. 4032
IDENTIFIERS = {"PatientName": "Quixote^Dulcinea", "PatientID": "PID-5521973",
               "PatientBirthDate": "19510823", "AccessionNumber": "ACC7734119"}


def ct(path: Path, pixels=RAMP, **kw) -> Path:
    attrs = {"Modality": "CT", "RescaleSlope": 1, "RescaleIntercept": -1024, **IDENTIFIERS,
             **kw.pop("attributes", {})}
    return write_dicom(path, pixels, bits_stored=kw.pop("bits_stored", 12), attributes=attrs, **kw)


def patch_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1, f"{old!r} occurs {data.count(old)} times"
    path.write_bytes(data.replace(old, new))


# ------------------------------------------------------------------ values and units


def test_ct_rescale_gives_hounsfield_units(tmp_path):
    raw = np.zeros((4, 4), np.uint16)
    raw[0, :4] = [0, 1024, 1064, 4095]
    img = read_dicom(ct(tmp_path / "a.dcm", raw))
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (1, 1, 4, 4)
    assert img.pixels[0, 0, 0].tolist() == [-1024.0, 0.0, 40.0, 3071.0]  # raw - 1024
    assert img.value_range == (-1024.0, 3071.0)


def test_non_unit_slope_and_signed_storage(tmp_path):
    raw = np.array([[-2000, -1, 0, 10]], np.int16)
    img = read_dicom(ct(tmp_path / "s.dcm", raw, bits_stored=16,
                        attributes={"RescaleSlope": 2.5, "RescaleIntercept": -100}))
    assert img.pixels[0, 0, 0].tolist() == [-5100.0, -102.5, -100.0, -75.0]  # raw*2.5 - 100
    assert img.value_range == (-32768 * 2.5 - 100, 32767 * 2.5 - 100)


def test_monochrome1_is_inverted_within_the_stored_range(tmp_path):
    raw = np.array([[0, 100, 4095, 2048]], np.uint16)
    path = write_dicom(tmp_path / "cr", raw, photometric="MONOCHROME1", bits_stored=12,
                       sop_class=ComputedRadiographyImageStorage,
                       attributes={"Modality": "CR", "WindowCenter": 1000, "WindowWidth": 500})
    img = read_dicom(path)
    assert img.pixels[0, 0, 0].tolist() == [4095.0, 3995.0, 0.0, 2047.0]  # 4095 - raw
    assert img.photometric_interpretation == "MONOCHROME1"
    assert (img.window_center, img.window_width) == (3095.0, 500.0)  # centre reflected too


def test_monochrome1_with_rescale_reflects_in_output_units(tmp_path):
    raw = np.array([[100, 0]], np.uint16)
    path = write_dicom(tmp_path / "cr.dcm", raw, photometric="MONOCHROME1", bits_stored=12,
                       attributes={"Modality": "DX", "RescaleSlope": 2, "RescaleIntercept": -10})
    # range -10 .. 8180; raw 100 -> 190 -> (-10 + 8180) - 190
    assert read_dicom(path).pixels[0, 0, 0].tolist() == [7980.0, 8180.0]


def test_a_window_of_zero_width_is_no_window(tmp_path):
    """WindowWidth 0 selects nothing: the file reads as having no window of its own (None),
    so the dataset falls back to its other window (CT preset or percentiles)."""
    img = read_dicom(ct(tmp_path / "w0.dcm", attributes={"WindowCenter": 40, "WindowWidth": 0}))
    assert (img.window_center, img.window_width) == (None, None) and img.window(0) is None


def _float_map(pixels: np.ndarray, photometric: str = "MONOCHROME2") -> "pydicom.Dataset":
    """A one-frame Parametric Map (FloatPixelData, no stored range) holding ``pixels`` (float32)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ParametricMapStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ParametricMapStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "MR", photometric, 1
    ds.Rows, ds.Columns, ds.BitsAllocated = *pixels.shape, 32
    ds.FloatPixelData = np.asarray(pixels, "<f4").tobytes()
    return ds


def test_monochrome1_float_pixels_reflect_the_window_centre_by_negation(tmp_path):
    """Float MONOCHROME1 has no stored range, so pixels are inverted by negation, and the
    window's centre must be too (100 -> -100) to select the same tissue."""
    ds = _float_map(np.array([[90, 110]]), "MONOCHROME1")
    ds.WindowCenter, ds.WindowWidth = 100, 50
    path = tmp_path / "map.dcm"
    ds.save_as(path, enforce_file_format=True)
    img = read_dicom(path)
    assert img.pixels[0, 0, 0].tolist() == [-90.0, -110.0]
    assert (img.window_center, img.window_width) == (-100.0, 50.0)


def _lut(bits: int = 16) -> "pydicom.Dataset":
    lut = _item(LUTDescriptor=[4096, 0, bits], ModalityLUTType="US",
                LUTData=(np.arange(4096) * 2).astype(np.uint16).tobytes())  # stored x -> 2x
    lut["LUTData"].VR = "OW"
    return lut


def test_monochrome1_through_a_modality_lut_reflects_within_the_lut_output_range(tmp_path):
    # The reflection must not depend on the image's content: stored 150 is the same output
    # in both files, and the window centre is reflected by the same map as the pixels.
    out = []
    for name, raw in (("a", [[0, 150, 2000, 4095]]), ("b", [[100, 150, 200, 200]])):
        path = write_dicom(tmp_path / f"{name}.dcm", np.array(raw, np.uint16), photometric="MONOCHROME1",
                           bits_stored=12, sop_class=ComputedRadiographyImageStorage,
                           attributes={"Modality": "CR", "ModalityLUTSequence": DicomSequence([_lut()]),
                                       "WindowCenter": 4000, "WindowWidth": 2000})
        out.append(read_dicom(path))
    a, b = out
    assert a.value_range == b.value_range == (0.0, 65535.0)  # the LUT's 16-bit entries
    assert a.pixels[0, 0, 0].tolist() == [65535.0, 65235.0, 61535.0, 57345.0]  # 65535 - 2 * stored
    assert a.pixels[0, 0, 0, 1] == b.pixels[0, 0, 0, 1]
    assert (a.window_center, a.window_width) == (61535.0, 2000.0)
    c, w = a.window_center, a.window_width  # stored 2000 -> LUT 4000, the file's window centre: 0.5
    assert np.clip((a.pixels[0, 0, 0] - (c - w / 2)) / w, 0, 1).tolist() == [1.0, 1.0, 0.5, 0.0]


def test_modality_luts_of_12_bit_and_of_8_bit_packed_entries_read_by_hand(tmp_path):
    """pydicom's apply_modality_lut builds uint{bits}: 12-bit entries failed ('uint12' not
    understood), and 8-bit entries packed one a byte in OW were read as 16-bit words. Both files
    were indexed as usable and then failed on every read (found by an audit)."""
    raw = np.array([[0, 5, 150, 4095]], np.uint16)
    twelve = _item(LUTDescriptor=[256, 0, 12], ModalityLUTType="US",
                   LUTData=(np.arange(256) * 16).astype("<u2").tobytes())
    eight = _item(LUTDescriptor=[256, 0, 8], ModalityLUTType="US", LUTData=(255 - np.arange(256)).astype(np.uint8).tobytes())
    for lut in (twelve, eight):
        lut["LUTData"].VR = "OW"
    for name, lut, want, value_range in (("12", twelve, [0, 80, 2400, 4080], (0.0, 4095.0)),
                                         ("8", eight, [255, 250, 105, 0], (0.0, 255.0))):
        path = write_dicom(tmp_path / f"{name}.dcm", raw, bits_stored=12, sop_class=ComputedRadiographyImageStorage,
                           attributes={"Modality": "CR", "ModalityLUTSequence": DicomSequence([lut])})
        assert read_header(path).value_range == value_range
        img = read_dicom(path)  # beyond the table's 256 entries: its last entry (PS3.3 C.11.1)
        assert img.pixels[0, 0, 0].tolist() == want
    short = _item(LUTDescriptor=[256, 0, 16], ModalityLUTType="US", LUTData=b"\x00\x01" * 10)
    short["LUTData"].VR = "OW"
    path = write_dicom(tmp_path / "short.dcm", raw, bits_stored=12, sop_class=ComputedRadiographyImageStorage,
                       attributes={"Modality": "CR", "ModalityLUTSequence": DicomSequence([short])})
    with pytest.raises(DicomReadError, match="Modality LUT of 256 entries of 16 bits does not match its data"):
        read_header(path)  # refused at index time, not on every read


def test_enhanced_monochrome1_with_per_frame_rescale_keeps_each_frame_in_its_window(tmp_path):
    stored = np.stack([np.array([[0, 600, 700, 800, 4095]], np.uint16)] * 2)
    per_frame = [_item(PixelValueTransformationSequence=DicomSequence(
        [_item(RescaleSlope=1 + f, RescaleIntercept=100 * f)])) for f in range(2)]
    shared = _item(FrameVOILUTSequence=DicomSequence([_item(WindowCenter=1000, WindowWidth=1000)]))
    path = write_dicom(tmp_path / "xa.dcm", stored, photometric="MONOCHROME1", bits_stored=12,
                       sop_class=EnhancedCTImageStorage,
                       attributes={"Modality": "XA", "SharedFunctionalGroupsSequence": DicomSequence([shared]),
                                   "PerFrameFunctionalGroupsSequence": DicomSequence(per_frame)})
    img = read_dicom(path)
    c, w = img.window(1)
    for f in range(2):
        units = stored[f, 0].astype(float) * (1 + f) + 100 * f
        expected = 1 - np.clip((units - 500) / 1000, 0, 1)  # window 1000/1000, then inverted
        np.testing.assert_allclose(np.clip((img.pixels[f, 0, 0] - (c - w / 2)) / w, 0, 1), expected, atol=1e-6)


def test_each_frame_keeps_its_own_voi_window(tmp_path):
    frames = np.stack([np.array([[1024, 1324, 1524, 1724, 2024]], np.uint16)] * 2)  # 0..1000 HU
    per_frame = [_item(PixelValueTransformationSequence=DicomSequence([_item(RescaleSlope=1, RescaleIntercept=-1024)]),
                       FrameVOILUTSequence=DicomSequence([_item(WindowCenter=c, WindowWidth=w)]))
                 for c, w in ((40, 400), (500, 1000))]
    path = write_dicom(tmp_path / "enh.dcm", frames, sop_class=EnhancedCTImageStorage, bits_stored=12,
                       attributes={"Modality": "CT", "PerFrameFunctionalGroupsSequence": DicomSequence(per_frame)})
    header = read_header(path)
    assert (header.window(0), header.window(1)) == ((40.0, 400.0), (500.0, 1000.0))
    assert (header.window_center, header.window_width) == (40.0, 400.0)  # the first frame's
    from domains.medical import MedicalOptions
    from domains.medical.dataset import _DicomSamples
    from domains.medical.index import FileRecord

    record = FileRecord.from_header("enh.dcm", header)
    samples = _DicomSamples(tmp_path, [record], np.array([[[0, 0]], [[0, 1]]]), MedicalOptions(ct_window="file"))
    assert [samples.load(i)["window"] for i in (0, 1)] == [(40.0, 400.0), (500.0, 1000.0)]


def test_float_pixel_data_with_nan_is_refused(tmp_path):
    ds = _float_map(np.array([[0, 1, 2, np.nan], [0, 1, 2, 3]]))
    path = tmp_path / "map.dcm"
    ds.save_as(path, enforce_file_format=True)
    expect(path, "inconsistent attributes", "float pixel data holds NaN or infinite values", header_too=False)
    ds.FloatPixelData = np.array([[0, 1, 2, 3e38], [0, 1, 2, 3]], "<f4").tobytes()  # finite, but its span is not
    ds.save_as(path, enforce_file_format=True)
    expect(path, "inconsistent attributes", "float pixel data holds values beyond +-1e+30", header_too=False)
    ds.FloatPixelData = np.array([[0, 1, 2, 5], [0, 1, 2, 3]], "<f4").tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"  # no representable range: inverted by negation
    ds.save_as(path, enforce_file_format=True)
    assert read_dicom(path).pixels[0, 0, 0].tolist() == [0.0, -1.0, -2.0, -5.0]


@pytest.mark.parametrize("slope, intercept, reach", [
    ("1", "1e39", "[1e+39, 1e+39]"),  # finite as a Python float, inf as float32: every pixel inf
    ("1e34", "0", "[-3.28e+38, 3.28e+38]"),  # finite pixels, but their percentile span overflows
])
def test_a_rescale_beyond_float32_arithmetic_is_refused_by_the_header(tmp_path, slope, intercept, reach):
    """A forged rescale made every view, and so the loss, NaN, which stopped the whole run;
    now the file is refused at the scan like any inconsistent header, and skipped."""
    raw = np.array([[-32768, 0, 100, 32767]], np.int16)
    path = write_dicom(tmp_path / "mr.dcm", raw, attributes={"Modality": "MR", "RescaleSlope": slope,
                                                              "RescaleIntercept": intercept})
    expect(path, "inconsistent attributes", f"RescaleSlope {float(slope):g}, RescaleIntercept {float(intercept):g}",
           f"to {reach}, beyond +-1e+30")


def test_a_window_beyond_float32_arithmetic_reads_as_none(tmp_path):
    """Centre 1e39 with width 1e39 gave inf - inf = NaN in every windowed pixel; such a window
    is unusable, so the file windows by percentiles as one without a window does."""
    raw = np.array([[0, 100, 200, 300]], np.int16)
    path = write_dicom(tmp_path / "mr.dcm", raw, attributes={"Modality": "MR", "WindowCenter": "1e39",
                                                              "WindowWidth": "1e39"})
    assert (read_header(path).window_center, read_header(path).window_width) == (None, None)
    path = write_dicom(tmp_path / "ok.dcm", raw, attributes={"Modality": "MR", "WindowCenter": "150",
                                                              "WindowWidth": "300"})
    assert (read_header(path).window_center, read_header(path).window_width) == (150.0, 300.0)


def test_a_window_narrower_than_float32_can_divide_by_reads_as_none(tmp_path):
    """WindowWidth 1e-300 is 0 in float32: a pixel at the centre became 0 / 0 = NaN and one such
    file stopped a whole run at step 0 (found by an audit). It windows by percentiles instead."""
    from domains.medical.base import to_base
    from domains.medical.options import MedicalOptions

    raw = np.array([[2000, 2000, 100, 300]], np.int16)
    path = write_dicom(tmp_path / "mr.dcm", raw, attributes={"Modality": "MR", "WindowCenter": "2000",
                                                              "WindowWidth": "1e-300"})
    assert (read_header(path).window_center, read_header(path).window_width) == (None, None)
    img = read_dicom(path)
    base, _ = to_base({"image": img.pixels[0].astype(np.float32), "window": img.window(0)},
                      MedicalOptions.parse({"window": "file"}), 8)
    assert np.isfinite(base).all()
    path = write_dicom(tmp_path / "narrow.dcm", raw, attributes={"Modality": "MR", "WindowCenter": "2000",
                                                                  "WindowWidth": "0.001"})
    assert read_header(path).window_width == 0.001  # narrow but usable stays the file's


def test_pixel_padding_reads_as_the_darkest_real_pixel(tmp_path):
    raw = np.array([[4000, 300, 250, 4000], [4000, 500, 350, 4095]], np.uint16)  # MR, padding 4000..4095
    path = write_dicom(tmp_path / "mr.dcm", raw, bits_stored=12,
                       attributes={"Modality": "MR", "PixelPaddingValue": 4000, "PixelPaddingRangeLimit": 4095})
    assert read_dicom(path).pixels[0, 0].tolist() == [[250, 300, 250, 250], [250, 500, 350, 250]]
    path = write_dicom(tmp_path / "one.dcm", raw, bits_stored=12,
                       attributes={"Modality": "MR", "PixelPaddingValue": 4000})
    assert read_dicom(path).pixels[0, 0].tolist() == [[250, 300, 250, 250], [250, 500, 350, 4095]]
    cr = write_dicom(tmp_path / "cr.dcm", raw, bits_stored=12, photometric="MONOCHROME1",
                     attributes={"Modality": "CR", "PixelPaddingValue": 4000, "PixelPaddingRangeLimit": 4095})
    # inverted first (4095 - x), then padding takes the darkest displayed value: 4095 - 500
    assert read_dicom(cr).pixels[0, 0].tolist() == [[3595, 3795, 3845, 3595], [3595, 3595, 3745, 3595]]


def test_big_endian_file_gives_native_float32(tmp_path):
    raw = np.array([[-1000, 0, 1000, 1234]], np.int16)
    path = ct(tmp_path / "be.dcm", raw, transfer_syntax=ExplicitVRBigEndian, bits_stored=16,
              attributes={"RescaleIntercept": 0})
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    img = read_dicom(path)
    assert img.pixels.dtype == np.dtype(np.float32) and img.pixels.dtype.isnative
    assert img.pixels[0, 0, 0].tolist() == [-1000.0, 0.0, 1000.0, 1234.0]


LOSSY = {JPEG2000: 60.0, JPEGLSNearLossless: 2.0, JPEGBaseline8Bit: 4.0}  # max error allowed


@pytest.mark.parametrize("syntax", [s for s in WRITABLE_SYNTAXES if s != JPEGExtended12Bit],
                         ids=lambda s: s.name)
def test_every_writable_transfer_syntax_reads_back(tmp_path, syntax):
    """All but 12-bit JPEG Extended (next test): it needs the opt-in GPL decoder."""
    eight_bit = syntax == JPEGBaseline8Bit
    raw = (RAMP // 16).astype(np.uint8) if eight_bit else RAMP
    path = ct(tmp_path / "x.dcm", raw, transfer_syntax=syntax, bits_stored=8 if eight_bit else 12)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    img = read_dicom(path)
    expected = raw.astype(np.float32) - 1024
    assert img.pixels.shape == (1, 1, 64, 64)
    assert img.transfer_syntax == syntax
    np.testing.assert_allclose(img.pixels[0, 0], expected, atol=LOSSY.get(syntax, 0.0))
    if syntax in LOSSY:
        assert np.abs(img.pixels[0, 0] - expected).mean() < 0.6 * LOSSY[syntax]


def test_12_bit_jpeg_names_the_gpl_extra(tmp_path):
    pytest.importorskip("gdcm")
    path = ct(tmp_path / "j12.dcm", transfer_syntax=JPEGExtended12Bit)
    try:
        import libjpeg  # noqa: F401  (installed only with the opt-in extra)
    except ImportError:
        with pytest.raises(DicomReadError) as err:
            read_dicom(path)
        assert err.value.reason == "no decoder"
        assert "1.2.840.10008.1.2.4.51" in str(err.value) and "12-bit" in str(err.value)
        assert "pylibjpeg-libjpeg" in str(err.value) and "fedmoco[jpeg12]" in str(err.value)
    else:
        assert read_dicom(path).pixels.shape == (1, 1, 64, 64)


def test_multiframe_subset_in_requested_order(tmp_path):
    frames = np.stack([np.full((8, 8), 1024 + 100 * f, np.uint16) for f in range(4)])
    path = ct(tmp_path / "mf.dcm", frames)
    img = read_dicom(path, frames=[3, 0])
    assert img.number_of_frames == 4 and img.frames == (3, 0)
    assert img.pixels.shape == (2, 1, 8, 8)
    assert img.pixels[:, 0, 0, 0].tolist() == [300.0, 0.0]
    assert read_dicom(path).pixels[:, 0, 0, 0].tolist() == [0.0, 100.0, 200.0, 300.0]


def test_large_native_multiframe_is_read_frame_by_frame_from_disk(tmp_path):
    frames = np.stack([np.full((200, 200), 1024 + f, np.uint16) for f in range(6)])  # 480 KB
    path = ct(tmp_path / "big.dcm", frames)
    raw_el = pydicom.dcmread(path, defer_size=1024).get_item("PixelData", keep_deferred=True)
    assert raw_el.value is None  # the reader's 64 KiB threshold defers it the same way
    img = read_dicom(path, frames=[5])
    assert img.pixels.shape == (1, 1, 200, 200) and float(img.pixels.max()) == 5.0


def test_enhanced_ct_per_frame_rescale_spacing_window_and_positions(tmp_path):
    frames = np.full((3, 4, 4), 1000, np.uint16)
    shared = _item(
        PixelMeasuresSequence=DicomSequence([_item(PixelSpacing=[0.7, 0.8])]),
        PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
        PixelValueTransformationSequence=DicomSequence([_item(RescaleSlope=1, RescaleIntercept=-1000)]),
        FrameVOILUTSequence=DicomSequence([_item(WindowCenter=-600, WindowWidth=1500)]),
    )
    per_frame = [
        _item(PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=[0, 0, 2.5 * f])]),
              **({"PixelValueTransformationSequence": DicomSequence(
                  [_item(RescaleSlope=2, RescaleIntercept=-2000)])} if f == 2 else {}))
        for f in range(3)
    ]
    path = write_dicom(tmp_path / "enh.dcm", frames, sop_class=EnhancedCTImageStorage, bits_stored=12,
                       attributes={"Modality": "CT", "SharedFunctionalGroupsSequence": DicomSequence([shared]),
                                   "PerFrameFunctionalGroupsSequence": DicomSequence(per_frame)})
    img = read_dicom(path)
    assert img.pixels[:, 0, 0, 0].tolist() == [0.0, 0.0, 0.0]  # 1000-1000 and 2*1000-2000
    assert img.pixel_spacing == (0.7, 0.8)
    assert (img.window_center, img.window_width) == (-600.0, 1500.0)
    assert img.slice_positions == (0.0, 2.5, 5.0)


def test_technical_metadata(tmp_path):
    path = ct(tmp_path / "m.dcm", attributes={
        "PixelSpacing": [0.5, 0.6], "WindowCenter": [40, 400], "WindowWidth": [400, 2000],
        # sagittal plane: normal = row x column = (0,1,0) x (0,0,-1) = (-1, 0, 0)
        "ImageOrientationPatient": [0, 1, 0, 0, 0, -1], "ImagePositionPatient": [12.0, -5.0, 30.0],
        "SeriesInstanceUID": "1.2.3.4", "InstanceNumber": 7})
    img = read_dicom(path)
    assert img.modality == "CT" and img.photometric_interpretation == "MONOCHROME2"
    assert img.pixel_spacing == (0.5, 0.6)
    assert (img.window_center, img.window_width) == (40.0, 400.0)  # first of several windows
    assert img.slice_position == -12.0
    assert img.instance_number == 7
    assert img.series_key and "1.2.3.4" not in img.series_key


def test_rgb_and_ybr_become_rgb_channels(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    img = read_dicom(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB",
                                 sop_class=SecondaryCaptureImageStorage, attributes={"Modality": "OT"}))
    assert img.pixels.shape == (1, 3, 16, 16) and img.pixels[0, :, 0, 0].tolist() == [200.0, 100.0, 50.0]
    assert img.value_range == (0.0, 255.0)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    img = read_dicom(write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL",
                                 sop_class=SecondaryCaptureImageStorage, attributes={"Modality": "US"}))
    np.testing.assert_allclose(img.pixels[0, :, 0, 0], [200.0, 100.0, 50.0], atol=2)


@pytest.mark.parametrize("name", ["SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_gdcm_KY.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"])
def test_a_compressed_colour_file_ignores_its_planar_configuration(tmp_path, name):
    """PS3.5 8.2: JPEG-family syntaxes ignore Planar Configuration. A file saying 1 was reshaped
    as planar: a colour mosaic, off by up to 255 (found by an audit). pydicom's own test files,
    with the attribute flipped, read as the untouched ones do."""
    from pydicom.data import get_testdata_file

    original = get_testdata_file(name)
    ds = pydicom.dcmread(original)
    ds.PlanarConfiguration = 1 - int(ds.get("PlanarConfiguration", 0))
    ds.save_as(tmp_path / name)
    np.testing.assert_array_equal(read_dicom(tmp_path / name).pixels, read_dicom(original).pixels)


def test_no_patient_field_in_the_returned_object(tmp_path):
    img = read_dicom(ct(tmp_path / "p.dcm"))
    names = {f.name for f in dataclasses.fields(img)}
    assert names == {
        "path", "sop_class", "transfer_syntax", "modality", "rows", "columns", "number_of_frames",
        "channels", "bits_stored", "photometric_interpretation", "pixel_spacing", "window_center",
        "window_width", "value_range", "slice_positions", "instance_number", "series_key", "frame_windows",
        "pixels", "frames",
    }
    text = repr(img.header()) + json.dumps(img.header().to_dict())
    for value in IDENTIFIERS.values():
        assert value not in text
    assert not hasattr(img, "PatientName")


# ------------------------------------------------------------------ failures


def expect(path, reason: str, *fragments: str, header_too: bool = True) -> DicomReadError:
    with pytest.raises(DicomReadError) as err:
        read_dicom(path)
    assert err.value.reason == reason
    message = str(err.value)
    assert message.startswith(f"{path}: {reason}")
    for fragment in fragments:
        assert fragment in message, message
    if header_too:  # the scan's header-only path finds it as well
        with pytest.raises(DicomReadError):
            read_header(path)
    return err.value


def test_error_is_a_value_error_and_a_data_error_and_pickles():
    assert issubclass(DicomReadError, ValueError) and issubclass(DicomReadError, DataError)
    err = pickle.loads(pickle.dumps(DicomReadError("/x.dcm", "no decoder", "JPEG-LS")))
    assert (err.path, err.reason, err.detail, str(err)) == ("/x.dcm", "no decoder", "JPEG-LS",
                                                            "/x.dcm: no decoder: JPEG-LS")


def test_not_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("PACS export log\n" * 20)
    expect(tmp_path / "notes.txt", "not DICOM", "no 'DICM' marker at byte 128")
    (tmp_path / "empty.dcm").write_bytes(b"")
    expect(tmp_path / "empty.dcm", "not DICOM")
    # a raw dataset without the Part-10 header: refused, not guessed at
    path = ct(tmp_path / "x.dcm")
    (tmp_path / "raw.dcm").write_bytes(path.read_bytes()[132:])
    expect(tmp_path / "raw.dcm", "not DICOM")


def test_missing_file_and_folder_are_unreadable(tmp_path):
    expect(tmp_path / "nope.dcm", "unreadable", "No such file")
    expect(tmp_path, "unreadable")


@pytest.mark.parametrize("sop,name", [(RTPlanStorage, "RT Plan Storage"),
                                      (BasicTextSRStorage, "Basic Text SR Storage")])
def test_no_pixel_data_names_the_sop_class(tmp_path, sop, name):
    path = write_non_image(tmp_path / "obj.dcm", sop, attributes={"Modality": "RTPLAN", **IDENTIFIERS})
    err = expect(path, "no pixel data", name, sop)
    for value in IDENTIFIERS.values():
        assert value not in str(err)


def test_truncated_uncompressed(tmp_path):
    path = ct(tmp_path / "t.dcm")
    path.write_bytes(path.read_bytes()[:-1000])
    expect(path, "truncated pixel data", f"holds {8192 - 1000} of 8192 bytes")


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=lambda s: s.name)
def test_truncated_compressed(tmp_path, syntax, caplog):
    path = ct(tmp_path / "t.dcm", transfer_syntax=syntax)
    path.write_bytes(path.read_bytes()[:-40])  # the sequence delimiter and part of the codestream
    with caplog.at_level(logging.DEBUG):
        expect(path, "truncated pixel data", "ends inside the pixel data element")
    assert [r for r in caplog.records if r.name.startswith("pydicom")] == []  # no per-file noise


def test_unsupported_compression_names_the_syntax(tmp_path):
    path = ct(tmp_path / "mpeg.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds.save_as(path)
    expect(path, "no decoder", "MPEG2", "1.2.840.10008.1.2.4.100", "no pixel-data plugin")


def test_missing_plugin_is_named(tmp_path, monkeypatch):
    path = ct(tmp_path / "jls.dcm", transfer_syntax=JPEGLSLossless)
    monkeypatch.setattr(JPEGLSLosslessDecoder, "_available", {})
    monkeypatch.setattr(JPEGLSLosslessDecoder, "_unavailable",
                        {"pyjpegls": ("pyjpegls",), "gdcm": ("gdcm>=3.0.10",)})
    expect(path, "no decoder", "JPEG-LS Lossless", "1.2.840.10008.1.2.4.80", "pyjpegls or python-gdcm",
           "pyjpegls - requires pyjpegls")


def test_inconsistent_attributes(tmp_path):
    path = ct(tmp_path / "rows.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows = 128  # 128 x 64 x 2 bytes > the 8192 stored
    ds.save_as(path)
    expect(path, "inconsistent attributes", "holds 8192 bytes", "need 16384")

    path = ct(tmp_path / "bits.dcm")
    ds = pydicom.dcmread(path)
    del ds.BitsAllocated
    ds.save_as(path)
    expect(path, "inconsistent attributes", "BitsAllocated is missing")

    path = ct(tmp_path / "frames.dcm", attributes={"NumberOfFrames": 12})
    patch_bytes(path, b"\x28\x00\x08\x00IS\x02\x0012", b"\x28\x00\x08\x00IS\x02\x001A")
    expect(path, "inconsistent attributes", "NumberOfFrames '1A' is not an integer")

    path = ct(tmp_path / "spp.dcm")
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel = 3
    ds.save_as(path)
    expect(path, "inconsistent attributes", "MONOCHROME2 with SamplesPerPixel 3")


def test_colour_headers_that_can_never_decode_are_refused_from_the_header(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    path = write_dicom(tmp_path / "planar.dcm", rgb, photometric="RGB", attributes={"Modality": "OT"})
    ds = pydicom.dcmread(path)
    ds.PlanarConfiguration = 7
    ds.save_as(path)
    expect(path, "inconsistent attributes", "PlanarConfiguration is 7, not 0 or 1")

    path = write_dicom(tmp_path / "palette.dcm", np.zeros((4, 4), np.uint8), photometric="PALETTE COLOR",
                       attributes={"Modality": "OT"})
    expect(path, "inconsistent attributes", "PALETTE COLOR without the red palette table")


def test_unsupported_photometric_interpretation(tmp_path):
    path = write_dicom(tmp_path / "hsv.dcm", np.zeros((4, 4, 3), np.uint8), photometric="HSV",
                       attributes={"Modality": "OT"})
    expect(path, "unsupported image type", "PhotometricInterpretation 'HSV'")


def test_corrupt_codestream_is_undecodable(tmp_path):
    path = ct(tmp_path / "j2k.dcm", transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 2])
    ds.save_as(path)
    err = expect(path, "undecodable pixel data", "codestream declares", header_too=False)
    assert "gdcm" not in str(err)  # GDCM aborts the process on this file; it is never tried
    assert read_header(path).transfer_syntax == JPEG2000Lossless


def test_frame_out_of_range(tmp_path):
    with pytest.raises(DicomReadError, match="frame 3 requested, file has 1"):
        read_dicom(ct(tmp_path / "f.dcm"), frames=[3])


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless],
                         ids=lambda s: s.name)
def test_no_other_exception_escapes_for_damaged_files(tmp_path, syntax):
    """Cut and corrupt a valid file at many places: DicomReadError or pixels, nothing else."""
    good = ct(tmp_path / "good.dcm", transfer_syntax=syntax).read_bytes()
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad.dcm"
    for n in range(60):
        data = bytearray(good)
        if n % 2:
            data = data[: int(rng.integers(133, len(good)))]
        else:
            for pos in rng.integers(132, len(good), size=8):
                data[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(data))
        try:
            img = read_dicom(bad)
        except DicomReadError as err:
            assert str(err).startswith(f"{bad}: ")
        else:
            assert isinstance(img, DicomImage) and img.pixels.dtype == np.float32


def test_a_deflated_file_is_refused_before_it_inflates_past_the_read_limit(tmp_path):
    """pydicom inflates a Deflated dataset whole before reading a tag: a 261 KB file of zeros
    cost 870 MB before any limit was checked (found by an audit). Its inflated size is
    measured first, in chunks, against max_decoded_mb."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from domains.medical.dicom_types import TOO_LARGE, DicomLimits

    raw = np.zeros((1024, 1024), np.uint16)  # 2 MiB of pixels, a few KB deflated
    path = write_dicom(tmp_path / "zeros.dcm", raw, transfer_syntax=DeflatedExplicitVRLittleEndian,
                       attributes={"Modality": "MR"})
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(DicomReadError) as err:
        read_header(path, DicomLimits(max_decoded_mb=1.0))
    assert err.value.reason == TOO_LARGE and "Deflated dataset inflates to more than max_decoded_mb 1 MiB" in str(
        err.value)
    assert read_header(path, DicomLimits(max_decoded_mb=16.0)).rows == 1024  # under the limit it reads
    assert read_dicom(path, limits=DicomLimits(max_decoded_mb=16.0)).pixels.shape == (1, 1, 1024, 1024)
    # the meta group's length is not trusted to find the dataset (pydicom tolerates it missing
    # or wrong): without it the check was skipped, a wrong one refused a file pydicom reads
    data = path.read_bytes()
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) FileMetaInformationGroupLength
    wrong = tmp_path / "wrong.dcm"
    wrong.write_bytes(data[:140] + (int.from_bytes(data[140:144], "little") + 2).to_bytes(4, "little") + data[144:])
    assert read_header(wrong, DicomLimits(max_decoded_mb=16.0)).rows == 1024
    missing = tmp_path / "missing.dcm"
    missing.write_bytes(data[:132] + data[144:])
    with pytest.raises(DicomReadError, match="Deflated dataset inflates to more than max_decoded_mb 1 MiB"):
        read_header(missing, DicomLimits(max_decoded_mb=1.0))
    assert read_header(missing, DicomLimits(max_decoded_mb=16.0)).rows == 1024


@pytest.mark.parametrize("syntax", ["j2k", "jpeg-ls"])
def test_a_codestream_claiming_another_size_than_the_header_is_not_decoded(tmp_path, monkeypatch, syntax):
    """Limits are checked on Rows x Columns; decoders allocate what the codestream declares. A
    2.5 KB file of 32 x 32 whose JPEG 2000 header claimed 16000 x 16000 cost 1.6 GB before the
    mismatch was seen (found by an audit). The codestream's size is read first."""
    import struct

    import domains.medical.reader as reader
    from pydicom.encaps import generate_frames
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    raw = np.random.default_rng(0).integers(0, 4000, (32, 32)).astype(np.uint16)
    path = write_dicom(tmp_path / "x.dcm", raw, transfer_syntax=JPEG2000Lossless if syntax == "j2k" else JPEGLSLossless,
                       attributes={"Modality": "MR"})
    assert read_dicom(path).pixels.shape == (1, 1, 32, 32)  # as written, it reads
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    if syntax == "j2k":
        at = frame.find(b"\xff\x51") + 4 + 2  # SIZ, past Lsiz and Rsiz: Xsiz, Ysiz
        forged = frame[:at] + struct.pack(">II", 16000, 16000) + frame[at + 8:]
    else:
        at = frame.find(b"\xff\xf7") + 5  # SOF55, past Lf and P: Y, X
        forged = frame[:at] + struct.pack(">HH", 16000, 16000) + frame[at + 4:]
    ds.PixelData = encapsulate([forged])
    ds.save_as(path)
    monkeypatch.setattr(reader, "_decode", lambda *a: pytest.fail("the forged codestream reached a decoder"))
    with pytest.raises(DicomReadError) as err:
        read_dicom(path)
    assert err.value.reason == "undecodable pixel data"
    assert "frame 0's codestream declares 16000x16000 pixels, the header says 32x32; not decoded" in str(err.value)
