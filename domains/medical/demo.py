"""A small synthetic hospital archive, and the DICOM writer it (and the tests) use.

:func:`make_demo_archive` writes, for each patient, a CT series of an anatomy phantom (chest,
abdomen or head: ellipsoids with realistic HU values stored through RescaleSlope/Intercept)
and a MONOCHROME1 computed radiograph projected from the same phantom; one patient's CT is a
multi-frame Enhanced CT object. Files rotate through the transfer syntaxes that can be
written here. Stray objects a PACS export contains are mixed in: a truncated file, a text
file, an RT plan and a structured report without pixel data.

Every identifier is synthetic. The output is a pure function of the arguments.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    RTPlanStorage,
    generate_uid,
)

PHANTOMS = ("chest", "abdomen", "head")

# Transfer syntaxes that can be written here, and with what:
# pydicom alone (native, deflate, RLE), pyjpegls (JPEG-LS), pylibjpeg-openjpeg (JPEG 2000),
# python-gdcm (JPEG baseline, 12-bit extended, lossless).
NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                   DeflatedExplicitVRLittleEndian)
PYDICOM_ENCODED = (RLELossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000)
GDCM_ENCODED = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
WRITABLE_SYNTAXES = NATIVE_SYNTAXES + PYDICOM_ENCODED + GDCM_ENCODED

# The demo's rotation: every file takes the next one (JPEG Extended 12-bit is left out on
# purpose: it needs the GPL extra to decode).
_DEMO_SYNTAXES = (ExplicitVRLittleEndian, RLELossless, ImplicitVRLittleEndian, JPEG2000Lossless,
                  ExplicitVRBigEndian, JPEGLSLossless, DeflatedExplicitVRLittleEndian, JPEGLossless)


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_class: str = CTImageStorage,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    attributes: dict[str, Any] | None = None,
    uid_seed: str = "",
) -> Path:
    """Write ``pixels`` as a DICOM Part-10 file; return the path.

    ``pixels``: integer array (rows, columns), (frames, rows, columns), or with a trailing
    axis of 3 for RGB/YBR photometrics. Its dtype sets BitsAllocated and
    PixelRepresentation; ``bits_stored`` defaults to BitsAllocated. ``attributes`` maps
    DICOM keywords to values (Modality, RescaleSlope, PatientName, ...). UIDs derive from
    ``uid_seed`` and the file name, so the same call writes the same bytes.
    """
    path = Path(path)
    arr = np.asarray(pixels)
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    frames = arr.shape[0] if arr.ndim == (4 if colour else 3) else 1
    rows, columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
    ts = UID(transfer_syntax)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    instance = generate_uid(entropy_srcs=[uid_seed, path.name, "instance"])
    ds.file_meta.MediaStorageSOPInstanceUID = instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance
    ds.Modality = "CT"
    ds.Rows, ds.Columns = int(rows), int(columns)
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in (attributes or {}).items():
        setattr(ds, keyword, value)
    native = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="), copy=False))
    ds.PixelData = native.tobytes()
    if ds.BitsAllocated > 8:
        ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    if ts == ExplicitVRBigEndian:
        ds.PixelData = native.byteswap().tobytes()
        ds.file_meta.TransferSyntaxUID = ts
    elif ts in NATIVE_SYNTAXES:
        ds.file_meta.TransferSyntaxUID = ts
    elif ts in PYDICOM_ENCODED:
        kwargs = {"jls_error": 2} if ts == JPEGLSNearLossless else {}
        if ts == JPEG2000:
            kwargs = {"j2k_cr": [20]}
        # openjpeg logs every tile at INFO; that is noise in a training log.
        quiet = logging.getLogger("openjpeg")
        level = quiet.level
        quiet.setLevel(max(level, logging.WARNING))
        try:
            ds.compress(ts, native, generate_instance_uid=False, **kwargs)
        finally:
            quiet.setLevel(level)
    elif ts in GDCM_ENCODED:
        _write_with_gdcm(ds, path, ts)
        return path
    else:
        raise ValueError(f"write_dicom: cannot write transfer syntax {ts.name} ({ts}) here")
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_with_gdcm(ds: Dataset, path: Path, ts: UID) -> None:
    """Transcode through GDCM, the only JPEG (non-LS) encoder installed here."""
    import gdcm

    target = {
        JPEGBaseline8Bit: gdcm.TransferSyntax.JPEGBaselineProcess1,
        JPEGExtended12Bit: gdcm.TransferSyntax.JPEGExtendedProcess2_4,
        JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14,
        JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
    }[ts]
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "plain.dcm")
        ds.save_as(plain, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(plain)
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(target))
        if not reader.Read():
            raise ValueError(f"write_dicom: GDCM cannot read back {plain}")
        change.SetInput(reader.GetImage())
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        if not change.Change():
            raise ValueError(f"write_dicom: GDCM cannot encode this image as {ts.name}")
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise ValueError(f"write_dicom: GDCM cannot write {path}")


def write_non_image(path: str | os.PathLike, sop_class: str, *, uid_seed: str = "",
                    attributes: dict[str, Any] | None = None) -> Path:
    """Write a DICOM object without pixel data (RT plan, structured report, ...)."""
    path = Path(path)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, path.name])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for keyword, value in (attributes or {}).items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- phantoms

# (centre x, y, z, radius x, y, z, HU): later ellipsoids overwrite earlier ones.
# x: patient left-right, y: anterior (-) to posterior (+), z: feet (-) to head (+), in [-1, 1].
_ANATOMY: dict[str, list[tuple[float, ...]]] = {
    "chest": [
        (0, 0, 0, 0.88, 0.62, 3, -100),  # subcutaneous fat
        (0, 0, 0, 0.80, 0.55, 3, 40),  # muscle / soft tissue
        (-0.40, -0.02, 0, 0.30, 0.42, 1.1, -850),  # right lung
        (0.40, -0.02, 0, 0.30, 0.42, 1.1, -850),  # left lung
        (0.08, -0.12, -0.3, 0.24, 0.22, 0.6, 45),  # heart
        (-0.08, 0.20, 0, 0.07, 0.07, 3, 180),  # contrast-filled aorta
        (0, 0.42, 0, 0.10, 0.09, 3, 700),  # vertebra
    ],
    "abdomen": [
        (0, 0, 0, 0.90, 0.72, 3, -100),
        (0, 0, 0, 0.82, 0.64, 3, 40),
        (-0.38, -0.08, 0.3, 0.40, 0.36, 0.9, 60),  # liver
        (0.48, 0.05, 0.4, 0.16, 0.22, 0.5, 50),  # spleen
        (-0.33, 0.33, 0, 0.12, 0.16, 0.5, 30),  # right kidney
        (0.33, 0.33, 0, 0.12, 0.16, 0.5, 30),  # left kidney
        (0.15, -0.30, -0.3, 0.12, 0.08, 0.4, -900),  # bowel gas
        (0, 0.48, 0, 0.10, 0.09, 3, 700),  # vertebra
    ],
    "head": [
        (0, 0, 0, 0.74, 0.90, 1.3, 1000),  # skull
        (0, 0, 0, 0.66, 0.82, 1.2, 35),  # brain
        (-0.12, -0.05, 0.1, 0.06, 0.28, 0.35, 5),  # lateral ventricles
        (0.12, -0.05, 0.1, 0.06, 0.28, 0.35, 5),
        (0, -0.95, -0.6, 0.15, 0.10, 0.3, -1000),  # sinus air
    ],
}


def _jittered(kind: str, rng: np.random.Generator) -> np.ndarray:
    """The phantom's ellipsoids with per-patient position, size and HU variation."""
    table = np.asarray(_ANATOMY[kind], dtype=np.float64)
    out = table.copy()
    out[:, 0:3] += rng.uniform(-0.05, 0.05, size=(len(table), 3))
    out[:, 3:6] *= rng.uniform(0.88, 1.12, size=(len(table), 3))
    out[:, 6] += rng.uniform(-15, 15, size=len(table))
    return out


def _hu(ellipsoids: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """HU of the phantom at points (x, y, z) (broadcast arrays); air outside."""
    hu = np.full(np.broadcast(x, y, z).shape, -1000.0)
    for cx, cy, cz, rx, ry, rz, value in ellipsoids:
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0
        hu[inside] = value
    return hu


def _ct_volume(ellipsoids, n_slices: int, size: int, noise: float, rng) -> np.ndarray:
    """(slices, size, size) HU, axial slices evenly spaced in z in [-0.6, 0.6]."""
    coords = np.linspace(-1, 1, size)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    zs = np.linspace(-0.6, 0.6, n_slices)
    vol = np.stack([_hu(ellipsoids, x, y, np.full_like(x, z)) for z in zs])
    return vol + rng.normal(0, noise, vol.shape)


def _radiograph(ellipsoids, size: int, rng) -> np.ndarray:
    """(size, size) attenuation-line-integral image in [0, 1]: rows head->feet, columns x."""
    coords = np.linspace(-1, 1, size)
    depth = np.linspace(-1, 1, 32)
    z, x, y = np.meshgrid(coords[::-1], coords, depth, indexing="ij")
    mu = np.clip(_hu(ellipsoids, x, y, z) + 1000.0, 0, None) / 1000.0
    line = mu.sum(axis=-1)
    line = line / max(line.max(), 1e-6)
    return np.clip(line + rng.normal(0, 0.01, line.shape), 0, 1)


# --------------------------------------------------------------------------- archive


def make_demo_archive(
    out_dir: str | os.PathLike,
    *,
    n_patients: int = 4,
    seed: int = 0,
    image_size: int = 64,
    n_slices: int = 6,
    labelled: bool = False,
) -> Path:
    """Write a synthetic hospital DICOM archive under ``out_dir``; return ``out_dir``.

    Per patient: a CT series of ``n_slices`` slices (one patient: a single multi-frame
    Enhanced CT file) and a MONOCHROME1 CR, ``image_size`` pixels square. Patient ``i`` has
    phantom ``PHANTOMS[(i + seed) % 3]``; ``seed`` also varies geometry, HU, noise and the
    storage (signed or unsigned CT). With ``labelled`` the patients sit in one sub-folder
    per phantom (class labels for kNN); broken and non-image files go to ``misc/``
    (``unsorted/`` when labelled). With the defaults: 4 patients, 28 frames in 23 usable
    files, plus 4 stray or broken ones, written in well under a second.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counter = 0

    def next_syntax() -> UID:
        nonlocal counter
        counter += 1
        return _DEMO_SYNTAXES[(counter - 1 + seed) % len(_DEMO_SYNTAXES)]

    noise = float(rng.uniform(5, 20))  # this hospital's scanner noise, HU
    multiframe_patient = (seed + 2) % n_patients if n_patients > 1 else -1
    for i in range(n_patients):
        kind = PHANTOMS[(i + seed) % len(PHANTOMS)]
        folder = out / (kind if labelled else "") / f"patient_{i:02d}"
        tag = f"{seed}-{i}"
        common = {
            "PatientName": f"Demo^Patient{tag}",
            "PatientID": f"DEMO-{tag}",
            "PatientBirthDate": f"19{50 + (seed * 7 + i * 13) % 50:02d}0101",
            "AccessionNumber": f"ACC-DEMO-{tag}",
            "StudyInstanceUID": generate_uid(entropy_srcs=["study", tag]),
            "StudyDate": "20240101",
            "StudyTime": "120000",  # GDCM stamps the current time when it is missing
        }
        ellipsoids = _jittered(kind, rng)
        fov = 250.0 if kind == "head" else 360.0
        spacing = [fov / image_size] * 2
        hu = _ct_volume(ellipsoids, n_slices, image_size, noise, rng)
        signed = (i + seed) % 2 == 1  # both storage conventions occur in real archives
        stored = np.clip(np.rint(hu if signed else hu + 1024), -1024 if signed else 0, 3071 if signed else 4095)
        stored = stored.astype(np.int16 if signed else np.uint16)
        ct = {
            **common,
            "Modality": "CT",
            "SeriesInstanceUID": generate_uid(entropy_srcs=["ct", tag]),
            "PixelSpacing": spacing,
            "SliceThickness": 5.0,
            "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        }
        rescale = {"RescaleSlope": 1, "RescaleIntercept": 0 if signed else -1024, "RescaleType": "HU"}
        if i == multiframe_patient:
            _write_enhanced_ct(folder / "ct_enhanced.dcm", stored, ct, rescale, n_slices, tag, next_syntax())
        else:
            for s in range(n_slices):
                write_dicom(
                    folder / "ct" / f"slice_{s:03d}.dcm", stored[s],
                    transfer_syntax=next_syntax(), bits_stored=12 if not signed else 16,
                    uid_seed=tag,
                    attributes={**ct, **rescale, "InstanceNumber": s + 1,
                                "ImagePositionPatient": [-fov / 2, -fov / 2, 5.0 * s],
                                "WindowCenter": 40, "WindowWidth": 400},
                )
        # CR: 12-bit MONOCHROME1 (high stored value = dark), as many CR readers write it.
        xray = _radiograph(ellipsoids, image_size, rng)
        cr = np.rint(4095 - (200 + 3500 * xray)).astype(np.uint16)
        write_dicom(
            folder / "cr" / "IM0001", cr, transfer_syntax=next_syntax(), photometric="MONOCHROME1",
            sop_class=ComputedRadiographyImageStorage, bits_stored=12, uid_seed=tag,
            attributes={**common, "Modality": "CR", "ImagerPixelSpacing": [0.2, 0.2],
                        "SeriesInstanceUID": generate_uid(entropy_srcs=["cr", tag]),
                        "WindowCenter": 2000, "WindowWidth": 3600, "BodyPartExamined": kind.upper()},
        )

    misc = out / ("unsorted" if labelled else "misc")
    tag = f"{seed}-misc"
    junk_attrs = {"PatientName": f"Demo^Patient{tag}", "PatientID": f"DEMO-{tag}"}
    broken = write_dicom(misc / "truncated.dcm", stored[0], uid_seed=tag,
                         attributes={**junk_attrs, **rescale})
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) - stored[0].nbytes // 2])
    write_non_image(misc / "rtplan.dcm", RTPlanStorage, uid_seed=tag,
                    attributes={**junk_attrs, "Modality": "RTPLAN", "RTPlanLabel": "DEMO"})
    write_non_image(misc / "report_sr.dcm", BasicTextSRStorage, uid_seed=tag,
                    attributes={**junk_attrs, "Modality": "SR", "ValueType": "CONTAINER"})
    (misc / "export_log.txt").write_text("PACS export finished: 4 studies\n")
    return out


def _write_enhanced_ct(path: Path, stored: np.ndarray, ct: dict, rescale: dict, n: int,
                       tag: str, syntax: UID) -> None:
    """A multi-frame Enhanced CT: rescale, spacing and window in the functional groups."""
    spacing = ct["PixelSpacing"]
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([_item(PixelSpacing=spacing, SliceThickness=5.0)])
    shared.PlaneOrientationSequence = DicomSequence([_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])])
    shared.PixelValueTransformationSequence = DicomSequence([_item(**rescale)])
    shared.FrameVOILUTSequence = DicomSequence([_item(WindowCenter=40, WindowWidth=400)])
    per_frame = [
        _item(PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=[0, 0, 5.0 * s])]))
        for s in range(n)
    ]
    attrs = {k: v for k, v in ct.items() if k not in ("PixelSpacing", "SliceThickness", "ImageOrientationPatient")}
    attrs.update(SharedFunctionalGroupsSequence=DicomSequence([shared]),
                 PerFrameFunctionalGroupsSequence=DicomSequence(per_frame))
    write_dicom(path, stored, transfer_syntax=syntax, sop_class=EnhancedCTImageStorage,
                bits_stored=16 if stored.dtype.kind == "i" else 12, uid_seed=tag, attributes=attrs)


def _item(**attributes: Any) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


# --------------------------------------------------------------------------- nodule task

NODULE_CLASSES = ("normal", "nodule")
# Lungs of the chest phantom, in its normalised coordinates (see _ANATOMY["chest"]).
_LUNGS = ((-0.40, -0.02), (0.40, -0.02))
_LUNG_RADII = (0.30, 0.42)
_FOV_MM = 360.0  # chest field of view: one normalised unit is 180 mm


def _lung_point(rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A point well inside a random lung (``margin`` < 1 shrinks the lung ellipse)."""
    cx, cy = _LUNGS[int(rng.integers(2))]
    angle, radius = rng.uniform(0, 2 * np.pi), margin * np.sqrt(rng.uniform())
    return cx + radius * _LUNG_RADII[0] * np.cos(angle), cy + radius * _LUNG_RADII[1] * np.sin(angle)


def _vessels(rng: np.random.Generator, n: int) -> list[tuple[float, ...]]:
    """Pulmonary vessels: thin contrast-free blood tubes (+40 HU, 3-6 mm) running along z,
    which an axial slice cuts as small round spots in both classes."""
    out = []
    for _ in range(n):
        x, y = _lung_point(rng, 0.85)
        r = rng.uniform(1.5, 3.0) / (_FOV_MM / 2)
        out.append((x, y, 0.0, r, r, 3.0, rng.uniform(30, 50)))
    return out


def nodule_slices(
    rng: np.random.Generator, n_slices: int, image_size: int, noise: float, *, prevalence: float = 0.5,
    vessels: int = 6, lesion_mm: tuple[float, float] = (20.0, 40.0),
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """One patient's axial chest CT (n_slices, S, S) in HU, each slice's label, and the
    lesion masks (n_slices, S, S) bool.

    Each slice independently holds solid lesions with probability ``prevalence``: one to
    three nodules or small masses of ``lesion_mm`` diameter (uniform, default 20-40 mm) at
    10-70 HU with a lobulated edge, inside lung parenchyma at about -850 HU. The phantom's
    anatomy, the pulmonary vessels (which cut every slice as small soft-tissue spots) and the
    scanner noise (``noise`` HU) vary per patient. Lesion size is large for a screening task
    on purpose: at 64 px over a 360 mm field of view one pixel is 5.6 mm.
    """
    anatomy = _jittered("chest", rng)
    table = np.concatenate([anatomy, np.asarray(_vessels(rng, vessels)).reshape(-1, 7)])
    coords = np.linspace(-1, 1, image_size)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    zs = np.linspace(-0.5, 0.5, n_slices)
    volume, labels, masks = [], [], []
    for z in zs:
        hu = _hu(table, x, y, np.full_like(x, z))
        has = bool(rng.uniform() < prevalence)
        inside = np.zeros_like(hu, dtype=bool)
        for _ in range(int(rng.integers(1, 4)) if has else 0):  # 1-3 lesions, as with metastases
            cx, cy = _lung_point(rng, 0.6)
            r = rng.uniform(*lesion_mm) / 2 / (_FOV_MM / 2)
            # lobulation: the radius varies with the angle (solid nodules are rarely perfect discs)
            theta = np.arctan2(y - cy, x - cx)
            bumps = 1 + 0.15 * np.sin(int(rng.integers(3, 7)) * theta + rng.uniform(0, 2 * np.pi))
            lesion = np.hypot(x - cx, y - cy) <= r * bumps
            hu = np.where(lesion, rng.uniform(10, 70), hu)
            inside |= lesion
        volume.append(hu)
        labels.append(NODULE_CLASSES[int(has)])
        masks.append(inside)
    vol = np.stack(volume)
    return vol + rng.normal(0, noise, vol.shape), labels, np.stack(masks)


def make_nodule_archive(
    out_dir: str | os.PathLike,
    *,
    n_patients: int = 12,
    n_slices: int = 8,
    image_size: int = 64,
    seed: int = 0,
    prevalence: float = 0.5,
    labels: bool = True,
    first_patient: int = 0,
    lesion_mm: tuple[float, float] = (20.0, 40.0),
) -> Path:
    """A synthetic chest-CT archive for the nodule-detection task; returns ``out_dir``.

    Writes ``out_dir/dicom/patient_XXX/slice_YYY.dcm`` (single-frame CT, HU through
    RescaleSlope/Intercept, transfer syntaxes rotating as in :func:`make_demo_archive`) and,
    with ``labels``, ``out_dir/labels.csv`` with columns ``path,label,group``: ``path``
    relative to ``out_dir/dicom``, ``label`` ``nodule`` or ``normal`` (see
    :func:`nodule_slices`), ``group`` the synthetic patient id (slices of one patient must
    never straddle a train/test split). ``lesion_mm``: the lesions' diameter range, mm
    (:func:`nodule_slices`). ``first_patient`` offsets the patient numbers so
    several archives (sites, the labelled set) never share an id. Everything is synthetic;
    the output is a pure function of the arguments.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    noise = float(rng.uniform(8, 20))
    rows = []
    for p in range(first_patient, first_patient + n_patients):
        pid = f"SYN-{p:04d}"
        vol, slice_labels, _ = nodule_slices(rng, n_slices, image_size, noise, prevalence=prevalence,
                                             lesion_mm=lesion_mm)
        signed = p % 2 == 1
        stored = np.clip(np.rint(vol if signed else vol + 1024), -1024 if signed else 0, 3071 if signed else 4095)
        stored = stored.astype(np.int16 if signed else np.uint16)
        attrs = {"PatientName": f"Synthetic^{pid}", "PatientID": pid, "Modality": "CT",
                 "StudyInstanceUID": generate_uid(entropy_srcs=["nodule-study", str(seed), pid]),
                 "SeriesInstanceUID": generate_uid(entropy_srcs=["nodule-series", str(seed), pid]),
                 "StudyDate": "20240101", "StudyTime": "120000", "BodyPartExamined": "CHEST",
                 "PixelSpacing": [_FOV_MM / image_size] * 2, "SliceThickness": 5.0,
                 "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                 "RescaleSlope": 1, "RescaleIntercept": 0 if signed else -1024, "RescaleType": "HU",
                 "WindowCenter": -600, "WindowWidth": 1500}
        for s in range(n_slices):
            rel = Path(f"patient_{p:03d}") / f"slice_{s:03d}.dcm"
            write_dicom(out / "dicom" / rel, stored[s], transfer_syntax=_DEMO_SYNTAXES[(p + s) % 4 * 2],
                        bits_stored=16 if signed else 12, uid_seed=f"{seed}-{pid}",
                        attributes={**attrs, "InstanceNumber": s + 1,
                                    "ImagePositionPatient": [-_FOV_MM / 2, -_FOV_MM / 2, 5.0 * s]})
            rows.append((rel.as_posix(), slice_labels[s], pid))
    if labels:
        out.mkdir(parents=True, exist_ok=True)
        lines = ["path,label,group"] + [",".join(r) for r in rows]
        (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return out


def demo_syntaxes() -> Sequence[UID]:
    """The transfer syntaxes the demo archive rotates through."""
    return _DEMO_SYNTAXES
