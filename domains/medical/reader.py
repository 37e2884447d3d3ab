"""Read one DICOM file into float32 pixels in modality units, with technical metadata only.

Two entry points share one validation path:

* :func:`read_header` reads the header without loading pixel data (the folder scan uses it);
* :func:`read_dicom` reads, validates and decodes (the dataset uses it per sample).

Privacy: files are parsed with pydicom's ``specific_tags`` restricted to the technical tags in
:data:`TECHNICAL_TAGS`, so patient, study and accession elements are skipped byte-wise by the
parser and never become Python objects, and no error message can quote them. Pydicom warnings
raised while reading are suppressed for the same reason (they may quote element values).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import mmap
import os
import warnings
import zlib
from collections import OrderedDict
from typing import Any, Iterator, NoReturn, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, convert_color_space, get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from fedmoco.cache import stat_stamp

from .dicom_types import (  # noqa: F401  (re-exported: they were defined here)
    DEFAULT_LIMITS,
    INCONSISTENT,
    NO_DECODER,
    NO_PIXEL_DATA,
    NOT_DICOM,
    TOO_LARGE,
    TRUNCATED,
    UNDECODABLE,
    UNREADABLE,
    UNSUPPORTED,
    DicomHeader,
    DicomImage,
    DicomLimits,
    DicomReadError,
)

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = {tag_for_keyword(k): k for k in PIXEL_KEYWORDS}

# Everything read_dicom may look at. Nothing here identifies a patient. SeriesInstanceUID is
# read only to derive a one-way grouping key (see DicomHeader.series_key) and then dropped.
TECHNICAL_TAGS: tuple[int, ...] = tuple(
    tag_for_keyword(k)
    for k in (
        "SOPClassUID",
        "Modality",
        "SeriesInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "NumberOfFrames",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "PixelPaddingValue",
        "PixelPaddingRangeLimit",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SliceLocation",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "RedPaletteColorLookupTableDescriptor",
        "GreenPaletteColorLookupTableDescriptor",
        "BluePaletteColorLookupTableDescriptor",
        "RedPaletteColorLookupTableData",
        "GreenPaletteColorLookupTableData",
        "BluePaletteColorLookupTableData",
        "SegmentedRedPaletteColorLookupTableData",
        "SegmentedGreenPaletteColorLookupTableData",
        "SegmentedBluePaletteColorLookupTableData",
        "ExtendedOffsetTable",
        "ExtendedOffsetTableLengths",
        *PIXEL_KEYWORDS,
    )
)

# Pixel data above this size stays on disk until decoded; multi-frame files are then read one
# frame at a time instead of whole (a 300-frame enhanced CT is 150 MB).
_DEFER_BYTES = 64 * 1024

# Plugins tried in this order; GDCM only where nothing else decodes the syntax (JPEG
# lossless without the jpeg12 extra). On a corrupt JPEG 2000 codestream GDCM aborts the whole
# process (an uncaught C++ exception) where pylibjpeg-openjpeg and Pillow raise a normal
# error, and an abort is something no try/except can turn into a skipped file.
_PLUGIN_PREFERENCE = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")

# Which installed package decodes what; named in "no decoder" errors. See docs/medical.md.
_JPEG12_HINT = (
    "pylibjpeg-libjpeg, the only decoder of 12-bit JPEG Extended here; it is GPL-3.0 so "
    "fedmoco ships it as the opt-in extra: pip install 'fedmoco[jpeg12]'"
)
DECODER_PACKAGES: dict[str, str] = {
    JPEGBaseline8Bit: "pillow or python-gdcm",
    JPEGExtended12Bit: "pillow or python-gdcm (8-bit samples); " + _JPEG12_HINT + " (12-bit)",
    JPEGLossless: "python-gdcm (or pylibjpeg-libjpeg, extra 'jpeg12')",
    JPEGLosslessSV1: "python-gdcm (or pylibjpeg-libjpeg, extra 'jpeg12')",
    JPEGLSLossless: "pyjpegls or python-gdcm",
    JPEGLSNearLossless: "pyjpegls or python-gdcm",
    JPEG2000Lossless: "pylibjpeg-openjpeg, python-gdcm or pillow",
    JPEG2000: "pylibjpeg-openjpeg, python-gdcm or pillow",
    HTJ2KLossless: "pylibjpeg-openjpeg",
    HTJ2KLosslessRPCL: "pylibjpeg-openjpeg",
    HTJ2K: "pylibjpeg-openjpeg",
    RLELossless: "pylibjpeg-rle (numpy alone also works)",
}

_GRAY = ("MONOCHROME1", "MONOCHROME2")
# The largest pixel value, in output units (after RescaleSlope/Intercept), and the largest
# window, a file may carry. Pixels are float32 from here on, and windowing subtracts and
# divides them: a forged rescale such as intercept 1e39 (finite as a Python float, inf as
# float32) or slope 1e34 (finite pixels whose percentile span overflows) made every loss NaN
# and stopped the run. Real units stay far below: CT in HU, PET in Bq/ml (~1e9 at most).
MAX_PIXEL_UNITS = 1e30
#: The narrowest window width a file's VOI window may have (DICOM asks >= 1 for LINEAR, > 0
#: for LINEAR_EXACT): a width such as 1e-300 is 0 in float32, and a pixel at the centre became
#: 0 / 0 = NaN, which stopped the whole run at its first step. Narrower reads as no window.
MIN_WINDOW_WIDTH = 1e-6
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


def has_dicom_magic(path: str | os.PathLike) -> bool:
    """True when ``path`` has the DICOM Part-10 marker ``DICM`` at byte 128 (reads 132 bytes).

    Raises OSError when the file cannot be opened.
    """
    with open(path, "rb") as fh:
        return _has_magic(fh)


def _has_magic(fh) -> bool:
    head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def read_header(path: str | os.PathLike, limits: DicomLimits = DEFAULT_LIMITS) -> DicomHeader:
    """Read and validate the technical header of ``path`` without decoding pixels.

    Detects every failure that can be seen without decoding (not DICOM, no pixel data,
    truncated uncompressed pixel data, missing decoder, inconsistent attributes, and a
    file ``too large`` for ``limits``). Raises :class:`DicomReadError`, and no other exception.
    """
    with _reading(path):
        ds, st = _open(path, limits)
        return _validate(ds, path, st.st_size, limits)[0]


def read_dicom(path: str | os.PathLike, frames: Sequence[int] | None = None,
               limits: DicomLimits = DEFAULT_LIMITS) -> DicomImage:
    """Decode ``path`` into a :class:`DicomImage` (pixels (F, C, rows, columns), float32).

    ``frames`` selects frame indices (0-based) to decode; ``None`` decodes all. Decoding a
    subset reads only those frames' bytes for uncompressed multi-frame files. ``limits``
    are checked before decoding (:class:`DicomLimits`).
    Raises :class:`DicomReadError` for any file that cannot become pixels, and no other
    exception.
    """
    with _reading(path):
        ds, st = _open(path, limits)
        header, rescale = _validated(ds, path, st, limits)
        return _read_pixels(ds, path, header, rescale, frames, limits)


# Validation results per (file, stat stamp, limits), this process only. Validating an
# enhanced multi-frame file walks its per-frame functional groups, O(frames); without the
# cache every one-frame sample paid it again, O(frames**2) per epoch (1.8 s per sample of a
# 1000-frame file, measured). Entries hold headers only, a few KB each.
_VALIDATED: OrderedDict[tuple, tuple] = OrderedDict()
_VALIDATED_MAX = 256


def _validated(ds: Dataset, path, st: os.stat_result, limits: DicomLimits) -> tuple:
    key = (os.fspath(path), *stat_stamp(st), limits)
    hit = _VALIDATED.get(key)
    if hit is not None:
        _VALIDATED.move_to_end(key)
        return hit
    result = _validate(ds, path, st.st_size, limits)
    _VALIDATED[key] = result
    while len(_VALIDATED) > _VALIDATED_MAX:
        _VALIDATED.popitem(last=False)
    return result


def _read_pixels(ds, path, header, rescale, frames, limits: DicomLimits) -> DicomImage:
    wanted = tuple(range(header.number_of_frames)) if frames is None else tuple(frames)
    for f in wanted:
        if not 0 <= f < header.number_of_frames:
            raise DicomReadError(
                path, INCONSISTENT, f"frame {f} requested, file has {header.number_of_frames}"
            )
    if not wanted:
        raise DicomReadError(path, INCONSISTENT, "no frame requested")
    bits = int(ds.get("BitsAllocated", 0) or 0) if "PixelData" in ds else (32 if "FloatPixelData" in ds else 64)
    samples = 3 if header.channels == 3 else 1
    limits.check_read(path, limits.frame_bytes(header.rows, header.columns, samples, bits), len(wanted))
    _check_codestream_sizes(ds, path, header, wanted)
    try:
        raw, photometric = _decode(ds, path, wanted)
    except (DicomReadError, *_NOT_OURS):
        raise
    except BaseException as exc:  # noqa: BLE001 plugins raise many types; the contract allows one
        raise DicomReadError(path, UNDECODABLE, _describe(exc)) from None
    if raw.shape[1:3] != (header.rows, header.columns):
        raise DicomReadError(
            path, INCONSISTENT,
            f"decoded frame is {raw.shape[1]}x{raw.shape[2]}, header says "
            f"{header.rows}x{header.columns}",
        )
    pixels = _to_modality_units(raw, ds, header, rescale, wanted, photometric)
    return DicomImage(**header.to_dict(), pixels=pixels, frames=wanted)


# --------------------------------------------------------------------------- reading


# Decoders written in Rust (pylibjpeg-rle) signal a bad codestream with a pyo3
# PanicException, which derives from BaseException; only these are left alone.
_NOT_OURS = (KeyboardInterrupt, SystemExit, GeneratorExit)
_PYDICOM_LOG = logging.getLogger("pydicom")


@contextlib.contextmanager
def _reading(path) -> Iterator[None]:
    """Silence pydicom's warnings and logs (they quote values) and keep the one-type contract.

    The specific checks raise DicomReadError with a precise reason; anything else a damaged
    header provokes deep inside pydicom is still a file that cannot become pixels.
    """
    # pydicom also logs what it warns ("End of file reached before delimiter ...", plugin
    # errors): one line per broken file would bury the one-line skip summary.
    level = _PYDICOM_LOG.level
    _PYDICOM_LOG.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except (DicomReadError, *_NOT_OURS):
        raise
    except BaseException as exc:  # noqa: BLE001 (see _NOT_OURS)
        raise DicomReadError(path, INCONSISTENT, _describe(exc)) from None
    finally:
        _PYDICOM_LOG.setLevel(level)


def _open(path: str | os.PathLike, limits: DicomLimits = DEFAULT_LIMITS) -> tuple[Dataset, os.stat_result]:
    """Parse the technical tags of ``path``; pixel data over 64 KiB is left on disk. A
    Deflated file is inflated whole by pydicom, so its inflated size is measured first, in
    bounded memory, against ``limits`` (:func:`_check_inflated_size`)."""
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:  # one open for the marker and the meta group (every read passes here)
            magic = _has_magic(fh)
            syntax, start = _meta_group(fh) if magic else (None, 0)
    except OSError as exc:
        raise DicomReadError(path, UNREADABLE, exc.strerror or type(exc).__name__) from None
    if not magic:
        raise DicomReadError(
            path, NOT_DICOM,
            "no 'DICM' marker at byte 128 (files without a Part-10 header are not accepted)",
        )
    try:
        if syntax == DeflatedExplicitVRLittleEndian:
            _check_inflated_size(path, start, limits)
            # Deferred offsets point into the inflated stream, not the file: read it whole.
            ds = dcmread(path, specific_tags=list(TECHNICAL_TAGS))
        else:
            ds = dcmread(path, specific_tags=list(TECHNICAL_TAGS), defer_size=_DEFER_BYTES)
    except (DicomReadError, *_NOT_OURS):
        raise
    except BaseException as exc:  # noqa: BLE001 a corrupt header can raise almost anything
        raise DicomReadError(path, UNREADABLE, f"cannot parse the header ({_describe(exc)})") from None
    return ds, st


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


#: Explicit VR little endian VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def _meta_group(fh) -> tuple[UID | None, int]:
    """(TransferSyntaxUID, where the dataset begins) of an open Part-10 file past its "DICM"
    marker, by walking the file meta group (group 0002, explicit VR little endian) element by
    element: its group length may be missing or wrong, which pydicom tolerates, and a size
    check that trusted it either let a Deflated file through unmeasured or refused one pydicom
    reads. Walked by hand so that a read costs no second parse of the meta group (pydicom's
    read_file_meta_info gives neither the dataset's offset nor a parse the read can reuse)."""
    at, syntax = 132, None
    while True:
        fh.seek(at)
        head = fh.read(8)
        if len(head) < 8 or int.from_bytes(head[:2], "little") != 0x0002:
            return syntax, at
        if head[4:6] in _LONG_VRS:
            length, value_at = int.from_bytes(fh.read(4), "little"), at + 12
        else:
            length, value_at = int.from_bytes(head[6:8], "little"), at + 8
        if int.from_bytes(head[2:4], "little") == 0x0010:  # (0002,0010) TransferSyntaxUID
            fh.seek(value_at)
            value = fh.read(min(length, 64)).rstrip(b"\0 ").decode("ascii", "replace")
            syntax = UID(value) if value else None
        at = value_at + length


def _check_inflated_size(path, start: int, limits: DicomLimits) -> None:
    """DicomReadError(TOO_LARGE) when the Deflated dataset of ``path`` inflates to more than
    ``max_decoded_mb``, what one read may hold: pydicom inflates the whole stream before it
    reads a tag, so a 261 KB file of zeros that inflated to 256 MiB cost 870 MB before any
    limit was checked (1000x its size). Measured here chunk by chunk, in bounded memory."""
    cap = int(limits.max_decoded_mb * 2**20)
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while not inflater.eof and (chunk := fh.read(1 << 16)):
            while chunk and not inflater.eof:  # after the stream's end, input is never consumed
                total += len(inflater.decompress(chunk, 1 << 20))
                if total > cap:
                    raise DicomReadError(path, TOO_LARGE, f"its Deflated dataset inflates to more than "
                                                          f"max_decoded_mb {limits.max_decoded_mb:g} MiB")
                chunk = inflater.unconsumed_tail


def _describe(exc: BaseException) -> str:
    """One line for an exception from pydicom or a plugin."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


# --------------------------------------------------------------------------- validation


def _validate(
    ds: Dataset, path, size: int, limits: DicomLimits = DEFAULT_LIMITS
) -> tuple[DicomHeader, list[tuple[float, float]]]:
    """Check everything that can be checked without decoding; the ``limits`` before any
    per-frame work, so a forged NumberOfFrames costs nothing.

    Returns the header and the (slope, intercept) of every frame of the file.
    """
    sop = _sop_class(ds)
    tsyntax = _transfer_syntax(ds)
    if tsyntax is None:
        raise DicomReadError(path, INCONSISTENT, "the file meta has no TransferSyntaxUID")
    if not tsyntax.is_transfer_syntax:
        raise DicomReadError(path, INCONSISTENT, f"TransferSyntaxUID {str(tsyntax)[:64]!r} is not a transfer syntax")
    keyword = next((k for k in PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        _raise_no_pixel_data(ds, path, sop)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if keyword == "PixelData" and not photometric:
        raise DicomReadError(path, INCONSISTENT, "PhotometricInterpretation is missing")
    rows = _int_attr(ds, path, "Rows", minimum=1)
    columns = _int_attr(ds, path, "Columns", minimum=1)
    frames = _int_attr(ds, path, "NumberOfFrames", minimum=1, default=1)
    samples = _int_attr(ds, path, "SamplesPerPixel", minimum=1, default=1)
    if keyword == "PixelData":
        bits_allocated = _int_attr(ds, path, "BitsAllocated", minimum=1)
        if bits_allocated not in (1, 8, 16, 32, 64):
            raise DicomReadError(path, INCONSISTENT, f"BitsAllocated is {bits_allocated}")
        bits_stored = _int_attr(ds, path, "BitsStored", minimum=1, default=bits_allocated)
        if bits_stored > bits_allocated:
            raise DicomReadError(
                path, INCONSISTENT, f"BitsStored {bits_stored} > BitsAllocated {bits_allocated}"
            )
        signed = _int_attr(ds, path, "PixelRepresentation", minimum=0, default=0) == 1
    else:  # float pixel data: 32 or 64 bits, no stored range
        bits_allocated = 32 if keyword == "FloatPixelData" else 64
        bits_stored, signed, photometric = bits_allocated, True, photometric or "MONOCHROME2"
    limits.check_header(path, rows, columns, frames, samples, bits_allocated)
    if photometric in _GRAY:
        if samples != 1:
            raise DicomReadError(path, INCONSISTENT, f"{photometric} with SamplesPerPixel {samples}")
    elif photometric in _COLOUR:
        want = 1 if photometric == "PALETTE COLOR" else 3
        if samples != want:
            raise DicomReadError(path, INCONSISTENT, f"{photometric} with SamplesPerPixel {samples}")
        # Decidable from the header, so refused here rather than counted usable and failing at
        # every read: a planar layout that does not exist, a palette without its tables.
        planar = _int_attr(ds, path, "PlanarConfiguration", minimum=0, default=0) if samples == 3 else 0
        if planar not in (0, 1):
            raise DicomReadError(path, INCONSISTENT, f"PlanarConfiguration is {planar}, not 0 or 1")
        if photometric == "PALETTE COLOR":
            lacking = [c for c in ("Red", "Green", "Blue")
                       if f"{c}PaletteColorLookupTableDescriptor" not in ds
                       or (f"{c}PaletteColorLookupTableData" not in ds
                           and f"Segmented{c}PaletteColorLookupTableData" not in ds)]
            if lacking:
                raise DicomReadError(path, INCONSISTENT, f"PALETTE COLOR without the {lacking[0].lower()} palette "
                                                         "table")
    else:
        raise DicomReadError(path, UNSUPPORTED, f"PhotometricInterpretation {photometric!r}")

    _check_decoder(path, tsyntax, bits_stored)
    _check_length(ds, path, size, keyword, tsyntax, rows * columns, frames, samples,
                  bits_allocated, photometric)

    rescale = _rescale_per_frame(ds, path, frames)
    if signed:
        stored_range = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1)
    else:
        stored_range = (0, 2**bits_stored - 1)
    if photometric == "PALETTE COLOR":
        # The palette's entries, not the indices, become the pixels: their bit depth counts.
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 16]
        stored_range = (0, 2 ** _int_value(descriptor[2], path, "palette descriptor") - 1)
    if _uses_modality_lut(ds) and photometric in _GRAY:
        # The LUT's entries, not the stored values, become the pixels: their bit depth bounds them.
        _modality_lut(ds, path)  # refused here, at index time, when its data cannot be read
        descriptor = ds.ModalityLUTSequence[0].get("LUTDescriptor") or [0, 0, 16]
        stored_range = (0, 2 ** _int_value(descriptor[2], path, "modality LUT descriptor") - 1)
        value_range = (float(stored_range[0]), float(stored_range[1]))
    else:
        value_range = _value_range(stored_range, rescale[0], photometric, keyword)
        for pair in set(rescale):
            reach = _value_range(stored_range, pair, photometric, keyword)
            if reach is not None and max(map(abs, reach)) > MAX_PIXEL_UNITS:
                raise DicomReadError(path, INCONSISTENT,
                                     f"RescaleSlope {pair[0]:g}, RescaleIntercept {pair[1]:g} map the stored values "
                                     f"to [{reach[0]:.3g}, {reach[1]:.3g}], beyond +-{MAX_PIXEL_UNITS:g}")
    windows = _windows(ds, frames)
    if photometric == "MONOCHROME1":
        windows = tuple(None if w is None else (_reflect(w[0], value_range), w[1]) for w in windows)
    center, width = windows[0] if windows[0] is not None else (None, None)
    header = DicomHeader(
        path=str(path),
        sop_class=sop,
        transfer_syntax=str(tsyntax),
        modality=str(ds.get("Modality", "") or "OT").strip().upper() or "OT",
        rows=rows,
        columns=columns,
        number_of_frames=frames,
        channels=1 if photometric in _GRAY else 3,
        bits_stored=bits_stored,
        photometric_interpretation=photometric,
        pixel_spacing=_pixel_spacing(ds),
        window_center=center,
        window_width=width,
        frame_windows=windows if len(set(windows)) > 1 else (),
        value_range=value_range,
        slice_positions=_slice_positions(ds, frames),
        instance_number=_optional_int(ds.get("InstanceNumber")),
        series_key=_series_key(ds),
    )
    return header, rescale


def _sop_class(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    if not uid:
        return "unknown SOP class"
    uid = UID(str(uid))
    return f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)


def _raise_no_pixel_data(ds: Dataset, path, sop: str) -> NoReturn:
    # pydicom silently drops an encapsulated pixel data element that runs past the end of the
    # file, so "no element" may really be "truncated": look for the element's tag on disk.
    be = not _transfer_syntax(ds).is_little_endian
    tags = [b"\x7f\xe0\x00\x10", b"\x7f\xf2\x00\x10"] if be else [b"\xe0\x7f\x10\x00"]
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            offset = max((mm.rfind(t) for t in tags), default=-1)
    except (OSError, ValueError):
        offset = -1
    if offset > 132:
        raise DicomReadError(
            path, TRUNCATED,
            f"the file ends inside the pixel data element that starts at byte {offset}",
        )
    raise DicomReadError(path, NO_PIXEL_DATA, f"SOP class {sop}")


def _int_value(value: Any, path, what: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DicomReadError(path, INCONSISTENT, f"{what} {str(value)[:20]!r} is not an integer") from None


def _int_attr(ds: Dataset, path, keyword: str, *, minimum: int, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise DicomReadError(path, INCONSISTENT, f"{keyword} is missing")
        return default
    number = _int_value(value, path, keyword)
    if number < minimum:
        raise DicomReadError(path, INCONSISTENT, f"{keyword} is {number}")
    return number


def _check_decoder(path, tsyntax: UID, bits_stored: int) -> None:
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DicomReadError(
            path, NO_DECODER,
            f"{tsyntax.name} ({tsyntax}): no pixel-data plugin for pydicom decodes this transfer syntax",
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DicomReadError(
            path, NO_DECODER,
            f"{tsyntax.name} ({tsyntax}) needs {DECODER_PACKAGES.get(tsyntax, 'a pixel-data plugin')}"
            + (f" (pydicom: {missing})" if missing else ""),
        )
    # Pillow and GDCM claim JPEG Extended but fail on 12-bit samples (checked file by file).
    if tsyntax == JPEGExtended12Bit and bits_stored > 8 and "pylibjpeg" not in decoder.available_plugins:
        raise DicomReadError(
            path, NO_DECODER,
            f"{tsyntax.name} ({tsyntax}) with {bits_stored}-bit samples needs {_JPEG12_HINT}",
        )


def _check_length(ds, path, size, keyword, tsyntax, pixels, frames, samples, bits, photometric) -> None:
    raw = ds.get_item(keyword, keep_deferred=True)
    if tsyntax.is_encapsulated:
        # Fragment lengths are checked by the decoder (pydicom drops a cut-off sequence), but
        # every frame needs at least one 8-byte item header: a 680-byte file cannot hold the
        # 2,000,000 frames its header may claim.
        value = getattr(raw, "value", None)
        held = len(value) if value is not None else max(0, size - raw.value_tell)
        if frames * 8 > held:
            raise DicomReadError(path, INCONSISTENT, f"NumberOfFrames {frames} cannot fit in {held} bytes of "
                                                     f"encapsulated pixel data (8 bytes per frame at least)")
        return
    declared = getattr(raw, "length", None)
    if declared is None or declared == 0xFFFFFFFF:
        declared = len(raw.value or b"")
    value = getattr(raw, "value", None)
    if value is None:  # deferred: still on disk
        available = max(0, min(declared, size - raw.value_tell))
    else:
        available = len(value)
    if available < declared:
        raise DicomReadError(
            path, TRUNCATED, f"the file holds {available} of {declared} bytes of pixel data"
        )
    per_pixel = 2 if (photometric == "YBR_FULL_422" and samples == 3) else samples
    expected = math.ceil(pixels * per_pixel * frames * bits / 8)
    if declared < expected:
        raise DicomReadError(
            path, INCONSISTENT,
            f"pixel data holds {declared} bytes but Rows, Columns, SamplesPerPixel, "
            f"BitsAllocated and NumberOfFrames need {expected}",
        )


def _functional_item(ds: Dataset, group: str, frame: int | None) -> Dataset | None:
    """First item of ``group`` (e.g. PixelValueTransformationSequence) for ``frame``.

    Enhanced multi-frame objects keep per-frame values in PerFrameFunctionalGroupsSequence and
    common ones in SharedFunctionalGroupsSequence; per-frame wins.
    """
    sources = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if frame < len(per_frame):
            sources.append(per_frame[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        sources.append(ds.SharedFunctionalGroupsSequence[0])
    for item in sources:
        seq = item.get(group)
        if seq:
            return seq[0]
    return None


def _rescale_per_frame(ds: Dataset, path, frames: int) -> list[tuple[float, float]]:
    top = (ds.get("RescaleSlope"), ds.get("RescaleIntercept"))
    result = []
    for f in range(frames):
        item = _functional_item(ds, "PixelValueTransformationSequence", f)
        slope, intercept = (item.get("RescaleSlope"), item.get("RescaleIntercept")) if item else top
        try:
            pair = (float(slope) if slope not in (None, "") else 1.0,
                    float(intercept) if intercept not in (None, "") else 0.0)
        except (TypeError, ValueError):
            raise DicomReadError(path, INCONSISTENT, "RescaleSlope/RescaleIntercept is not a number") from None
        if pair[0] == 0 or not all(map(math.isfinite, pair)):
            raise DicomReadError(path, INCONSISTENT, f"RescaleSlope {pair[0]}, RescaleIntercept {pair[1]}")
        result.append(pair)
        if item is None and "PerFrameFunctionalGroupsSequence" not in ds:
            return result * frames  # one value for every frame: skip the per-frame lookups
    return result


def _value_range(stored_range, rescale, photometric, keyword) -> tuple[float, float] | None:
    """The representable range of stored values, in output units (first frame's rescale)."""
    if keyword != "PixelData":
        return None
    lo, hi = stored_range
    if photometric not in _GRAY:
        return (float(lo), float(hi))
    slope, intercept = rescale
    a, b = lo * slope + intercept, hi * slope + intercept
    return (float(min(a, b)), float(max(a, b)))


def _first_number(value: Any) -> float | None:
    """First value of a possibly multi-valued DS/IS element, or None."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _uses_modality_lut(ds: Dataset) -> bool:
    """Whether a Modality LUT Sequence, not a linear rescale, gives the output units (as in
    pydicom's ``apply_modality_lut``: a rescale present wins)."""
    return "ModalityLUTSequence" in ds and "RescaleSlope" not in ds and len(ds.ModalityLUTSequence) > 0


def _modality_lut(ds: Dataset, path) -> tuple[np.ndarray, int]:
    """(entries as int64, first stored value mapped) of the file's Modality LUT; DicomReadError
    (inconsistent attributes) when its data does not hold the descriptor's entries.

    Hand-written because pydicom's ``apply_modality_lut`` builds a ``uint{bits}`` dtype from the
    descriptor, which fails for the 12-bit entries found in the wild (pydicom issue 2317), and
    reads 8-bit entries packed in OW as 16-bit words: such files were indexed as usable, then
    failed on every read (found by an audit). PS3.3 C.11.1.1: entries of 9-16 bits take one 16-bit
    word, of 8 bits or fewer one byte each when the data holds exactly that many bytes."""
    item = ds.ModalityLUTSequence[0]
    descriptor = item.get("LUTDescriptor") or [0, 0, 16]
    n = _int_value(descriptor[0], path, "modality LUT descriptor") or 65536  # 0 means 2**16 entries
    first = _int_value(descriptor[1], path, "modality LUT descriptor")
    bits = _int_value(descriptor[2], path, "modality LUT descriptor")
    data = item.get("LUTData")
    if isinstance(data, (bytes, bytearray)):
        if bits <= 8 and len(data) in (n, n + 1):  # one byte each (odd counts are padded to even)
            entries = np.frombuffer(data, np.uint8, n)
        elif len(data) >= 2 * n:
            big = _transfer_syntax(ds) == ExplicitVRBigEndian  # retired, but read
            entries = np.frombuffer(data, ">u2" if big else "<u2", n)
        else:
            entries = None
    elif data is not None:
        entries = np.asarray(data if isinstance(data, (list, tuple, MultiValue)) else [data], dtype=np.int64)
        entries = entries if len(entries) >= n else None
    else:
        entries = None
    if entries is None or not 1 <= bits <= 16:
        raise DicomReadError(path, INCONSISTENT, f"Modality LUT of {n} entries of {bits} bits does not match its "
                                                 f"data ({len(data) if data is not None else 0} values or bytes)")
    return np.asarray(entries[:n], dtype=np.int64) & (2**bits - 1), first


def _apply_modality_lut(gray: np.ndarray, ds: Dataset, path) -> np.ndarray:
    """Stored values -> the Modality LUT's entries as float32; values outside the table take its
    first or last entry (PS3.3 C.11.1)."""
    lut, first = _modality_lut(ds, path)
    index = np.clip(gray.astype(np.int64) - first, 0, len(lut) - 1)
    return lut[index].astype(np.float32)


def _reflect(value: float, value_range: tuple[float, float] | None) -> float:
    """MONOCHROME1's inversion of one value: ``lo + hi - value`` within the representable
    range, or ``-value`` for float pixel data, which has none. Pixels and windows are
    reflected by this one map, so a file's window still selects the same tissue."""
    return -value if value_range is None else value_range[0] + value_range[1] - value


def _windows(ds: Dataset, frames: int) -> tuple[tuple[float, float] | None, ...]:
    """(centre, width) of every frame, or None where it has none: the top-level window, else
    the frame's FrameVOILUTSequence (per-frame, then shared functional groups). Only the
    first value of a multi-valued window is used."""
    def pair(source: Dataset | None) -> tuple[float, float] | None:
        if source is None:
            return None
        center, width = _first_number(source.get("WindowCenter")), _first_number(source.get("WindowWidth"))
        usable = center is not None and width is not None and MIN_WINDOW_WIDTH <= width <= MAX_PIXEL_UNITS \
            and abs(center) <= MAX_PIXEL_UNITS
        return (center, width) if usable else None  # an unusable window reads as none: percentiles

    if "WindowCenter" in ds or "PerFrameFunctionalGroupsSequence" not in ds:
        # a classic image, or one window for all frames: no per-frame lookups
        found = pair(ds) if "WindowCenter" in ds else pair(_functional_item(ds, "FrameVOILUTSequence", 0))
        return (found,) * frames
    return tuple(pair(_functional_item(ds, "FrameVOILUTSequence", f)) for f in range(frames))


def _padding_range(ds: Dataset) -> tuple[int, int] | None:
    """Stored values that mark padding (PixelPaddingValue, through PixelPaddingRangeLimit when
    given; PS3.3 C.7.5.1.1.2), or None. Integer grayscale pixel data only."""
    if "PixelData" not in ds:
        return None
    value, limit = _first_number(ds.get("PixelPaddingValue")), _first_number(ds.get("PixelPaddingRangeLimit"))
    if value is None:
        return None
    lo, hi = (value, value) if limit is None else (min(value, limit), max(value, limit))
    return int(lo), int(hi)


def _fill_padding(out: np.ndarray, padded: np.ndarray) -> None:
    """Set the padded pixels of each frame of ``out`` (F, rows, columns) to that frame's darkest
    real pixel, in place. Padding marks pixels outside the scanned object (the air around an
    MR, the corners of a CT's round field of view). Left at a bright or far-off value it would
    set the percentile windows; as the darkest tissue value it reads as background. A frame
    that is all padding is left as it is."""
    for f in range(out.shape[0]):
        mask = padded[f]
        if mask.any() and not mask.all():
            out[f][mask] = out[f][~mask].min()


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    value = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if value is None:
        item = _functional_item(ds, "PixelMeasuresSequence", 0)
        value = item.get("PixelSpacing") if item else None
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def _slice_positions(ds: Dataset, frames: int) -> tuple[float | None, ...]:
    """Position of each frame along the slice normal (mm), from the plane modules."""

    def vector(value, n):
        try:
            v = np.asarray([float(x) for x in value], dtype=np.float64)
        except (TypeError, ValueError):
            return None
        return v if v.shape == (n,) and np.isfinite(v).all() else None

    orientation = vector(ds.get("ImageOrientationPatient"), 6)
    if orientation is None:
        item = _functional_item(ds, "PlaneOrientationSequence", 0)
        orientation = vector(item.get("ImageOrientationPatient"), 6) if item else None
    normal = np.cross(orientation[:3], orientation[3:]) if orientation is not None else None
    positions: list[float | None] = []
    for f in range(frames):
        position = vector(ds.get("ImagePositionPatient"), 3) if f == 0 else None
        item = _functional_item(ds, "PlanePositionSequence", f)
        if item is not None:
            position = vector(item.get("ImagePositionPatient"), 3)
        if position is not None and normal is not None:
            positions.append(float(position @ normal))
        elif frames == 1 and _first_number(ds.get("SliceLocation")) is not None:
            positions.append(_first_number(ds.get("SliceLocation")))
        else:
            positions.append(None)
    return tuple(positions)


def _optional_int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _series_key(ds: Dataset) -> str | None:
    """sha256 of the SeriesInstanceUID and the image plane's orientation (rounded to 1e-3): the
    slices that may stack for 2.5D. One series can hold several planes (an MR 3-plane localizer),
    and stacked by the UID alone a sample mixed axial, sagittal and coronal slices (found by an
    audit)."""
    uid = ds.get("SeriesInstanceUID")
    if not uid:
        return None
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None:
        item = _functional_item(ds, "PlaneOrientationSequence", 0)
        orientation = item.get("ImageOrientationPatient") if item else None
    try:
        # + 0.0: -2e-10 rounds to -0.0, which printed '-0' and split one plane in two
        plane = ",".join(f"{round(float(v), 3) + 0.0:g}" for v in orientation) if orientation is not None else ""
    except (TypeError, ValueError):
        plane = ""
    return hashlib.sha256(f"{uid}|{plane}".encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- decoding


_J2K_SYNTAXES = frozenset({JPEG2000, JPEG2000Lossless, HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL})
_JPEG_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                            JPEGLSNearLossless})


def _codestream_size(frame: bytes, tsyntax: UID) -> tuple[int, int] | None:
    """(rows, columns) a compressed frame declares, or None when it cannot be read here (the
    decoder then decides). Parsed by hand because pydicom's public parser of JPEG 2000 headers
    returns precision and sign only: J2K's SIZ segment (ISO/IEC 15444-1 A.5.1, after a JP2
    box header if any), JPEG's and JPEG-LS's SOF (ISO/IEC 10918-1 B.2.2)."""
    try:
        if tsyntax in _J2K_SYNTAXES:
            at = 0
            if frame.startswith(b"\x00\x00\x00\x0cjP  "):  # JP2: find the contiguous codestream box
                at = 12
                while at + 8 <= len(frame) and frame[at + 4:at + 8] != b"jp2c":
                    at += max(8, int.from_bytes(frame[at:at + 4], "big"))
                at += 8
            if frame[at:at + 4] != b"\xff\x4f\xff\x51":  # SOC, then SIZ
                return None
            x, y, x0, y0 = (int.from_bytes(frame[at + i:at + i + 4], "big") for i in (8, 12, 16, 20))
            return y - y0, x - x0
        if tsyntax in _JPEG_SYNTAXES and frame[:2] == b"\xff\xd8":
            at = 2
            while at + 4 <= len(frame):
                marker = frame[at + 1]
                if frame[at] != 0xFF:
                    return None
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xF7:  # SOFn, SOF55
                    return int.from_bytes(frame[at + 5:at + 7], "big"), int.from_bytes(frame[at + 7:at + 9], "big")
                at += 2 + int.from_bytes(frame[at + 2:at + 4], "big")
    except (IndexError, ValueError):
        return None
    return None


def _check_codestream_sizes(ds: Dataset, path, header: DicomHeader, wanted: tuple[int, ...]) -> None:
    """DicomReadError(UNDECODABLE) when a wanted frame's codestream declares another size
    than Rows x Columns. The limits are checked on the header's size, and decoders allocate
    what the codestream says: a 2.5 KB file with Rows/Columns 32 x 32 whose JPEG 2000 header
    claimed 16000 x 16000 cost 1.6 GB before the size mismatch was seen (found by an audit)."""
    tsyntax = _transfer_syntax(ds)
    if tsyntax not in _J2K_SYNTAXES | _JPEG_SYNTAXES or "PixelData" not in ds:
        return
    n_frames = _int_attr(ds, path, "NumberOfFrames", minimum=1, default=1)
    for f in wanted:
        try:
            frame = get_frame(ds.PixelData, f, number_of_frames=n_frames)
        except Exception:  # noqa: BLE001 a broken encapsulation: the decoder says why
            return
        size = _codestream_size(frame, tsyntax)
        if size is not None and size != (header.rows, header.columns):
            raise DicomReadError(path, UNDECODABLE, f"frame {f}'s codestream declares {size[0]}x{size[1]} pixels, "
                                                    f"the header says {header.rows}x{header.columns}; not decoded")


def _decode(ds: Dataset, path, wanted: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """Decode ``wanted`` frames as (F, rows, columns, samples) in stored values."""
    tsyntax = _transfer_syntax(ds)
    decoder = get_decoder(tsyntax)
    keyword = next(k for k in PIXEL_KEYWORDS if k in ds)
    raw = ds.get_item(keyword, keep_deferred=True)
    n_frames = _int_attr(ds, path, "NumberOfFrames", minimum=1, default=1)
    whole = len(wanted) == n_frames and wanted == tuple(range(n_frames))
    if getattr(raw, "value", b"") is None and not tsyntax.is_encapsulated:
        # Deferred uncompressed data: decode straight from the file, one frame at a time.
        opts = as_pixel_options(ds)
        opts.update(pixel_keyword=keyword, pixel_vr=raw.VR or ("OW" if int(ds.get("BitsAllocated", 8)) > 8 else "OB"))
        with open(path, "rb") as fh:
            fh.seek(raw.value_tell)
            arrays = []
            for f in wanted:
                arr, props = decoder.as_array(fh, index=f, **opts)
                arrays.append(arr)
        stack = np.stack(arrays)
    else:
        available = decoder.available_plugins
        plugins = [p for p in _PLUGIN_PREFERENCE if p in available and p != "gdcm"]
        plugins = plugins or (["gdcm"] if "gdcm" in available else [""])
        # PS3.5 8.2: for the JPEG, JPEG-LS and JPEG 2000 syntaxes Planar Configuration "shall be
        # ignored"; the decoders give interleaved samples, and pydicom reshaped them as planar
        # where a file said 1: a colour mosaic (found by an audit; Cornerstone fixed the same).
        extra = {"planar_configuration": 0} if tsyntax in _J2K_SYNTAXES | _JPEG_SYNTAXES else {}
        failures = []
        for plugin in plugins:
            try:
                if whole:
                    stack, props = decoder.as_array(ds, decoding_plugin=plugin, **extra)
                    stack = stack[None] if n_frames == 1 else stack
                else:
                    pairs = [decoder.as_array(ds, index=f, decoding_plugin=plugin, **extra) for f in wanted]
                    stack, props = np.stack([a for a, _ in pairs]), pairs[0][1]
                break
            except _NOT_OURS:
                raise
            except BaseException as exc:  # noqa: BLE001 (see _NOT_OURS) the next plugin may cope
                failures.append(f"{plugin or 'pydicom'}: {_describe(exc)}")
        else:
            raise DicomReadError(path, UNDECODABLE, "; ".join(failures))
    if stack.ndim == 3:
        stack = stack[..., None]
    photometric = str(props.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    return stack, photometric


def _to_modality_units(
    raw: np.ndarray,
    ds: Dataset,
    header: DicomHeader,
    rescale: list[tuple[float, float]],
    wanted: tuple[int, ...],
    photometric: str,
) -> np.ndarray:
    """(F, rows, columns, samples) stored values -> (F, C, rows, columns) float32 output units."""
    if photometric == "PALETTE COLOR":
        raw = apply_color_lut(raw[..., 0], ds)
    elif photometric.startswith("YBR"):
        # Decoders normally return RGB already; this covers ones that leave YCbCr.
        raw = convert_color_space(raw, "YBR_FULL", "RGB", per_frame=True)
    if header.channels == 3:
        return np.ascontiguousarray(np.asarray(raw, dtype=np.float32).transpose(0, 3, 1, 2))

    gray = raw[..., 0]
    if _uses_modality_lut(ds):
        # A lookup table instead of a linear rescale (some CR/XA).
        out = _apply_modality_lut(gray, ds, header.path)
    else:
        # np.asarray to float32 also turns big-endian ('>i2') data into native order.
        out = np.asarray(gray, dtype=np.float32)
        slopes = np.asarray([rescale[f][0] for f in wanted], dtype=np.float32)[:, None, None]
        intercepts = np.asarray([rescale[f][1] for f in wanted], dtype=np.float32)[:, None, None]
        if (slopes != 1).any() or (intercepts != 0).any():
            out = out * slopes + intercepts
    if header.value_range is None:
        if not np.isfinite(out).all():
            # Float pixel data can hold NaN or inf, which would make every view and the loss NaN.
            raise DicomReadError(header.path, INCONSISTENT, "float pixel data holds NaN or infinite values")
        if out.size and np.abs(out).max() > MAX_PIXEL_UNITS:
            raise DicomReadError(header.path, INCONSISTENT, f"float pixel data holds values beyond +-{MAX_PIXEL_UNITS:g}")
    if header.photometric_interpretation == "MONOCHROME1":
        # One reflection for every frame, the one _validate applied to the windows (the
        # representable range of the first frame's units, or negation for float data): a
        # frame's own rescale then still lands its window on the same values.
        lo_hi = np.float32(sum(header.value_range)) if header.value_range is not None else np.float32(0)
        out = lo_hi - out
    padding = _padding_range(ds)
    if padding is not None:  # after the inversion, so that "darkest" is as displayed
        _fill_padding(out, (gray >= padding[0]) & (gray <= padding[1]))
    return np.ascontiguousarray(out[:, None])
