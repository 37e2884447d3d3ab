"""``fedmoco embed``: one backbone feature vector per image of a folder, with where it came from.

Writes ``OUT.npy`` (N, F) float32 and ``OUT.csv`` with columns ``row,path,region``: row i of
the CSV names the sample whose features are row i of the array. ``path`` is relative to the
data folder; ``region`` is empty for a whole image, ``frame=K`` for frame K of a multi-frame
DICOM file, ``window=col,row,width,height`` (pixels) for a raster tile. Unreadable samples
are skipped and counted, never written as zeros.

The images go through the checkpoint's recorded input pipeline (domain, options, image
size, normalisation), the same one ``knn``/``linear-probe``/``finetune`` use.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmoco.atomic import atomic_write, atomic_write_text
from fedmoco.checkpoint import load_checkpoint
from fedmoco.data import DataConfig, build_labelled_data, check_data_dir, list_files, recorded_pipeline
from fedmoco.errors import CheckpointError, DataError
from fedmoco.evaluate import extract_features

log = logging.getLogger(__name__)

UNLABELLED = "unlabelled"


@dataclass
class EmbedResult:
    array: Path
    table: Path
    n: int
    dim: int
    skipped: int
    skipped_files: Counter = field(default_factory=Counter)  # files under data not read, by reason


def output_paths(out: Path | str) -> tuple[Path, Path]:
    """``out`` with or without ``.npy``/``.csv`` -> (``X.npy``, ``X.csv``)."""
    out = Path(out)
    if out.suffix.lower() in (".npy", ".csv"):
        out = out.with_suffix("")
    return out.with_name(out.name + ".npy"), out.with_name(out.name + ".csv")


class _Indexed(Dataset):
    """Yields ``(image, i)`` so the sample index survives the dropping of unreadable ones."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (item[0], i)


def sample_origin(dataset: Dataset, i: int, root: Path) -> tuple[str, str]:
    """(path relative to ``root``, region) of sample ``i`` of a domain's labelled dataset."""
    if hasattr(dataset, "records") and hasattr(dataset, "samples"):  # medical: (file, frame) table
        centre = dataset.samples[i, len(dataset.samples[i]) // 2]
        record = dataset.records[int(centre[0])]
        return str(Path(record.path).as_posix()), f"frame={int(centre[1])}"
    if hasattr(dataset, "windows") and hasattr(dataset, "reader"):  # satellite: grid tiles
        src, w = dataset.windows[i]
        path = Path(dataset.reader.sources[src].bands[0].path)
        # (col, row, width, height): a plain tuple in the satellite domain, a rasterio Window elsewhere
        col, row, width, height = (w.col_off, w.row_off, w.width, w.height) if hasattr(w, "col_off") else w
        region = f"window={int(col)},{int(row)},{int(width)},{int(height)}"
        return _relative(path, root), region
    if hasattr(dataset, "files"):  # image folders
        return _relative(Path(dataset.files[i]), root), ""
    raise TypeError(f"embed: cannot name the samples of {type(dataset).__name__}")


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root``: as listed under it (a link to a file elsewhere keeps its
    own name in the folder), else resolved, else as given."""
    for p, r in ((Path(path), Path(root)), (Path(path).resolve(), Path(root).resolve())):
        try:
            return p.relative_to(r).as_posix()
        except ValueError:
            continue
    return str(path)


def _unlabelled_csv(root: Path, folder: Path) -> Path:
    """A labels CSV giving every file under ``root`` one label: the domains' labelled
    datasets are the deterministic single-view pipelines we need, and they want labels."""
    path = folder / "labels.csv"
    # surrogateescape: a file name need not be UTF-8 (read back by fedmoco.data._csv_labels)
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for f in list_files(root):
            # as listed, under root: resolving would name a linked file by its target, outside root
            writer.writerow([f.relative_to(root).as_posix(), UNLABELLED])
    return path


def embed_folder(checkpoint: Path | str, data: Path | str, out: Path | str, *, domain: str | None = None,
                 options: dict[str, Any] | None = None, batch_size: int = 128, num_workers: int = 0,
                 device: torch.device | None = None, progress: bool = True) -> EmbedResult:
    """Embed every readable sample under ``data`` with the checkpoint's frozen backbone."""
    from fedmoco.pretrain import model_from_checkpoint

    root = check_data_dir(data)
    npy, table = output_paths(out)
    for target in (npy, table):  # both checked before any work, and before either is replaced
        if target.is_dir():
            raise DataError(f"{target}: is a folder; give --out a path whose .npy and .csv are free or files")
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    meta = ckpt["data"]
    domain, data_options, norm = recorded_pipeline(meta, domain, options, model.cfg.in_channels, checkpoint)
    cfg = DataConfig(image_size=meta["image_size"], options=data_options)
    with tempfile.TemporaryDirectory(prefix="fedmoco-embed-") as tmp:
        labelled = build_labelled_data(domain, root, cfg, _unlabelled_csv(root, Path(tmp)), norm, own_csv=True)
    if labelled.in_channels != model.cfg.in_channels:
        raise CheckpointError(f"{checkpoint}: encoder takes {model.cfg.in_channels} channel(s) but {root} "
                              f"gives {labelled.in_channels}")
    feats, index, skipped = extract_features(model.encoder_q.backbone, _Indexed(labelled.dataset),
                                             device=device or torch.device("cpu"), batch_size=batch_size,
                                             num_workers=num_workers, progress=progress)
    if skipped:
        log.warning("%s: skipped %d unreadable samples", root, skipped)
    npy.parent.mkdir(parents=True, exist_ok=True)
    array = feats.numpy().astype(np.float32)
    atomic_write(npy, lambda fh: np.save(fh, array))
    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(["row", "path", "region"])
    for row, i in enumerate(index.tolist()):
        writer.writerow([row, *sample_origin(labelled.dataset, i, root)])
    atomic_write_text(table, rows.getvalue())
    return EmbedResult(array=npy, table=table, n=feats.shape[0], dim=feats.shape[1], skipped=skipped,
                       skipped_files=Counter(labelled.skipped))
