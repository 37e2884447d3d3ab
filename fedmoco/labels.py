"""Labelled evaluation data: a label table (CSV or class folders) joined to a domain's samples.

A labels CSV has a ``path`` column (relative to ``--data``, absolute, or a file's own id: its
name without extension; a folder, such as a study or a band product, labels every file under
it), an optional ``group`` column (patient, scene, ...) and one or more label columns. One
label column gives single-label classes; several (or ``--multi-label``) give multi-label
data with 0/1 values. Rows may cover only part of the folder: the other files
are left out. Without a CSV, the first sub-folder names the class.

Every sample gets a group key for grouped splits: the CSV ``group``, else the domain's own
(DICOM PatientID, falling back to StudyInstanceUID), else its file. Keys are hashed with a
salt drawn once per run the moment they are read, and only the hashes are kept: no raw key is
written, logged or plotted.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import secrets
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from fedmoco.data import DataConfig, Normalization, build_labelled_data, check_data_dir, domain_module, list_files
from fedmoco.data import check_text_file, format_skipped, parse_bool
from fedmoco.errors import DataError

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "id")
GROUP_COLUMN = "group"
# Drawn once per process: group hashes are comparable within a run and meaningless outside it.
RUN_SALT = secrets.token_bytes(16)


def hash_group(value: str, salt: bytes = RUN_SALT) -> str:
    """Salted BLAKE2b digest (hex) of a group key; the raw key is not kept anywhere."""
    # surrogateescape: a file name that is not UTF-8 (bytes on POSIX) is hashed as its bytes
    return hashlib.blake2b(value.encode("utf-8", "surrogateescape"), key=salt, digest_size=12).hexdigest()


@dataclass
class LabelTable:
    """One row per labelled file.

    ``targets`` is (R,) int class ids into ``names`` (single-label) or (R, L) float 0/1 with
    ``names`` the label columns (multi-label). ``groups`` holds salted hashes or None.
    """

    paths: list[Path]
    targets: np.ndarray
    names: list[str]
    multi_label: bool
    groups: list[str | None]
    source: str
    unlabelled_rows: int = 0
    csv_path: Path | None = None  # the labels CSV, None for class folders


@dataclass
class LabelledSet:
    """Labelled samples ready for splits: ``dataset[i]`` -> (image (C, H, W), table row), and
    per sample ``targets`` ((N,) or (N, L)), hashed ``groups`` (N,) and ``files`` (N,) row ids."""

    dataset: Dataset
    targets: np.ndarray
    groups: np.ndarray
    rows: np.ndarray
    names: list[str]
    multi_label: bool
    in_channels: int
    normalization: Normalization
    group_source: str
    unlabelled_files: int
    # every key behind the groups (CSV group, patient or scene, file): two sets that share any
    # of them share a patient, whichever kind of key each side's groups were named by
    group_keys: frozenset
    skipped_files: Counter = field(default_factory=Counter)  # files under root not read, by reason
    # domain keys (patient, scene) the CSV's groups split, which group nothing here (the CSV
    # decides), but a separate test set showing one of them as a patient shares that patient
    split_keys: frozenset = frozenset()


def read_label_table(root: Path, labels_csv: Path, *, multi_label: bool = False,
                     label_columns: Sequence[str] | None = None) -> LabelTable:
    """Parse a labels CSV (see module doc); DataError naming the file and row for bad input."""
    root = check_data_dir(root)
    check_text_file(labels_csv, "labels CSV")  # exists, and no binary file reaches the csv module
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would join the first header
    with open(labels_csv, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        # stripped, and 'Group' read as 'group': 'path, label, group' kept ' group' as a label
        # column, and the error's hint then named it (found by an audit)
        header = [h.strip() for h in next(reader, [])]
        header = [GROUP_COLUMN if h.lower() == GROUP_COLUMN else h for h in header]
        rows = []
        for line, cells in enumerate(reader, start=2):
            if not any(c.strip() for c in cells):  # a blank line, as csv.DictReader skips it
                continue
            if len(cells) > len(header):  # DictReader filed the rest under None: a label cut at a comma
                raise DataError(f"{labels_csv}: line {line} has {len(cells)} cells, the header {len(header)} "
                                "(an unquoted comma in a label or path? quote the cell)")
            rows.append({**dict.fromkeys(header, ""), **dict(zip(header, cells))})  # short rows: empty cells
    path_col = next((c for c in PATH_COLUMNS if c in header), None)
    if path_col is None:
        raise DataError(f"{labels_csv}: needs a header with a 'path' column and one or more label columns")
    cols = list(label_columns) if label_columns else [c for c in header if c not in (path_col, GROUP_COLUMN)]
    unknown = [c for c in cols if c not in header]
    if unknown or not cols:
        raise DataError(f"{labels_csv}: label column(s) {unknown or '(none)'} not in the header {header}")
    multi = multi_label or len(cols) > 1
    resolver = _PathResolver(root)
    paths, values, groups, missing, outside, blank = [], [], [], [], [], 0
    for line, row in enumerate(rows, start=2):
        found = resolver(row[path_col] or "")
        if found is None:
            missing.append(row[path_col])
            continue
        if resolver.outside(row[path_col]):  # only files under --data are samples
            outside.append(row[path_col])
            continue
        cells = [(row.get(c) or "").strip() for c in cols]
        if not multi:
            if not cells[0]:
                blank += 1
                continue
            value = cells[0]
        else:
            try:
                value = [float(parse_bool(v)) for v in cells]
            except ValueError:
                hint = ("" if multi_label or label_columns else
                        f"; with one label per file, name its column with --label-column (one of "
                        f"{', '.join(cols)}), and put patients or sites in a column named '{GROUP_COLUMN}'")
                raise DataError(f"{labels_csv}: line {line}: multi-label columns {cols} need 0/1 values, "
                                f"got {cells} (labels are per file: several label columns mean multi-label"
                                f"{hint})") from None
        g = (row.get(GROUP_COLUMN) or "").strip()
        for path in found:
            paths.append(path)
            values.append(value)
            groups.append(hash_group(g) if g else None)
    if missing:
        many = resolver.ambiguous(missing[0])
        why = (f"{missing[0]!r} is the name of {many} files; give its path relative to {root}" if many
               else f"first: {_shown(missing[0])}")
        if "\n" in (missing[0] or ""):  # the csv module reads on to the next quote
            why += ", which spans lines: an unclosed quote (\") in the CSV?"
        raise DataError(f"{labels_csv}: {len(missing)} row(s) name files that do not exist under {root} ({why})")
    if outside:
        raise DataError(f"{labels_csv}: {len(outside)} row(s) name files outside {root} (first: {_shown(outside[0])}); "
                        "the labelled files must be under --data")
    if not paths:
        raise DataError(f"{labels_csv}: no labelled rows")
    dupes = len(paths) - len(set(paths))
    if dupes:
        seen: set[Path] = set()
        first = next(p for p in paths if p in seen or seen.add(p))
        raise DataError(f"{labels_csv}: {dupes} file(s) are listed more than once (first: {first})")
    if multi:
        targets, names = np.asarray(values, dtype=np.float32), cols
    else:
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        targets = np.asarray([index[v] for v in values], dtype=np.int64)
    return LabelTable(paths, targets, names, multi, groups, f"{labels_csv}", unlabelled_rows=blank,
                      csv_path=Path(labels_csv))


def _shown(text: str | None, limit: int = 80) -> str:
    """A CSV cell as an error message shows it: quoted, and cut at ``limit`` characters."""
    text = text or ""
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


class _PathResolver:
    """CSV path -> existing file: relative to root, absolute, or a unique file-name stem."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._stems: dict[str, list[Path]] | None = None  # file-name stem -> the files with it

    def __call__(self, text: str) -> list[Path] | None:
        """The file(s) a CSV path names: a folder (a study, series or band product) names every
        file under it; None when nothing matches. A name matches in either Unicode form: a CSV
        written on one system says "café" as NFC, a folder copied from macOS may store it as NFD."""
        if not text:
            return None
        for form in (text, *{unicodedata.normalize(f, text) for f in ("NFC", "NFD")} - {text}):
            found = self._resolve(form)
            if found is not None:
                return found
        return None

    def _resolve(self, text: str) -> list[Path] | None:
        p = Path(text)
        full = p if p.is_absolute() else self.root / p
        if full.is_file():
            return [full.resolve()]
        if full.is_dir():
            return [f.resolve() for f in list_files(full)]
        if self._stems is None:
            self._stems = {}
            for f in list_files(self.root):
                self._stems.setdefault(f.stem, []).append(f)
        found = self._stems.get(text, [])
        return [found[0].resolve()] if len(found) == 1 else None

    def outside(self, text: str) -> bool:
        """Whether CSV path ``text`` names a place outside root, as written (``..`` resolved by
        name) and as resolved: a link under root to a file elsewhere (a folder of links into a
        PACS store) is under root."""
        p = Path(text)
        full = p if p.is_absolute() else self.root / p
        written = Path(os.path.normpath(os.path.abspath(full)))
        return not (written.is_relative_to(os.path.normpath(os.path.abspath(self.root)))
                    or full.resolve().is_relative_to(self.root.resolve()))

    def ambiguous(self, text: str) -> int:
        """How many files under root have ``text`` as their name without extension, when more
        than one does (a file id that names none of them); else 0."""
        count = len((self._stems or {}).get(text, []))
        return count if count > 1 else 0


def folder_label_table(root: Path, domain: str) -> LabelTable:
    """Class = first sub-folder below ``root``, for every file under it.

    DataError when no file sits in a sub-folder, or (images domain) when a class folder holds
    sub-folders: that layout means ``--data`` points at the wrong level. DICOM and raster
    classes legitimately hold patient/series or product folders; there a class made of one
    patient is caught later (see :func:`check_classes`).
    """
    root = check_data_dir(root)
    files = list_files(root)
    paths, values = [], []
    for f in files:
        rel = f.relative_to(root)
        if len(rel.parts) < 2:
            continue
        if domain == "images" and len(rel.parts) > 2:
            raise DataError(f"{root / rel.parts[0]}: class folder holds sub-folders ({rel.parts[1]}/); point "
                            "--data at the folder whose sub-folders are the classes, or pass --labels CSV")
        paths.append(f.resolve())
        values.append(rel.parts[0])
    if not paths:
        raise DataError(f"{root}: no class sub-folders; put images in one sub-folder per class or pass --labels CSV")
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    targets = np.asarray([index[v] for v in values], dtype=np.int64)
    return LabelTable(paths, targets, names, False, [None] * len(paths), f"{root} (class folders)")


def load_label_table(root: Path, labels_csv: Path | None, domain: str, *, multi_label: bool = False,
                     label_columns: Sequence[str] | None = None) -> LabelTable:
    """The table of ``labels_csv`` when given, else of the class folders under ``root``."""
    if labels_csv is not None:
        return read_label_table(root, labels_csv, multi_label=multi_label, label_columns=label_columns)
    if multi_label:
        raise DataError("--multi-label needs --labels CSV with one 0/1 column per label")
    return folder_label_table(root, domain)


def build_labelled_set(domain: str, root: Path, table: LabelTable, cfg: DataConfig,
                       normalization: Normalization | None) -> LabelledSet:
    """Join ``table`` to the domain's samples of ``root`` (files not in it are left out).

    The domain reads a temporary ``path,label`` CSV whose label is the table row, so every
    sample (a frame, slice or tile) carries the row of its file; targets and groups follow.
    """
    root = check_data_dir(root)
    with tempfile.TemporaryDirectory(prefix="fedmoco-labels-") as tmp:
        csv_path = Path(tmp) / "rows.csv"
        # surrogateescape: file names need not be UTF-8 (read back by fedmoco.data._csv_labels)
        with open(csv_path, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label"])
            w.writerows([str(p), f"{i:09d}"] for i, p in enumerate(table.paths))
        data = build_labelled_data(domain, root, cfg, csv_path, normalization,
                                   exclude=[table.csv_path] if table.csv_path else [], own_csv=True)
    row_of_class = np.asarray([int(c) for c in data.classes], dtype=np.int64)
    sample_labels = data.sample_labels
    if sample_labels is None:  # a domain that does not expose them: read every sample once
        sample_labels = [-1 if s is None else s[1] for s in (data.dataset[i] for i in range(len(data.dataset)))]
    sample_labels = np.asarray(sample_labels, dtype=np.int64)
    keep = np.flatnonzero(sample_labels >= 0)
    if not len(keep):
        raise DataError(f"{table.source}: none of its files is a usable {domain} sample under {root}")
    rows = row_of_class[sample_labels[keep]]
    used = set(rows.tolist())
    if data.covered_labels is not None:  # a product's other band files are used, not unusable
        used |= {int(row_of_class[c]) for c in data.covered_labels if c >= 0}
    unusable = len(table.paths) - len(used)
    if unusable:
        why = f" ({format_skipped(data.skipped)} under {root})" if data.skipped else ""
        log.warning("%s: %d labelled file(s) are not usable %s samples and are left out%s",
                    table.source, unusable, domain, why)
    targets, names = table.targets[rows], table.names
    if not table.multi_label:
        targets, names = _drop_empty_classes(targets, names, table.source)
    groups, source, group_keys, split_keys = _groups(domain, table, rows)
    dataset = _RowDataset(data.dataset, keep, row_of_class)
    n_files = len({int(r) for r in rows})
    log.info("labelled: %d samples from %d files, %d groups (%s)", len(keep), n_files, len(set(groups)), source)
    return LabelledSet(dataset=dataset, targets=targets, groups=np.asarray(groups), rows=rows,
                       names=names, multi_label=table.multi_label, in_channels=data.in_channels,
                       normalization=data.normalization, group_source=source,
                       unlabelled_files=int((sample_labels < 0).sum()), skipped_files=Counter(data.skipped),
                       group_keys=group_keys, split_keys=split_keys)


def skipped_note(data: LabelledSet, root: Path) -> str | None:
    """One line for a report's warnings when files under ``root`` could not be read: how many,
    by reason (their names are in the log). None when every file was read."""
    if not data.skipped_files:
        return None
    return f"{root}: {format_skipped(data.skipped_files)}; they are in no split (the log names them)"


def _drop_empty_classes(targets: np.ndarray, names: list[str], source: str) -> tuple[np.ndarray, list[str]]:
    """Leave out classes none of whose files gave a usable sample (a folder of reports, say),
    renumbering the rest; a model cannot learn, nor a test measure, a class with no image."""
    present = np.unique(targets)
    if len(present) == len(names):
        return targets, names
    log.warning("%s: class(es) %s have no usable sample and are left out", source,
                [n for i, n in enumerate(names) if i not in set(present.tolist())])
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    return remap[targets], [names[i] for i in present]


def _groups(domain: str, table: LabelTable, rows: np.ndarray) -> tuple[list[str], str, frozenset[str]]:
    """(hashed group per sample, the kinds of key used, every key that groups).

    Each file has up to two keys: its CSV ``group`` and the domain's (patient, scene); a file
    with neither is its own group. Files sharing a key are one group (connected components),
    so a patient whose CSV group is filled for some slices only stays whole, and a test set
    holding the same patients is caught whatever its groups are called. The CSV still decides
    where it contradicts the domain: a domain key found under two or more CSV groups (a PatientID
    that de-identification made constant, a geotransform copied into every chip) links nothing,
    since the user has said those files are apart. The kinds are named, the file only when alone."""
    distinct = sorted({int(r) for r in rows})
    csv_keys = {r: table.groups[r] for r in distinct}
    used = ["csv group column"] if any(csv_keys.values()) else []
    hook = getattr(domain_module(domain), "group_keys", None)
    own: dict[int, str | None] = dict.fromkeys(distinct)
    if hook is not None:
        own.update(zip(distinct, hook([table.paths[r] for r in distinct], RUN_SALT)))
    csv_groups_of: dict[str, set[str]] = {}
    for r in distinct:
        if own[r] is not None and csv_keys[r] is not None:
            csv_groups_of.setdefault(own[r], set()).add(csv_keys[r])
    overruled = {k for k, g in csv_groups_of.items() if len(g) > 1}
    if overruled:
        log.info("%d %s key(s) span several CSV groups: the CSV group decides for those files",
                 len(overruled), getattr(hook, "source", domain))
    # a file's own key links unless overruled; where it is the file's only key it always counts
    links = {r: own[r] is not None and (csv_keys[r] is None or own[r] not in overruled) for r in distinct}
    file_key = {r: hash_group(f"file:{table.paths[r]}") for r in distinct}
    keys = {r: [k for k in (csv_keys[r], own[r] if links[r] else None) if k] or [file_key[r]] for r in distinct}
    if any(links.values()):
        used.append(getattr(hook, "source", domain))
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]  # path halving
            k = parent[k]
        return k

    for ks in keys.values():
        for k in ks[1:]:
            a, b = find(ks[0]), find(k)
            if a != b:
                parent[max(a, b)] = min(a, b)
    group = {r: find(keys[r][0]) for r in distinct}
    # The file itself is a key of every sample for a separate test set, even where a CSV group
    # or a domain key groups it: a test CSV naming the training files under other (or no)
    # groups compared nothing with a training CSV whose groups were its only keys.
    every_key = frozenset(k for ks in keys.values() for k in ks) | set(file_key.values())
    return [group[int(r)] for r in rows], " + ".join(used) or "file", every_key, frozenset(overruled)


class _RowDataset(Dataset):
    """The labelled samples of a domain dataset: ``[i]`` -> (image, table row) or None."""

    def __init__(self, base: Dataset, keep: np.ndarray, row_of_class: np.ndarray) -> None:
        self.base, self.keep, self.row_of_class = base, keep, row_of_class

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int):
        item = self.base[int(self.keep[i])]
        return None if item is None else (item[0], int(self.row_of_class[item[1]]))


def check_classes(data: LabelledSet, root: Path) -> None:
    """Refuse data nothing can be learnt or tested on: one class, or classes that each hold a
    single group (a grouped split can then test no class; with DICOM this is ``--data``
    pointing inside one class folder, whose patient folders became classes)."""
    n_groups = len(np.unique(data.groups))
    if n_groups < 2:
        raise DataError(f"{root}: all {len(data.targets)} labelled samples belong to one group "
                        f"({data.group_source}); a held-out test set needs at least 2")
    if data.multi_label:
        present = data.targets.sum(0)
        if not ((present > 0) & (present < len(data.targets))).any():
            raise DataError(f"{root}: every label is all 0 or all 1; nothing to learn")
        return
    classes = np.unique(data.targets)
    if len(classes) < 2:
        name = data.names[int(classes[0])]
        raise DataError(f"{root}: only one class ({name!r}) among the labelled samples; need at least 2")
    per_class = [len(np.unique(data.groups[data.targets == c])) for c in classes]
    if all(n == 1 for n in per_class):
        what = "file" if data.group_source == "file" else f"group ({data.group_source})"
        hint = {"patient": "--data probably points inside one class folder (its patient folders became classes)",
                "file": "label more files, or give a CSV 'group' column"}.get(
                    data.group_source, "each class needs samples of at least 2 groups")
        raise DataError(f"{root}: each class ({', '.join(data.names[int(c)] for c in classes[:3])}"
                        f"{', ...' if len(classes) > 3 else ''}) holds exactly one {what}, so no class can be in "
                        f"both train and test; {hint}")


def check_disjoint(train: LabelledSet, test: LabelledSet, train_root: Path, test_root: Path) -> None:
    """Refuse a separate test set that shares a group (patient, scene, file) with the training
    data: it would be a leak the grouped split exists to prevent. Hashes share the run's salt,
    so they compare; the message gives counts only."""
    shared = train.group_keys & test.group_keys
    if shared:
        # keys, not groups: a CSV group, a patient and a file each count (128 'groups' were
        # reported for 96 files in 32 groups; found by an audit)
        raise DataError(f"{test_root}: {len(shared)} key(s) of the test set's groups ({test.group_source}; "
                        f"each CSV group, patient/scene and file counts) also occur in {train_root}; a test set "
                        "must hold other patients/scenes/files")
    # A patient the training CSV split into several groups (one per series) groups nothing there,
    # and was compared with nothing: the same patients copied into --test passed (found by an
    # audit). One side showing it as a patient is enough; where both sides' CSVs split it (a
    # de-identified PatientID made constant) it says nothing, and is only logged.
    crossed = (train.split_keys & test.group_keys) | (test.split_keys & train.group_keys)
    if crossed:
        raise DataError(f"{test_root}: {len(crossed)} patient/scene key(s) of the test set also occur in "
                        f"{train_root}, where the CSV's groups split them; a test set must hold other patients/"
                        "scenes (if those keys are no real patient, e.g. a de-identified constant PatientID, "
                        "give the test CSV a group column too)")
    both_split = train.split_keys & test.split_keys
    if both_split:
        log.warning("%s: %d patient/scene key(s) occur in both sets, split by both CSVs' groups: the CSV groups "
                    "decide, so they are not taken as shared patients", test_root, len(both_split))

