"""Datasets over a folder of DICOM files, and the two domain entry points of fedmoco.data."""

from __future__ import annotations

import logging
import os
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmoco.data import (
    DataConfig,
    LabelledData,
    Normalization,
    OneItemPerRecord,
    PretrainData,
    Renormalized,
    TwoViews,
    format_skipped,
    list_files,
    one_thread,
    read_labels,
)
from fedmoco.cache import SampleCache, Stamp, cache_nbytes, file_stamps, open_cache, stat_stamp
from fedmoco.errors import DataError, NoUsableData

from .index import FileRecord, build_samples, cache_file, modality_counts, scan
from .options import CT_PRESETS, MedicalOptions
from .dicom_types import INCONSISTENT, DicomImage, DicomReadError
from .base import BASE_OPTIONS, IMAGE, WINDOW, base_size, from_base, to_base

# .transforms (MONAI) is imported where a per-sample pipeline is built: a site whose views are
# made per batch from the cache (fedmoco.gpu_augment) never loads MONAI (3-7 s per round).

log = logging.getLogger(__name__)

#: Version of the decoded bases (reader, windowing, 2.5D stacking); part of the sample cache's key.
#: 2: MONOCHROME1 under CT presets, Planar Configuration of compressed colour, Modality LUTs,
#: series keys with the image orientation.
DECODE_VERSION = 2

def read_dicom(path: Path, frames: list[int], limits) -> DicomImage:
    """:func:`.reader.read_dicom`, importing pydicom only when a sample is decoded (not when
    every sample comes from the sample cache)."""
    from .reader import read_dicom as read

    return read(path, frames, limits)


# Fixed, not estimated: windowing already maps every modality to [0, 1], and in a federation
# every hospital must feed the shared encoder the same scale, which per-site estimates
# would break. 0.5/0.25 puts [0, 1] at [-2, 2].
MEAN, STD = 0.5, 0.25
# ITU-R BT.601 luma, the weights of PIL's "L" mode.
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def default_normalization(channels: int) -> Normalization:
    """Mean 0.5, std 0.25 per channel (inputs are windowed to [0, 1])."""
    return Normalization(mean=[MEAN] * channels, std=[STD] * channels)


class _DicomSamples(Dataset):
    """Loads sample ``i`` as ``{"image": (C, H, W) float32 modality units, "window": ...}``.

    Holds only the index: root, relative paths, modality and shape per file, and the sample
    table (N, slices, 2) of (file, frame). Picklable for DataLoader workers.
    """

    def __init__(self, root: Path, records: list[FileRecord], samples: np.ndarray,
                 opts: MedicalOptions) -> None:
        self.root = Path(root)
        self.records = records
        self.samples = samples
        self.opts = opts

    def __len__(self) -> int:
        return len(self.samples)

    def file_of(self, i: int) -> Path:
        """The file holding the centre slice of sample ``i``."""
        return self.root / self.records[int(self.samples[i, len(self.samples[i]) // 2, 0])].path

    def load(self, i: int) -> dict[str, Any] | None:
        """Read sample ``i``; ``None`` (with a warning naming file and reason) if unreadable."""
        refs = [(int(f), int(fr)) for f, fr in self.samples[i]]
        wanted: dict[int, list[int]] = {}
        for f, fr in refs:
            wanted.setdefault(f, [])
            if fr not in wanted[f]:
                wanted[f].append(fr)
        try:
            images = {f: read_dicom(self.root / self.records[f].path, sorted(frames), self.opts.limits)
                      for f, frames in wanted.items()}
            planes = [self._plane(images[f], fr) for f, fr in refs]
            if len({p.shape for p in planes}) > 1:
                raise DicomReadError(self.file_of(i), INCONSISTENT,
                                     "neighbouring slices differ in size since indexing")
        except DicomReadError as exc:
            log.warning("skipping sample %d: %s", i, exc)
            return None
        centre_file, centre_frame = refs[len(refs) // 2]
        image = np.concatenate(planes) if len(planes) > 1 else planes[0]
        if self.opts.channels == 3 and image.shape[0] == 1:
            image = np.repeat(image, 3, axis=0)
        window = self._window(images[centre_file], centre_frame)
        return {IMAGE: torch.from_numpy(np.ascontiguousarray(image)), WINDOW: window}

    def _plane(self, image: DicomImage, frame: int) -> np.ndarray:
        """Frame ``frame`` as (C, H, W): RGB becomes luma unless 3 channels are wanted."""
        plane = image.pixels[image.frames.index(frame)]
        if plane.shape[0] == 3 and self.opts.channels == 1:
            plane = np.tensordot(_LUMA, plane, axes=1)[None]
        return plane

    def _window(self, image: DicomImage, frame: int = 0) -> tuple[float, float] | None:
        """(centre, width) in the pixels' units for file frame ``frame``, or None for
        percentiles. An enhanced file's frames can each carry their own window."""
        if image.channels == 3 and image.value_range is not None:
            lo, hi = image.value_range
            return ((lo + hi) / 2, hi - lo)
        own = image.window(frame)
        if image.modality == "CT":
            choice = self.opts.ct_window
            if choice in CT_PRESETS:
                centre, width = CT_PRESETS[choice]
                if image.photometric_interpretation == "MONOCHROME1":
                    # The pixels were reflected to MONOCHROME2's convention, so are no longer HU: the
                    # preset's centre is reflected with them, as a file's own window is. Unreflected,
                    # every MONOCHROME1 CT came out blank (found by an audit).
                    from .reader import _reflect  # pydicom's reader: imported where files are read

                    centre = _reflect(centre, image.value_range)
                return centre, width
            return own if choice == "file" else None
        return own if self.opts.window == "file" else None


class MedicalPretrainDataset(_DicomSamples):
    """``dataset[i]`` -> (view_q, view_k), each (C, S, S) float32 normalised, or None.

    With a :class:`fedmoco.cache.SampleCache` the decoded, windowed, resized base of each
    sample is stored on first use and read back afterwards (``transforms.to_base``).
    """

    def __init__(self, root, records, samples, opts, pipeline=None,
                 cache: SampleCache | None = None, image_size: int = 0,
                 normalization: Normalization | None = None,
                 stamps: list[Stamp] | None = None) -> None:
        """``pipeline``: a ``transforms.ViewPipeline``, or None to build the MONAI pipeline of
        ``opts`` at ``image_size`` on the first per-sample view (batched views never need it).
        ``stamps``: :func:`fedmoco.cache.stat_stamp` (size, mtime_ns, ctime_ns) of each record's
        file when the cache was keyed (required with ``cache``): a cached base is served only
        while its files still match."""
        super().__init__(root, records, samples, opts)
        self.normalization = normalization or (pipeline.normalization if pipeline is not None
                                               else default_normalization(opts.in_channels))
        self._views = None if pipeline is None else TwoViews(pipeline)
        self.cache = cache
        self.image_size = image_size
        if cache is not None and (stamps is None or len(stamps) != len(records)):
            raise ValueError("a sample cache needs the stat stamp of every record")
        self.stamps = None if stamps is None else [tuple(s) for s in stamps]
        # {sample: its files' stamps when this process decoded it again}: see base()
        self.renewed: dict[int, dict[int, Stamp]] = {}

    @property
    def views(self) -> TwoViews:
        """The per-sample view pair (MONAI), built on first use."""
        if self._views is None:
            from .transforms import ViewPipeline, pretrain_pipeline

            self._views = TwoViews(ViewPipeline(pretrain_pipeline(self.opts, self.image_size), self.normalization))
        return self._views

    def base(self, i: int) -> tuple[np.ndarray, int] | None:
        """Base of sample ``i`` from the cache (decoded and stored on a miss), or None if unreadable.

        A hit is served only while the sample's files keep the size, mtime and ctime they had
        when the cache was keyed (one ``os.stat`` per file and read, about a microsecond). A
        file rewritten during a run is decoded again for each sample that reads it (every frame
        of a multi-frame file, every stack it is a slice of), the new base stored and the stamps
        it was decoded at kept for that sample, in this process (the next run keys a new cache
        anyway). A file rewritten *while* it is decoded may give a torn base, kept under the
        stamps from before the decode: the ctime has moved since, so it is never served, and
        the next read decodes again. A file now gone or broken gives None, as without a cache.

        Without a cache (turned off, or no room for one) the same base is made from a fresh
        decode: the batched views, and so a seeded run's random draws, do not depend on
        whether a cache could be built.
        """
        if self.cache is None:
            sample = self.load(i)
            return None if sample is None else to_base(sample, self.opts, base_size(self.opts, self.image_size))
        now = self._file_stamps(i)
        # Per sample, not per file: a stamp renewed by one sample of a rewritten file must not
        # let the file's other samples (frames, neighbouring slices) serve their old bases.
        expected = self.renewed.get(i) or {f: self.stamps[f] for f in now}
        hit = self.cache.get(i) if now == expected else None
        if hit is not None:
            return hit
        sample = self.load(i)
        if sample is None:
            return None
        base, tag = to_base(sample, self.opts, self.cache.shape[-1])
        try:
            self.cache.put(i, base, tag)
        except OSError as exc:  # its volume filled up since the room check: decode instead, from now on
            log.warning("%s: cannot store decoded samples (%s); decoding every epoch instead", self.cache.path.parent,
                        exc)
            self.cache = None
            return base, tag
        if now != expected:
            self.renewed[i] = now
        return base, tag

    def _file_stamps(self, i: int) -> dict[int, Stamp]:
        """{record: its stat stamp now} for the files of sample ``i`` (a missing file: (-1, -1, -1))."""
        now = {}
        for f in {int(f) for f in self.samples[i, :, 0]}:
            try:
                now[f] = stat_stamp(os.stat(self.root / self.records[f].path))
            except OSError:
                now[f] = (-1, -1, -1)
        return now

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        # MONAI transforms keep their own numpy RandomState, which forked DataLoader workers
        # would all copy and replay, and which no checkpoint saves. Reseeding per sample from
        # torch's generator fixes both: workers get torch's distinct per-worker seeds, and
        # the engine's saved RNG state makes a resumed run augment as the uninterrupted one.
        self.views.transform.set_random_state(int(torch.randint(0, 2**31 - 1, ())))
        with one_thread():
            if self.cache is None:
                sample = self.load(i)
            else:
                found = self.base(i)
                sample = None if found is None else from_base(*found)
            return None if sample is None else self.views(sample)

    def batched_views(self) -> tuple[Dataset, torch.nn.Module] | None:
        """(dataset of bases, module making both views per batch), or None with elastic
        deformation (not available per batch). The bases come from the cache when there is
        one, else from a decode per read (:meth:`base`)."""
        if self.opts.elastic_prob > 0:
            return None
        from fedmoco.gpu_augment import MedicalViews  # only sites that batch their views pay the import

        return MedicalBases(self), MedicalViews(self.opts, self.image_size, self.normalization)


class MedicalBases(Dataset):
    """``dataset[i]`` -> (base float16 (C, W, W) in window units, tag int), or None."""

    def __init__(self, source: MedicalPretrainDataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        with one_thread():
            found = self.source.base(i)
        if found is None:
            return None
        return torch.from_numpy(np.array(found[0])), found[1]


class MedicalLabelledDataset(_DicomSamples):
    """``dataset[i]`` -> (image (C, S, S) float32 normalised, label int), or None."""

    def __init__(self, root, records, samples, opts, pipeline: ViewPipeline, labels: list[int]) -> None:
        super().__init__(root, records, samples, opts)
        self.pipeline = pipeline
        self.labels = np.asarray(labels, dtype=np.int64)

    def label_of(self, i: int) -> int:
        return int(self.labels[self.samples[i, len(self.samples[i]) // 2, 0]])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        with one_thread():
            sample = self.load(i)
            return None if sample is None else (self.pipeline(sample), self.label_of(i))


def index_folder(root: Path, opts: MedicalOptions, cfg: DataConfig | None = None,
                 exclude: Sequence[Path] = ()) -> tuple[list[FileRecord], Counter]:
    """Scan ``root`` (without the files in ``exclude``, such as a labels CSV kept there), keep
    the selected modalities; DataError if nothing usable. The header index is cached in the
    cache folder (``cfg.cache_dir``, else the ``cache_dir`` option, else the default) unless
    ``cfg.cache`` or the ``cache`` option is off: then nothing is written."""
    files = list_files(root, exclude=exclude)
    cfg = cfg or DataConfig()
    cache = cache_file(root, _cache_dir(opts, cfg)) if _caching(opts, cfg) else None
    records, skipped = scan(root, files, cache, opts.limits)
    if opts.modalities:
        kept = [r for r in records if r.modality in opts.modalities]
        if len(kept) < len(records):
            skipped[f"modality not in {','.join(opts.modalities)}"] += len(records) - len(kept)
        records = kept
    if not records:
        raise NoUsableData(f"{root}: no usable DICOM image among {len(files)} files; {format_skipped(skipped)}")
    log.info("%s: %d usable DICOM files", root, len(records))
    return records, skipped


def _describe(records: list[FileRecord], n_samples: int, opts: MedicalOptions, skipped: Counter) -> str:
    per_modality = ", ".join(f"{m} {n}" for m, n in sorted(modality_counts(records).items()))
    return (
        f"medical: {n_samples} samples from {len(records)} DICOM files ({per_modality}); "
        f"{opts.in_channels} channel(s); CT window {opts.ct_window}, others {opts.window}; "
        f"{format_skipped(skipped)}"
    )


def _caching(opts: MedicalOptions, cfg: DataConfig) -> bool:
    """Whether this build may write to the cache folder (header index, decoded samples): the
    run's ``cache`` and the domain's ``cache`` option both on."""
    return bool(cfg.cache and opts.cache)


def _cache_dir(opts: MedicalOptions, cfg: DataConfig) -> str | None:
    """The run's cache folder, else the ``cache_dir`` option; None: the default folder."""
    return cfg.cache_dir or opts.cache_dir or None


def _base_shape(opts: MedicalOptions, image_size: int) -> tuple[int, int, int]:
    """(channels, size, size) of a cached base."""
    size = base_size(opts, image_size)
    return opts.in_channels, size, size


def _sample_cache(root: Path, records: list[FileRecord], samples: np.ndarray, opts: MedicalOptions,
                  cfg: DataConfig) -> tuple[SampleCache | None, list[Stamp] | None]:
    """(the decoded-sample cache of this folder and these options, the stat stamp of each
    record as keyed), or (None, None) when turned off (``DataConfig.cache`` false, or the
    medical option ``cache=false``) or when the cache cannot be created."""
    if not _caching(opts, cfg):
        return None, None
    # "decode": bumped with every change to how a base is decoded, windowed or stacked, so a cache
    # filled by an older fedmoco is not served (the MONOCHROME1 preset and Planar Configuration
    # fixes left blank and mosaic bases in place until the cache was cleared; found by a review).
    options = {k: getattr(opts, k) for k in BASE_OPTIONS} | {"image_size": cfg.image_size, "decode": DECODE_VERSION}
    stamps = file_stamps(root, [root / r.path for r in records])
    cache = open_cache(root, "medical", len(samples), _base_shape(opts, cfg.image_size), "float16", options, stamps,
                       _cache_dir(opts, cfg))
    return (None, None) if cache is None else (cache, [s[1:] for s in stamps])


def build_pretrain_data(root: Path, cfg: DataConfig) -> PretrainData:
    """Two-view MoCo data over the DICOM files under ``root`` (see fedmoco.data).

    Every frame or slice is a sample; views are (C, cfg.image_size, cfg.image_size) float32,
    windowed to [0, 1], augmented independently, normalised with mean 0.5 / std 0.25.
    """
    opts = MedicalOptions.parse(cfg.options)
    records, skipped = index_folder(Path(root), opts, cfg)
    samples = build_samples(records, opts.slices)
    normalization = cfg.run_normalization(opts.in_channels, lambda: default_normalization(opts.in_channels))
    cache, stamps = _sample_cache(Path(root), records, samples, opts, cfg)
    dataset = MedicalPretrainDataset(root, records, samples, opts, None, cache, cfg.image_size, normalization,
                                     stamps)
    return PretrainData(
        dataset=dataset,
        in_channels=opts.in_channels,
        normalization=normalization,
        skipped=skipped,
        description=_describe(records, len(samples), opts, skipped),
        cache_bytes=cache_nbytes(len(samples), _base_shape(opts, cfg.image_size), "float16"),
        release_view=partial(_release_view, dataset, normalization, opts),  # built when a release asks
    )


def _release_view(dataset: MedicalPretrainDataset, normalization: Normalization, opts: MedicalOptions,
                  target: Normalization | None) -> Dataset | str:
    """The release view (fedmoco.data.ReleaseView). The record is a file. Each sample is one
    slice or frame, windowed by its own header and pixels, normalised with fixed constants
    (``normalization``; renormalised to the federation's ``target`` when it fixed one); a
    multi-frame file owns several samples, so a release reads one random frame per file
    (:class:`fedmoco.data.OneItemPerRecord`). With ``slices`` > 1 a sample stacks its
    neighbours, so one slice file moves up to ``slices`` samples; the release is accounted for
    one, so such a site does not share."""
    if opts.slices > 1:
        return (f"medical option slices={opts.slices} stacks neighbouring slice files into each sample, so one "
                f"file moves up to {opts.slices} summaries")
    # Uncached: whether the sample cache exists depends on all samples against the free disk,
    # and a cached base is not bit for bit what decoding the file gives.
    uncached = MedicalPretrainDataset(dataset.root, dataset.records, dataset.samples, opts, None, None,
                                      dataset.image_size, normalization)
    files: dict[int, list[int]] = {}
    for i, file in enumerate(dataset.samples[:, 0, 0].tolist()):
        files.setdefault(int(file), []).append(i)
    per_file = uncached if all(len(g) == 1 for g in files.values()) else OneItemPerRecord(uncached,
                                                                                         list(files.values()))
    return per_file if target is None else Renormalized(per_file, normalization, target)


def build_labelled_data(
    root: Path,
    cfg: DataConfig,
    labels_csv: Path | None,
    normalization: Normalization | None,
    exclude: Sequence[Path] = (),
) -> LabelledData:
    """Single deterministic view per sample with the label of its file (see fedmoco.data).

    Labels come from ``labels_csv`` or the first sub-folder name; all frames of a file share
    it. The view is the windowed image's centre square resized to cfg.image_size.
    ``normalization`` (from the checkpoint) is used when given.
    """
    opts = MedicalOptions.parse(cfg.options)
    root = Path(root)
    records, skipped = index_folder(root, opts, cfg, exclude)
    if skipped:  # the pretraining loop reports PretrainData.skipped; evaluation does not
        log.warning("%s: %s", root, format_skipped(skipped))
    labels, classes = read_labels(root, [root / r.path for r in records], labels_csv)
    if normalization is None:
        normalization = default_normalization(opts.in_channels)
    elif normalization.channels != opts.in_channels:
        raise DataError(
            f"normalization has {normalization.channels} channels but the medical options give "
            f"{opts.in_channels} (slices={opts.slices}, channels={opts.channels})"
        )
    samples = build_samples(records, opts.slices)
    from .transforms import ViewPipeline, eval_pipeline  # every labelled sample goes through MONAI

    pipeline = ViewPipeline(eval_pipeline(opts, cfg.image_size), normalization)
    dataset = MedicalLabelledDataset(root, records, samples, opts, pipeline, labels)
    return LabelledData(
        dataset=dataset,
        classes=classes,
        in_channels=opts.in_channels,
        normalization=normalization,
        skipped=skipped,
        sample_labels=[dataset.label_of(i) for i in range(len(dataset))],
    )
