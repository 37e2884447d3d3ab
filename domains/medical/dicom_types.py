"""What the medical domain knows about a DICOM file without pydicom: skip reasons, the
error, the header and image records, and the size limits.

Split from :mod:`.reader` so that indexing from the index cache and training from the sample
cache never import pydicom (0.5-1 s per process, and every federated round is a new process);
:mod:`.reader` re-exports every name.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from fedmoco.errors import DataError

# Skip reasons: the keys of the scan's Counter and the second field of every error message.
NOT_DICOM = "not DICOM"
UNREADABLE = "unreadable"
NO_PIXEL_DATA = "no pixel data"
TRUNCATED = "truncated pixel data"
NO_DECODER = "no decoder"
INCONSISTENT = "inconsistent attributes"
UNSUPPORTED = "unsupported image type"
UNDECODABLE = "undecodable pixel data"
TOO_LARGE = "too large"


class DicomReadError(DataError):
    """A file that cannot become pixels. A ValueError (via DataError).

    ``reason`` is one of the module's reason constants (``not DICOM``, ``no pixel data``,
    ``truncated pixel data``, ``no decoder``, ``inconsistent attributes``, ...); the message is
    ``"<path>: <reason>: <detail>"``.
    """

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}" + (f": {detail}" if detail else ""))

    def __reduce__(self):  # DataLoader workers pickle exceptions; keep the three fields
        return (type(self), (self.path, self.reason, self.detail))


@dataclass(frozen=True)
class DicomHeader:
    """Technical metadata of one DICOM image file. No patient-identifying field.

    Units: ``pixel_spacing`` in mm (row spacing, column spacing); ``slice_positions`` in mm
    along the slice normal, one per frame (``None`` where the file does not say);
    ``window_center``/``window_width`` and ``value_range`` in the units of the decoded
    pixels (modality units, e.g. HU for CT, after MONOCHROME1 inversion).
    """

    path: str
    sop_class: str
    transfer_syntax: str
    modality: str
    rows: int
    columns: int
    number_of_frames: int
    channels: int  # 1 for grayscale, 3 for colour (decoded as RGB)
    bits_stored: int
    photometric_interpretation: str  # as stored in the file
    pixel_spacing: tuple[float, float] | None
    window_center: float | None
    window_width: float | None
    value_range: tuple[float, float] | None  # None for float pixel data
    slice_positions: tuple[float | None, ...]
    instance_number: int | None
    # sha256 of SeriesInstanceUID, first 16 hex digits: groups slices for 2.5D stacking
    # without keeping the UID itself (a DICOM UID is an identifier under PS3.15).
    series_key: str | None
    # (centre, width) per frame when an enhanced file's frames carry different windows
    # (FrameVOILUTSequence), else empty and ``window_center``/``window_width`` hold for all
    frame_windows: tuple[tuple[float, float] | None, ...] = ()

    def window(self, frame: int = 0) -> tuple[float, float] | None:
        """(centre, width) of file frame ``frame`` in the pixels' units, or None."""
        if self.frame_windows:
            return self.frame_windows[frame]
        return (self.window_center, self.window_width) if self.window_width else None

    @property
    def slice_position(self) -> float | None:
        """Position in mm along the slice normal of the first frame, or None."""
        return self.slice_positions[0] if self.slice_positions else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class DicomImage(DicomHeader):
    """A decoded DICOM image: :class:`DicomHeader` plus pixels.

    ``pixels`` is float32, native byte order, shape (frames, channels, rows, columns), in
    modality units: rescale slope/intercept (or the modality LUT) applied, so CT is in HU;
    MONOCHROME1 inverted to the MONOCHROME2 convention (bright = high value) by reflecting
    within ``value_range`` (negated for float pixel data, which has no such range); YBR and
    palette colour converted to RGB channels.
    ``frames`` lists which frames of the file ``pixels`` holds, in order.
    """

    pixels: np.ndarray = None  # type: ignore[assignment]
    frames: tuple[int, ...] = ()

    def header(self) -> DicomHeader:
        """The metadata without the pixels."""
        return DicomHeader(**{f.name: getattr(self, f.name) for f in fields(DicomHeader)})


@dataclass(frozen=True)
class DicomLimits:
    """What one file may ask of memory, checked from the header before anything is decoded
    or indexed (medical data options of the same names; docs/medical.md).

    ``max_frame_pixels``: Rows x Columns of one frame. The default, 2**25 (33.5 M, 5792**2),
    is above full-field mammography (4096 x 5120 = 21 M) and far below what a forged header
    can declare (65535**2 = 4.3 G). ``max_frames``: NumberOfFrames of one file (enhanced CT
    and MR series have hundreds to a few thousand). ``max_decoded_mb``: MiB that one read may
    hold at once, the decoder's stored values plus the float32 pixels made from them.
    """

    max_frame_pixels: int = 2**25
    max_frames: int = 10_000
    max_decoded_mb: float = 512.0

    def frame_bytes(self, rows: int, columns: int, samples: int, bits_allocated: int) -> int:
        """Bytes one decoded frame occupies: stored values plus their float32 copy."""
        return rows * columns * samples * (max(bits_allocated, 8) // 8 + 4)

    def check_header(self, path, rows: int, columns: int, frames: int, samples: int, bits_allocated: int) -> None:
        """Raise DicomReadError(TOO_LARGE) when the header asks for more than the limits allow."""
        if frames > self.max_frames:
            raise DicomReadError(path, TOO_LARGE, f"NumberOfFrames {frames} is over max_frames {self.max_frames}")
        if rows * columns > self.max_frame_pixels:
            raise DicomReadError(path, TOO_LARGE, f"Rows x Columns = {rows} x {columns} = {rows * columns} pixels "
                                                  f"per frame is over max_frame_pixels {self.max_frame_pixels}")
        self.check_read(path, self.frame_bytes(rows, columns, samples, bits_allocated), 1)

    def check_read(self, path, frame_bytes: int, n_frames: int) -> None:
        """Raise DicomReadError(TOO_LARGE) when ``n_frames`` decoded frames exceed max_decoded_mb."""
        total = frame_bytes * n_frames
        if total > self.max_decoded_mb * 2**20:
            raise DicomReadError(path, TOO_LARGE, f"decoding {n_frames} frame(s) needs {total / 2**20:.0f} MiB, "
                                                  f"over max_decoded_mb {self.max_decoded_mb:g}")


DEFAULT_LIMITS = DicomLimits()
