"""Medical domain: DICOM folders as PACS export them, for federated MoCo.

* :func:`read_dicom` -> :class:`DicomImage` (float32 pixels in modality units, technical
  metadata only) or :class:`DicomReadError` (a ValueError naming file and reason);
* :func:`build_pretrain_data` / :func:`build_labelled_data`: the domain contract of
  :mod:`fedmoco.data`;
* :func:`make_demo_archive`: a synthetic hospital archive for demos and tests.

Options, windowing, augmentations and decoders: docs/medical.md.
"""

from .dataset import (
    MedicalLabelledDataset,
    MedicalPretrainDataset,
    build_labelled_data,
    build_pretrain_data,
    default_normalization,
)
from .demo import make_demo_archive, write_dicom
from .groups import group_keys
from .options import CT_PRESETS, MedicalOptions
from .reader import DicomHeader, DicomImage, DicomReadError, read_dicom, read_header

__all__ = [
    "CT_PRESETS",
    "DicomHeader",
    "DicomImage",
    "DicomReadError",
    "MedicalLabelledDataset",
    "MedicalOptions",
    "MedicalPretrainDataset",
    "build_labelled_data",
    "build_pretrain_data",
    "default_normalization",
    "group_keys",
    "make_demo_archive",
    "read_dicom",
    "read_header",
    "write_dicom",
]
