"""Medical domain: DICOM folders as PACS export them, for federated MoCo.

* :func:`read_dicom` -> :class:`DicomImage` (float32 pixels in modality units, technical
  metadata only) or :class:`DicomReadError` (a ValueError naming file and reason);
* :func:`build_pretrain_data` / :func:`build_labelled_data`: the domain contract of
  :mod:`fedmoco.data`;
* :func:`make_demo_archive`: a synthetic hospital archive for demos and tests.

Options, windowing, augmentations and decoders: docs/medical.md.
"""

from domains import lazy_exports

# Loaded on first use (PEP 562): every federated round is a fresh process, and a site pays
# only for the submodules it touches (the demo writer and MONAI's pipelines are not needed to
# train from the cache).
_WHERE = {
    "MedicalLabelledDataset": ".dataset", "MedicalPretrainDataset": ".dataset", "build_labelled_data": ".dataset",
    "build_pretrain_data": ".dataset", "default_normalization": ".dataset",
    "make_demo_archive": ".demo", "write_dicom": ".demo",
    "group_keys": ".groups",
    "CT_PRESETS": ".options", "MedicalOptions": ".options",
    "DicomHeader": ".reader", "DicomImage": ".reader", "DicomReadError": ".reader", "read_dicom": ".reader",
    "read_header": ".reader",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

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
