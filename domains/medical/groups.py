"""The patient of a DICOM file, read only to keep a patient's images on one side of a split.

The reader (reader.py) never reads identifiers. This helper is the one exception, kept apart so
it stays small and auditable: it parses nothing but PatientID and StudyInstanceUID (pydicom
``specific_tags``, no pixel data) and turns the value into a salted hash before returning.
The raw identifier never leaves :func:`group_keys`; nothing here logs or stores it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from fedmoco.labels import hash_group

_TAGS = ["PatientID", "StudyInstanceUID"]


def group_keys(paths: Sequence[Path], salt: bytes) -> list[str | None]:
    """Per file, the salted BLAKE2b hash (hex) of its PatientID, or of its StudyInstanceUID when
    PatientID is empty; None when neither is present or the file does not parse."""
    out: list[str | None] = []
    for path in paths:
        try:
            ds = dcmread(path, specific_tags=_TAGS, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            out.append(None)
            continue
        for tag in _TAGS:
            value = str(ds.get(tag, "") or "").strip()
            if value:
                out.append(hash_group(f"{tag}:{value}", salt))
                break
        else:
            out.append(None)
        del ds
    return out


group_keys.source = "patient"  # type: ignore[attr-defined]  # what fedmoco reports as the group kind
