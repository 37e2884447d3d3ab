"""The contract between the MoCo engine and the image domains.

A domain (``domains.images``, ``domains.medical``, ``domains.satellite``) is a module with
two functions:

``build_pretrain_data(root: Path, cfg: DataConfig) -> PretrainData``
    Unlabelled two-view data for MoCo. ``dataset[i]`` returns ``(view_q, view_k)``, two
    float32 tensors of shape (C, H, W) with H = W = ``cfg.image_size``, already normalised
    with ``PretrainData.normalization``; or ``None`` when sample ``i`` turned out to be
    unreadable at load time (it is then dropped by :func:`collate_views` and counted).

``build_labelled_data(root: Path, cfg: DataConfig, labels_csv: Path | None,
normalization: Normalization | None) -> LabelledData``
    Deterministic single-view data for evaluation. ``dataset[i]`` returns ``(image, label)``
    with image (C, H, W) float32, or ``None`` when unreadable; label -1 marks a file the
    labels CSV does not list. ``LabelledData.sample_labels`` gives every sample's label
    without loading it (fedmoco.labels selects the labelled samples with it).
    ``normalization`` is the one stored in the pretraining checkpoint; when given, the domain
    must use it instead of estimating its own, so evaluation sees the inputs training saw.

Both raise :class:`fedmoco.errors.DataError` (one line naming the path and the problem)
for a missing or empty folder.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from fedmoco.errors import ConfigError, DataError
from fedmoco.site_settings import SITE_SETTINGS_FILE  # re-exported: the scan skips it

log = logging.getLogger(__name__)

DOMAINS: dict[str, str] = {
    "images": "domains.images",
    "medical": "domains.medical",
    "satellite": "domains.satellite",
}


@dataclass
class Normalization:
    """Per-channel affine normalisation ``(x - mean) / std`` applied after domain scaling.

    It is part of every checkpoint: fine-tuning must feed the encoder what it was trained on.
    """

    mean: list[float]
    std: list[float]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise DataError(f"normalization: {len(self.mean)} means but {len(self.std)} stds")
        if any(s <= 0 for s in self.std):
            raise DataError(f"normalization: std must be > 0, got {self.std}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape (C, H, W) or (N, C, H, W)."""
        shape = (-1, 1, 1)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(map(float, self.mean)), "std": list(map(float, self.std))}

    @classmethod
    def from_dict(cls, d: dict[str, Sequence[float]]) -> "Normalization":
        return cls(mean=[float(v) for v in d["mean"]], std=[float(v) for v in d["std"]])


@dataclass
class DataConfig:
    """What the engine asks of a domain.

    ``options`` carries domain-specific settings (``--data-option key=value`` on the command
    line, node_config in a federation); each domain documents and validates its own keys and
    raises :class:`DataError` naming an unknown key.
    """

    image_size: int = 64
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    # Decoded-sample cache (fedmoco.cache): on by default; ``--no-cache`` / run_config cache=false.
    cache: bool = True
    cache_dir: str | None = None  # None: $FEDMOCO_CACHE_DIR, else $XDG_CACHE_HOME/fedmoco, else ~/.cache/fedmoco
    progress: bool = True  # progress bars while preparing data (filling the raster cache); off with -q
    # The run's own input normalisation (a resumed run's, from its checkpoint): used as it is
    # instead of one estimated from the data, which may have changed since the run began.
    normalization: Normalization | None = None

    def run_normalization(self, channels: int, estimate: Callable[[], Normalization]) -> Normalization:
        """``normalization`` when set (checked against the data's ``channels``), else ``estimate()``."""
        if self.normalization is None:
            return estimate()
        if self.normalization.channels != channels:
            raise DataError(f"the run's normalisation has {self.normalization.channels} channel(s), the data "
                            f"{channels}: this is not the data the run was trained on")
        return self.normalization


class Renormalized(Dataset):
    """Re-express a domain dataset's views in another (the federation's) normalisation.

    The domain normalises with ``src`` (for some domains the site's own statistics); this maps
    each view back to domain units and forward with ``dst`` (run_config ``input-mean`` /
    ``input-std``), so every site feeds the shared encoder the same units. Exact where the
    domain's last step is its ``Normalize`` (then a view no longer depends on ``src``). Items:
    (view_q, view_k), each float32 (C, H, W), or None; ``src``/``dst`` have C channels.
    """

    def __init__(self, dataset: Dataset, src: Normalization, dst: Normalization) -> None:
        self.dataset = dataset
        s_mean, s_std = torch.tensor(src.mean).view(-1, 1, 1), torch.tensor(src.std).view(-1, 1, 1)
        d_mean, d_std = torch.tensor(dst.mean).view(-1, 1, 1), torch.tensor(dst.std).view(-1, 1, 1)
        # x_dst = (x_src * s_std + s_mean - d_mean) / d_std = x_src * scale + shift
        self.scale = s_std / d_std
        self.shift = (s_mean - d_mean) / d_std

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if item is None:
            return None
        return tuple(v * self.scale + self.shift for v in item)


class OneItemPerRecord(Dataset):
    """A release view over a dataset whose records own several items (the frames of a
    multi-frame DICOM file): ``view[j]`` is one of record j's items, chosen by the item's own
    randomness (torch's generator, which the release seeds per item), so that adding or
    removing a record moves one released item, as for a record with one item.
    ``groups[j]``: the indices in ``dataset`` of record j's items (non-empty)."""

    def __init__(self, dataset: Dataset, groups: Sequence[Sequence[int]]) -> None:
        if any(len(g) == 0 for g in groups):
            raise ValueError("OneItemPerRecord: every record needs at least one item")
        self.dataset, self.groups = dataset, [list(g) for g in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, j: int):
        group = self.groups[j]
        return self.dataset[group[int(torch.randint(0, len(group), ())) if len(group) > 1 else 0]]


#: ``release_view(target)`` of a site's data: a Dataset whose item j is a function of ONE
#: record (an image file, a DICOM file, a raster) and its own randomness alone, its views
#: in the fixed normalisation ``target`` (None: the federation fixed none), for a DP release
#: of sensitivity one record (docs/privacy.md, "What one record is"); or a string saying why
#: this site's data has no such view (the site then refuses to share, dp-status 9).
ReleaseView = Callable[[Normalization | None], "Dataset | str"]


@dataclass
class PretrainData:
    dataset: Dataset
    in_channels: int
    normalization: Normalization
    # Files excluded while scanning, by reason ("not DICOM": 3, ...). Load-time failures are
    # counted by the training loop instead (see collate_views).
    skipped: Counter = field(default_factory=Counter)
    description: str = ""
    # What the domain's decoded-sample cache takes on disk for this folder and these options,
    # in bytes, whether or not this build used it (0: the domain has none), and how many of
    # its sources it leaves uncached (satellite rasters over cache_max_gb): check-site's
    # estimate for the site admin.
    cache_bytes: int = 0
    cache_skipped: int = 0
    # What a DP release may read (ReleaseView); None: the domain says nothing, and a site
    # refuses to share rather than guess what one record is.
    release_view: ReleaseView | None = None


@dataclass
class LabelledData:
    dataset: Dataset
    classes: list[str]
    in_channels: int
    normalization: Normalization
    skipped: Counter = field(default_factory=Counter)
    # Label index of every sample (-1: file not in the labels CSV), known without loading
    # images so evaluation can select labelled samples; None makes callers load each sample.
    sample_labels: Sequence[int] | None = None
    # Label index of every file that is part of a usable sample (-1 entries allowed), where a
    # sample reads several files and only one of them speaks for its label (a satellite
    # product's band files); None: the files behind the samples are those of sample_labels.
    covered_labels: Sequence[int] | None = None


def domain_module(name: str):
    """Import the module implementing domain ``name`` (``images``, ``medical``, ``satellite``)."""
    if name not in DOMAINS:
        raise DataError(f"--domain: unknown domain {name!r}; choose one of {sorted(DOMAINS)}")
    return importlib.import_module(DOMAINS[name])


def build_pretrain_data(domain: str, root: Path | str, cfg: DataConfig) -> PretrainData:
    """Check ``root`` and build the unlabelled two-view dataset of ``domain``."""
    root = check_data_dir(root)
    check_cache_outside(root, cfg)
    return domain_module(domain).build_pretrain_data(root, cfg)


def build_labelled_data(
    domain: str,
    root: Path | str,
    cfg: DataConfig,
    labels_csv: Path | str | None = None,
    normalization: Normalization | None = None,
    exclude: Sequence[Path] = (),
    own_csv: bool = False,
) -> LabelledData:
    """Check ``root`` and build the labelled single-view dataset of ``domain``. Files in
    ``exclude`` (and ``labels_csv``) are not samples: a labels CSV kept in the data folder is
    neither scanned nor counted as skipped. ``own_csv``: ``labels_csv`` is fedmoco's own
    (fedmoco.labels), whose paths keep a file name's bytes even where they are not UTF-8, so it
    skips the UTF-8 check a user's CSV gets."""
    root = check_data_dir(root)
    check_cache_outside(root, cfg)
    if labels_csv is not None:
        if not own_csv:
            check_text_file(labels_csv, "labels CSV")
        exclude = (*exclude, Path(labels_csv))
    return domain_module(domain).build_labelled_data(
        root, cfg, Path(labels_csv) if labels_csv else None, normalization, exclude=tuple(exclude)
    )


def cache_option_off(options: Mapping[str, Any]) -> bool:
    """Whether a domain's ``cache`` option turns its decoded-sample cache off. A malformed
    value reads as on: the domain's own options parser names it in its one-line error."""
    try:
        return not parse_bool(options.get("cache", True))
    except ValueError:
        return False


def check_cache_outside(root: Path, cfg: DataConfig) -> None:
    """DataError when the cache folder (``cfg.cache_dir``, else the ``cache_dir`` option, else
    the default) lies inside data folder ``root``: fedmoco never writes into a data folder, and
    its caches there would be scanned as data the next time."""
    from fedmoco.cache import default_cache_dir

    if not cfg.cache or cache_option_off(cfg.options):  # nothing is written there (a service account's home)
        return
    cache = Path(cfg.cache_dir or cfg.options.get("cache_dir") or default_cache_dir()).expanduser()
    if cache.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{cache}: the cache folder is inside the data folder {root}, which fedmoco never writes; "
                        "set FEDMOCO_CACHE_DIR (or the cache_dir option) to a folder outside it",
                        public="the cache folder is inside the data folder, which fedmoco never writes; "
                               "set FEDMOCO_CACHE_DIR (or the cache_dir option) to a folder outside it")


def check_text_file(path: Path | str, what: str) -> None:
    """DataError naming ``path`` unless it is an existing UTF-8 text file (a binary file
    handed to ``--labels`` must not end in a decoding traceback)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: {what} is a folder, not a file")
    if not path.is_file():
        raise DataError(f"{path}: {what} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    try:
        if b"\0" in head:
            raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "NUL byte")
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":  # a multi-byte character cut by the 64 KiB read
            if exc.reason == "NUL byte":
                raise DataError(f"{path}: {what} is not a text file (binary data at byte {exc.start})") from None
            # text in another encoding (Excel's "CSV" on Windows is cp1252): say how to save it
            raise DataError(f"{path}: {what} is not UTF-8 (byte {exc.start} is not UTF-8 text; another encoding, "
                            "such as Windows-1252? save it as \"CSV UTF-8\")") from None


def recorded_pipeline(meta: dict[str, Any], domain: str | None, options: dict[str, Any] | None = None,
                      in_channels: int | None = None,
                      source: Path | str = "checkpoint") -> tuple[str, dict[str, Any], Normalization | None]:
    """(domain, data options, normalisation) for reading data with the encoder of a checkpoint
    whose ``data`` record is ``meta``: ``domain`` (default the checkpoint's) and ``options`` on
    top of the recorded ones. The recorded options and normalisation describe the checkpoint's
    own domain's data only, so another domain gets neither. A federated encoder may carry no
    normalisation (each site normalised its own data): None, and the domain estimates one.
    ``in_channels`` (the encoder's): an image folder read with ``channels`` auto is converted to
    it, as a federated site's is (clients/app.py), instead of taking the count of its files.
    ``source`` (the checkpoint's path) names it in the error for a domain this fedmoco lacks."""
    if domain is None and meta["domain"] not in DOMAINS:  # was reported as a bad --domain the user never gave
        raise ConfigError(f"{source}: data domain {meta['domain']!r} is not one of this fedmoco's "
                          f"({', '.join(DOMAINS)}); give --domain to read the data as one of them")
    domain = domain or meta["domain"]
    same = domain == meta["domain"]
    recorded = (meta.get("options") or {}) if same else {}
    norm = Normalization.from_dict(meta["normalization"]) if meta.get("normalization") and same else None
    merged = {**recorded, **(options or {})}
    # Without a recorded normalisation the files' own channel count was used: a grayscale
    # federation's encoder refused the colour data its sites had trained on (found by an audit).
    if domain == "images" and norm is None and in_channels in (1, 3) and str(merged.get("channels", "auto")) == "auto":
        merged["channels"] = in_channels
    return domain, merged, norm


def check_data_dir(root: Path | str) -> Path:
    """Return ``root`` as a Path; raise DataError if it is missing or not a folder."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: is not a folder")
    return root


def list_files(root: Path, suffixes: Sequence[str] | None = None, exclude: Sequence[Path] = ()) -> list[Path]:
    """All regular files under ``root`` (recursively, sorted, hidden ones and the site's
    settings file ``root/fedmoco-site.toml`` skipped: not data, never read as an image).

    ``suffixes`` (lower-case, with dot) keeps only matching files. Raises DataError when
    nothing is left, naming the folder. ``exclude``: files that are not samples (a labels CSV
    kept in the folder), left out of the result, after that check.
    """
    files, unreadable, dangling, special = [], [], [], []
    # os.walk rather than rglob: rglob passes over a folder it cannot open without a word, and
    # "nothing is lost" means the site admin hears of it. Links to folders are not followed
    # (no loops), links to files are.
    for folder, subfolders, names in os.walk(root, onerror=unreadable.append):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:
            p = Path(folder) / name
            if name.startswith(".") or p == root / SITE_SETTINGS_FILE:
                continue
            if p.is_file():
                files.append(p)
            elif p.is_symlink() and not p.exists():
                dangling.append(p)
            elif p.exists() and not p.is_dir():  # a FIFO, socket or device: never read (a FIFO would block)
                special.append(p)
    files.sort()
    if unreadable or dangling or special:
        log.warning("%s: %s", root, "; ".join(
            ([f"{len(unreadable)} folder(s) could not be read and were left out (first: "
              f"{unreadable[0].filename}: {unreadable[0].strerror})"] if unreadable else [])
            + ([f"{len(dangling)} link(s) point to nothing (first: {dangling[0]})"] if dangling else [])
            + ([f"{len(special)} entr{'y is' if len(special) == 1 else 'ies are'} not a regular file (a FIFO, "
                f"socket or device) and left out (first: {sorted(special)[0]})"] if special else [])))
    others = files
    if suffixes is not None:
        files = [p for p in files if p.suffix.lower() in suffixes]
    if not files:
        kinds = f" with suffix {', '.join(suffixes)}" if suffixes else ""
        hint = ""
        if others:  # files of another kind: most likely another domain's folder
            found = sorted({p.suffix.lower() or "(no suffix)" for p in others})
            hint = (f"; it holds {len(others)} other file(s) ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''})"
                    ": is --domain right?")
        raise DataError(f"{root}: data folder is empty (no files{kinds}){hint}",
                        public=f"data folder is empty (no files{kinds})"
                               + (f"; it holds {len(others)} other file(s): is the domain right?" if others else ""))
    if exclude:
        excluded = {Path(p).resolve() for p in exclude}
        files = [p for p in files if p.resolve() not in excluded]
    return files


def read_labels(root: Path, files: Sequence[Path], labels_csv: Path | None) -> tuple[list[int], list[str]]:
    """Labels for ``files`` under ``root``: from ``labels_csv`` or from sub-folder names.

    The CSV has a header with columns ``path`` (relative to ``root`` or absolute) and
    ``label``. It may cover only part of the folder: a file without a row gets label -1
    (unlabelled; evaluation uses labelled samples only). A row naming a file that does not
    exist raises DataError. Without a CSV the label is the first path component below
    ``root`` (a DICOM class folder may hold patient/study/series folders).
    Returns (label index per file, or -1; sorted class names of the labelled files).
    """
    if labels_csv is not None:
        mapping = _csv_labels(root, labels_csv)
        names = [mapping.get(f.resolve()) for f in files]
    else:
        names = []
        for f in files:
            rel = f.relative_to(root)
            if len(rel.parts) < 2:
                raise DataError(
                    f"{f}: no label; put images in one sub-folder per class or pass --labels CSV"
                )
            names.append(rel.parts[0])
    classes = sorted({n for n in names if n is not None})
    index = {c: i for i, c in enumerate(classes)}
    return [-1 if n is None else index[n] for n in names], classes


def _csv_labels(root: Path, labels_csv: Path) -> dict[Path, str]:
    """``{resolved file path: label}`` of a ``path,label`` CSV; DataError for unknown paths."""
    mapping: dict[Path, str] = {}
    missing: list[str] = []
    # surrogateescape: a path in it need not be UTF-8 (file names are bytes on POSIX); a user's
    # CSV was checked to be UTF-8 text before (check_text_file)
    with open(labels_csv, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{labels_csv}: needs a header with columns 'path' and 'label'")
        for row in reader:
            p = Path(row["path"])
            full = (p if p.is_absolute() else root / p).resolve()
            if not full.is_file():
                missing.append(row["path"])
            mapping[full] = row["label"]
    if missing:
        raise DataError(f"{labels_csv}: {len(missing)} row(s) name files that do not exist under {root} "
                        f"(first: {missing[0]})")
    return mapping


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run per-sample tensor ops on one intra-op thread, then restore the setting.

    Domains wrap their per-sample transforms in it; it matters with ``--workers 0``.

    The ops are small; with 2 threads on a busy 2-core machine each one waits for a
    descheduled OpenMP thread: 190-270 ms per sample instead of 8-13 ms, measured in the main
    process (DataLoader workers already run on one thread). Switching costs under a microsecond.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TwoViews:
    """Apply one random transform twice, independently, giving a (query, key) view pair."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(x), self.transform(x)


def collate_views(batch: list[Any]) -> tuple[Any, int]:
    """Stack samples, dropping the ``None`` of unreadable ones.

    Returns ``(default_collate(kept), n_dropped)``; the first element is ``None`` when the
    whole batch was unreadable. Counting here, in the main process, is what makes the
    skipped-sample count right with several DataLoader workers.
    """
    kept = [b for b in batch if b is not None]
    dropped = len(batch) - len(kept)
    if not kept:
        return None, dropped
    return torch.utils.data.default_collate(kept), dropped


def parse_bool(value: Any) -> bool:
    """A bool, or ``1/0 true/false yes/no on/off`` in any case (domain options from a command
    line or node_config arrive as text); ValueError otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def format_skipped(skipped: Counter) -> str:
    """One summary line: ``skipped 4 files: 2 not DICOM, 1 no pixel data, 1 truncated``."""
    total = sum(skipped.values())
    if not total:
        return "skipped 0 files"
    parts = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    return f"skipped {total} files: {parts}"
