"""The folder index: which files are usable DICOM images, and the samples they give.

Scanning reads headers only (the 132-byte magic check first, then technical tags with pixel
data left on disk), so no file is decoded at scan time and none is decoded twice. The result
is cached in a JSON file per data folder, keyed per file by relative path, size, mtime and ctime,
under the user cache directory rather than the data folder (PACS exports are often
read-only or shared). A rerun stats every file but re-reads only new or changed ones.

The cache holds paths, modality, frame counts, shapes, slice positions and a one-way series
key: no patient field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fedmoco.cache import default_cache_dir, stat_stamp

from .dicom_types import DEFAULT_LIMITS, NO_DECODER, UNREADABLE, DicomHeader, DicomLimits, DicomReadError


def read_header(path: Path, limits: DicomLimits = DEFAULT_LIMITS) -> DicomHeader:
    """:func:`.reader.read_header`, importing pydicom only when a file is not in the index cache."""
    from .reader import read_header as read

    return read(path, limits)

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: series keys include the image plane's orientation (reader._series_key)
# Reasons that can change without the file changing (a plugin gets installed, a share
# comes back): such files are re-read on every scan instead of being cached as skipped.
_TRANSIENT = {NO_DECODER, UNREADABLE}
_SAVE_EVERY = 2000  # files read between cache saves, so an interrupted scan resumes


@dataclass(frozen=True)
class FileRecord:
    """One usable DICOM file. ``path`` is relative to the data root (POSIX separators)."""

    path: str
    modality: str
    frames: int
    rows: int
    columns: int
    channels: int
    series: str | None
    positions: tuple[float | None, ...]
    instance: int | None

    @classmethod
    def from_header(cls, rel: str, header: DicomHeader) -> "FileRecord":
        """The index fields of ``header``, for the file at ``rel`` below the data root."""
        return cls(
            path=rel,
            modality=header.modality,
            frames=header.number_of_frames,
            rows=header.rows,
            columns=header.columns,
            channels=header.channels,
            series=header.series_key,
            positions=header.slice_positions,
            instance=header.instance_number,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "FileRecord":
        """Inverse of ``dataclasses.asdict`` (JSON turns the positions tuple into a list)."""
        return cls(**{**d, "positions": tuple(d["positions"])})


def cache_file(root: Path, cache_dir: Path | str | None) -> Path:
    """The index cache of data folder ``root``: one JSON file per resolved folder path."""
    key = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:16]  # the name need not be UTF-8
    return Path(cache_dir or default_cache_dir()) / "medical-index" / f"{key}.json"


def scan(root: Path, files: Iterable[Path], cache_path: Path | None,
         limits: DicomLimits = DEFAULT_LIMITS) -> tuple[list[FileRecord], Counter]:
    """Index ``files`` (under ``root``): usable records in file order, and skips by reason.

    ``cache_path`` None disables the cache. ``limits``: files whose header asks for more are
    skipped as ``too large`` before any per-frame work; a cache written under other limits
    is not used. Never raises for a bad file; an unwritable cache is logged once and ignored.
    """
    cached = _load(cache_path, limits) if cache_path else {}
    entries: dict[str, dict] = {}
    records: list[FileRecord] = []
    skipped: Counter = Counter()
    fresh = damaged = 0
    started = time.monotonic()
    for n, path in enumerate(files, 1):
        rel = path.relative_to(root).as_posix()
        try:
            st = path.stat()
            stamp = dict(zip(("size", "mtime_ns", "ctime_ns"), stat_stamp(st)))
        except OSError as exc:
            skipped[UNREADABLE] += 1
            log.debug("%s: %s: %s", path, UNREADABLE, exc.strerror)
            continue
        entry = cached.get(rel)
        if entry is not None and not _well_formed(entry):
            damaged += 1  # an edited or damaged cache file: read the header again
            entry = None
        if entry is None or {k: entry.get(k) for k in stamp} != stamp:
            entry = dict(stamp)
            try:
                entry["record"] = asdict(FileRecord.from_header(rel, read_header(path, limits)))
            except DicomReadError as exc:
                entry["skip"], entry["detail"] = exc.reason, exc.detail
            fresh += 1
            if cache_path and fresh % _SAVE_EVERY == 0:
                _save(cache_path, root, {**cached, **entries, rel: entry}, limits)
        if "record" in entry:
            records.append(FileRecord.from_dict(entry["record"]))
        else:
            skipped[entry["skip"]] += 1
            log.debug("%s: %s: %s", path, entry["skip"], entry.get("detail", ""))
        if entry.get("skip") not in _TRANSIENT:
            entries[rel] = entry
        if n % 5000 == 0:
            log.info("indexed %d files (%d read, %.0f s)", n, fresh, time.monotonic() - started)
    if damaged:
        log.warning("%s: %d damaged entr%s of the index cache ignored; those files were read again", cache_path,
                    damaged, "y" if damaged == 1 else "ies")
    if cache_path and (fresh or set(entries) != set(cached)):
        _save(cache_path, root, entries, limits)
    return records, skipped


def _count(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _well_formed(entry: Any) -> bool:
    """Whether a cached entry is one :func:`scan` wrote: a damaged or edited index cache gave
    AttributeError or TypeError tracebacks mid-scan, and kept giving them until the cache was
    cleared (found by an audit)."""
    if not isinstance(entry, dict):
        return False
    if "record" not in entry:
        return isinstance(entry.get("skip"), str)
    rec = entry["record"]
    try:
        r = FileRecord.from_dict(rec)
    except (TypeError, KeyError, ValueError):
        return False
    return (isinstance(r.path, str) and isinstance(r.modality, str) and isinstance(r.series, (str, type(None)))
            and all(_count(v, 1) for v in (r.frames, r.rows, r.columns, r.channels))
            and (r.instance is None or _count(r.instance, -2**31))
            and len(r.positions) in (0, r.frames)
            and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in r.positions))


def _load(path: Path, limits: DicomLimits) -> dict[str, dict]:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s: ignoring unreadable index cache (%s)", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    if data.get("limits") != asdict(limits):
        # Which files are too large depends on the limits: changed limits, fresh headers.
        return {}
    files = data.get("files", {})
    return files if isinstance(files, dict) else {}


def _save(path: Path, root: Path, entries: dict[str, dict], limits: DicomLimits) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            # no "root": the file is named by a hash of the folder, and nothing needs its path in clear
            json.dump({"version": CACHE_VERSION, "limits": asdict(limits), "files": entries}, fh)
        os.replace(tmp, path)  # atomic: a crash never leaves half a cache
    except OSError as exc:
        log.warning("%s: cannot write the index cache (%s); the next run rescans", path, exc)


def build_samples(records: list[FileRecord], slices: int) -> np.ndarray:
    """Samples as an int32 array (N, slices, 2) of (record index, frame) per channel.

    Every frame of every file is one sample (its centre channel). With ``slices`` > 1 the
    other channels are the neighbouring slices of the same stack, ordered by slice position:
    the frames of a multi-frame file, or the single-frame files of one series with the same
    size. At the ends of a stack the edge slice is repeated; a lone image repeats itself.
    """
    half = slices // 2
    stacks: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for i, rec in enumerate(records):
        if rec.frames > 1 or rec.series is None:
            stacks[("file", i)].extend((i, f) for f in range(rec.frames))
        else:
            stacks[("series", rec.series, rec.rows, rec.columns, rec.channels)].append((i, 0))

    def order(ref: tuple[int, int]) -> tuple:
        rec = records[ref[0]]
        pos = rec.positions[ref[1]] if ref[1] < len(rec.positions) else None
        return (pos is None, pos or 0.0, rec.instance or 0, rec.path, ref[1])

    rows = []
    for stack in stacks.values():
        stack.sort(key=order)
        last = len(stack) - 1
        for c in range(len(stack)):
            rows.append([stack[min(max(c + o, 0), last)] for o in range(-half, half + 1)])
    samples = np.asarray(rows, dtype=np.int32).reshape(-1, slices, 2)
    centre = samples[:, half]
    return samples[np.lexsort((centre[:, 1], centre[:, 0]))]  # file order, then frame order


def modality_counts(records: list[FileRecord]) -> Counter:
    """Frames per modality."""
    counts: Counter = Counter()
    for rec in records:
        counts[rec.modality] += rec.frames
    return counts
