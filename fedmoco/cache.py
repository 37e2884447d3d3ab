"""The decoded-sample cache: each sample decoded, scaled and resized once, then memory-mapped.

Decoding dominates a site's data feed (a JPEG 2000 CT slice takes 70 ms, a 13-band GeoTIFF
window ~1 ms, against a few ms for the augmentations). The first pass over a data folder
stores each sample's *base* (domain scaling applied, at a working resolution, before any
random augmentation) in one file; later epochs and later federated rounds read it back at
memory speed.

File layout (one file per data folder and base options)::

    <cache dir>/samples/<sha256(folder)[:16]>-<fingerprint[:16]>.cache
    [N flag bytes, padded to 4096][N samples of `shape` and `dtype`, C order]

A flag byte of 0 means "not filled yet"; anything else is the domain's per-sample tag, written
after the sample's bytes so a crash mid-write leaves the sample unfilled. Several DataLoader
workers fill disjoint samples of one file (written with pwrite, read through a shared mapping).
The *fingerprint* hashes the cache version, the sample shape and dtype, the options that shape
a base, and (path, size, mtime, ctime) of every source file (:func:`stat_stamp`): any change
gives a new file and the old one is deleted, as the medical index cache does per file. The
file holds pixels and flags only: no path, no DICOM attribute.
"""

from __future__ import annotations

import math

import hashlib
import json
import logging
import mmap
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# 2: DICOM bases follow per-frame windows and one MONOCHROME1 reflection (reader fixes)
# 3: stamps carry the inode change time (see stat_stamp)
CACHE_VERSION = 3
_HEADER_ALIGN = 4096
# Free disk space the cache leaves on its volume by default; a cache that would eat into it is
# not built. ``$FEDMOCO_CACHE_MIN_FREE_GB`` sets another (see min_free_bytes).
MIN_FREE_BYTES = 2 * 2**30
MIN_FREE_ENV = "FEDMOCO_CACHE_MIN_FREE_GB"


def default_cache_dir() -> Path:
    """``$FEDMOCO_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedmoco``, else ``~/.cache/fedmoco``."""
    if os.environ.get("FEDMOCO_CACHE_DIR"):
        return Path(os.environ["FEDMOCO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedmoco"


def min_free_bytes() -> int:
    """Bytes of free disk a sample cache leaves on its volume: ``$FEDMOCO_CACHE_MIN_FREE_GB``
    (GB of 10^9 bytes, >= 0), else 2 GiB. A value that is not a number >= 0 is logged and the
    default kept: the cache is an optimisation and a typo must not stop a site's training."""
    text = os.environ.get(MIN_FREE_ENV, "").strip()
    if not text:
        return MIN_FREE_BYTES
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb >= 0):
        log.warning("%s=%r is not a number of GB >= 0; keeping %.1f GB free", MIN_FREE_ENV, text,
                    MIN_FREE_BYTES / 1e9)
        return MIN_FREE_BYTES
    return int(min(gb * 1e9, 2.0**62))  # 2^62 bytes: more than any volume, and still an int64


def cache_fits(folder: Path | str, nbytes: int) -> tuple[bool, int]:
    """(whether ``nbytes`` more on ``folder``'s volume leave :func:`min_free_bytes` free, the free
    bytes there now). ``folder`` need not exist yet: its nearest existing parent is asked.
    Raises OSError when the volume cannot be asked (a folder this user cannot enter)."""
    free = _free_bytes(_nearest_existing(folder))
    return free - nbytes >= min_free_bytes(), free


def cache_folder_problem(folder: Path | str) -> str | None:
    """Why a cache could not be written under ``folder`` (which need not exist yet: its nearest
    existing parent must be a folder this user can write), or None. Checks only what is on
    disk now; a round still logs any failure it meets."""
    folder = _nearest_existing(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):  # also false on a read-only volume (EROFS)
        return f"{folder} cannot be written by this user" + (" (read-only volume)" if _read_only(folder) else "")
    return None


def _nearest_existing(folder: Path | str) -> Path:
    """``folder`` (absolute), or its nearest parent that exists (a link, even dangling, counts)."""
    folder = Path(folder).absolute()
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    return folder


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _folder_digest(root: Path | str) -> str:
    # fsencode: a folder name need not be UTF-8 (it is bytes on POSIX), and str.encode would raise
    return hashlib.sha256(os.fsencode(Path(root).resolve())).hexdigest()[:16]


def folder_cache_prefix(root: Path | str, kind: str) -> str:
    """The name prefix of data folder ``root``'s sample caches of ``kind`` (``<kind>-<sha>``)."""
    return f"{kind}-{_folder_digest(root)}"


def folder_cache_allocated(root: Path | str, cache_dir: Path | str | None = None) -> int:
    """Bytes the existing sample caches of data folder ``root`` (any kind) hold on disk: what a
    round frees by replacing them, or needs no more when it reuses them."""
    total = 0
    for path in (Path(cache_dir or default_cache_dir()) / "samples").glob(f"*-{_folder_digest(root)}-*.cache"):
        try:
            total += path.stat().st_blocks * 512
        except OSError:
            pass
    return total


Stamp = tuple[int, int, int]


def stat_stamp(st: os.stat_result) -> Stamp:
    """(size, mtime_ns, ctime_ns) of a file: what says its content may have changed.

    Size and mtime alone miss a same-size file whose mtime was put back (``cp -p``, ``rsync -t``,
    ``touch -r``, a restore from backup): the change time cannot be set by a user and moves on
    every write, replace, ``utime`` or ``chmod``, so such a file no longer matches. A ``chmod``
    or a copy of the folder thus re-decodes it: a cost, never stale pixels.
    """
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_stamps(root: Path, paths: Iterable[Path | str]) -> list[tuple[str, int, int, int]]:
    """(path relative to ``root``, size, mtime_ns, ctime_ns) per file: what invalidates a cache."""
    out = []
    for p in paths:
        p = Path(p)
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.as_posix()
        out.append((rel, *stat_stamp(p.stat())))
    return out


def fingerprint(kind: str, shape: Sequence[int], dtype: str, options: dict[str, Any],
                stamps: Sequence[tuple[str, int, int, int]]) -> str:
    """sha256 hex of everything a cached base depends on."""
    blob = json.dumps({"version": CACHE_VERSION, "kind": kind, "shape": list(shape), "dtype": dtype,
                       "options": options, "stamps": [list(s) for s in stamps]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_nbytes(n: int, shape: Sequence[int], dtype: str) -> int:
    """Size in bytes of the file of a cache of ``n`` samples of ``shape`` and ``dtype``: the flag
    bytes, padded, then the samples."""
    # math.prod on Python ints: np.prod wraps around at 2^63 for the shapes a header may claim
    return _header_bytes(n) + n * math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize


def _header_bytes(n: int) -> int:
    return -(-n // _HEADER_ALIGN) * _HEADER_ALIGN


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``1.2 GB`` from 1 GB on, else ``3.4 MB``."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@dataclass
class SampleCache:
    """N samples of one shape and dtype in one memory-mapped file, filled lazily.

    Picklable: a DataLoader worker reopens the mapping on first use.
    """

    path: Path
    n: int
    shape: tuple[int, ...]
    dtype: str
    #: "random" for samples read in small parts at random places (a raster's tiles): the
    #: mapping is advised MADV_RANDOM, so a page fault reads those pages, not the kernel's
    #: readahead around them. Measured with the page cache cold, a 64 px tile of a 13-band
    #: blocked raster cache read 0.30 MB from disk so, against 8.4 MB with the default readahead
    #: (read_ahead_kb 8192 on the test machine). "normal" for samples read whole.
    access: str = "normal"

    def __post_init__(self) -> None:
        # ndarrays over one mmap of the file (flags, then samples). Not np.memmap: its indexing
        # wraps every result in a new memmap object (microseconds on each read of a sample),
        # and it offers no madvise.
        self._flags: np.ndarray | None = None
        self._data: np.ndarray | None = None
        self._lost = False  # the file went before this process mapped it: reads miss from then on
        # Writes go only to the file that was mapped: a file replaced between a sample's pixels
        # and its flag (pruned, then created again by another run) got the flag without the
        # pixels, an all-zero sample served as filled to every later run (found by an audit). Each
        # write opens the path and checks it is still that file (device, inode) rather than keep a
        # descriptor: mmap already holds one per cache, and a second per raster exhausted a 1024
        # descriptor limit at about 500 rasters (found by a review).
        self._identity: tuple[int, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "n": self.n, "shape": self.shape, "dtype": self.dtype, "access": self.access}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    @property
    def offset(self) -> int:
        return _header_bytes(self.n)

    @property
    def nbytes(self) -> int:
        return cache_nbytes(self.n, self.shape, self.dtype)

    def _open(self) -> None:
        if self._data is None:
            with open(self.path, "r+b") as fh:  # the mapping outlives the descriptor
                mapped = mmap.mmap(fh.fileno(), self.nbytes)
                st = os.fstat(fh.fileno())
                self._identity = (st.st_dev, st.st_ino)
            if self.access == "random" and hasattr(mmap, "MADV_RANDOM"):  # no madvise on Windows
                mapped.madvise(mmap.MADV_RANDOM)
            self._flags = np.frombuffer(mapped, np.uint8, self.n)
            self._data = np.frombuffer(mapped, self.dtype, self.n * int(np.prod(self.shape)),
                                       self.offset).reshape(self.n, *self.shape)

    def _mapped(self) -> bool:
        """Map the file on first use; False (once logged) when it is gone or unreadable by then.
        A mapping outlives the file's removal, but a process (a DataLoader worker) that maps
        lazily can find it removed: by ``fedmoco cache --clear``, or by a run with other
        options on the same folder, which replaces the folder's caches. Such a process then
        decodes, as without a cache, instead of stopping with FileNotFoundError."""
        if self._data is not None:
            return True
        if self._lost:
            return False
        try:
            self._open()
        except OSError as exc:
            self._lost = True
            log.warning("%s: sample cache gone or unreadable (%s); decoding instead", self.path, exc.strerror or exc)
            return False
        return True

    def get(self, i: int) -> tuple[np.ndarray, int] | None:
        """(sample i as an array view, its tag) when filled, else None (also when the file is
        gone: see :meth:`_mapped`)."""
        if not self._mapped():
            return None
        tag = int(self._flags[i])
        return None if tag == 0 else (self._data[i], tag)

    def put(self, i: int, sample: np.ndarray, tag: int = 1) -> None:
        """Store sample i (cast to the cache dtype) and mark it filled with ``tag`` (1-255).

        Through the file (:meth:`write`), never the mapping: a store through the mapping into a
        page the full disk cannot back kills the process with SIGBUS, where ``pwrite`` raises
        OSError (ENOSPC) for the caller to handle. Raises OSError then, the sample unfilled."""
        if tuple(np.shape(sample)) != self.shape:
            raise ValueError(f"sample of shape {tuple(np.shape(sample))}, the cache holds {self.shape}")
        self.write(i, 0, np.asarray(sample).reshape(-1))
        self.mark(i, tag)

    def write(self, i: int, start: int, values: np.ndarray) -> None:
        """Write ``values`` (cast to the cache dtype, C order) into sample i from its flat element
        ``start`` on: a large sample, e.g. a raster, filled in parts without holding it in memory.
        The sample reads as unfilled until :meth:`mark`.

        Through the file, not the mapping: a fill through the mapping left every written page in
        the filling process's resident set (a 10000^2 x 13-band raster: +2.5 GB of RSS per
        process), where ``pwrite`` leaves them in the page cache, shared with the readers'
        mappings and reclaimable."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        size = int(np.prod(self.shape))
        if not (0 <= i < self.n and 0 <= start and start + values.size <= size):
            raise IndexError(f"{values.size} values at {start} of sample {i}: outside {self.n} x {size}")
        item = np.dtype(self.dtype).itemsize
        self._pwrite(memoryview(values).cast("B"), self.offset + (i * size + start) * item)

    def mark(self, i: int, tag: int = 1) -> None:
        """Mark sample i filled with ``tag`` (1-255), once its slot holds the whole sample.
        Through the file, as :meth:`put`; the mappings of every process see it at once (one
        page cache)."""
        if not 1 <= tag <= 255:
            raise ValueError(f"tag must be in 1..255, got {tag}")
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} of {self.n}")
        self._pwrite(memoryview(bytes([tag])), i)

    def _pwrite(self, data: memoryview, at: int) -> None:
        """All of ``data`` into the mapped file from byte ``at`` on (pwrite may write less than
        asked). FileNotFoundError when the file was gone before this process mapped it."""
        if not self._mapped():
            raise FileNotFoundError(2, "sample cache gone", str(self.path))
        fd = os.open(self.path, os.O_WRONLY)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._identity:
                raise FileNotFoundError(2, "sample cache replaced since this process mapped it", str(self.path))
            while data:
                done = os.pwrite(fd, data, at)
                data, at = data[done:], at + done
        finally:
            os.close(fd)

    def filled(self) -> int:
        """How many samples are stored (0 when the file is gone)."""
        if not self._mapped():
            return 0
        return int(np.count_nonzero(self._flags))


def open_cache(root: Path, kind: str, n: int, shape: Sequence[int], dtype: str, options: dict[str, Any],
               stamps: Sequence[tuple[str, int, int, int]], cache_dir: Path | str | None = None,
               access: str = "normal", pending: int = 0) -> SampleCache | None:
    """The cache of data folder ``root`` for these base options, created empty when missing or stale.

    Returns None (and logs why, once) when it cannot be created: an unwritable cache folder,
    or too little free disk for it and ``pending`` bytes of caches opened before it and not
    filled yet (a file is sparse until filled, so those are not counted as used). Training then
    decodes every epoch, as without a cache.
    """
    folder = Path(cache_dir or default_cache_dir()) / "samples"
    prefix = folder_cache_prefix(root, kind)
    name = f"{prefix}-{fingerprint(kind, shape, dtype, options, stamps)[:16]}.cache"
    cache = SampleCache(folder / name, n, tuple(int(s) for s in shape), np.dtype(dtype).name, access)
    if cache.path.exists() and cache.path.stat().st_size == cache.nbytes:
        try:  # a cache is read and filled in place: one on a volume now read-only, or another
            os.close(os.open(cache.path, os.O_RDWR))  # user's, would stop the first read
        except OSError as exc:
            log.warning("%s: cannot open the sample cache for writing (%s); decoding every epoch instead",
                        cache.path, exc.strerror or exc)
            return None
        return cache
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{prefix}-*.cache"):  # the folder or the options changed
            stale.unlink(missing_ok=True)
        fits, free = cache_fits(folder, cache.nbytes + pending)
        if not fits:
            log.warning("%s: sample cache needs %.1f GB, only %.1f GB free and %.1f GB are kept free (%s); "
                        "decoding every epoch instead", folder, (cache.nbytes + pending) / 1e9, free / 1e9,
                        min_free_bytes() / 1e9, MIN_FREE_ENV)
            return None
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=name, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.truncate(cache.nbytes)  # sparse: flags read 0 until written
        os.replace(tmp, cache.path)  # atomic: readers see a whole file or none
    except OSError as exc:
        log.warning("%s: cannot create the sample cache (%s); decoding every epoch instead", folder, exc)
        return None
    log.info("sample cache %s: %d samples of %s %s (%.1f MB), filled on first use",
             cache.path, n, list(shape), cache.dtype, cache.nbytes / 1e6)
    return cache


def _memo_path(root: Path, kind: str, key: dict[str, Any], cache_dir: Path | str | None) -> tuple[Path, str]:
    prefix = folder_cache_prefix(root, kind)
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True, default=str).encode())
    return Path(cache_dir or default_cache_dir()) / "memo" / f"{prefix}-{digest.hexdigest()[:16]}.json", prefix


def read_memo(root: Path, kind: str, key: dict[str, Any], cache_dir: Path | str | None = None) -> dict | None:
    """A small JSON result computed earlier from data folder ``root`` under exactly ``key``
    (which must hold the source files' stamps and every option the result depends on), else None.

    For results that are deterministic given ``key`` but cost a pass over the data, such as a
    satellite site's band statistics: every federated round is a fresh process that would
    otherwise recompute them. Aggregates only: no path, no identifier.
    """
    path, _ = _memo_path(root, kind, key, cache_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # said, as a memo of the wrong content is (docs/engine.md)
        log.warning("%s: ignoring an unreadable memo (%s); computing it again", path, type(exc).__name__)
        return None


def write_memo(root: Path, kind: str, key: dict[str, Any], value: dict, cache_dir: Path | str | None = None) -> None:
    """Store ``value`` for :func:`read_memo` atomically, replacing this folder's older memos of
    ``kind``; an unwritable cache folder is logged and ignored (the result is recomputed)."""
    from fedmoco.atomic import atomic_write

    path, prefix = _memo_path(root, kind, key, cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{prefix}-*.json"):
            stale.unlink(missing_ok=True)
        atomic_write(path, lambda fh: fh.write(json.dumps(value).encode()))
    except OSError as exc:
        log.warning("%s: cannot write the cache memo (%s); it is recomputed next time", path.parent, exc)


def _free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class CacheUsage:
    """What a cache folder holds: sample caches, memos, the medical header indexes
    (``medical-index/``, domains/medical/index.py) and leftovers of interrupted writes."""

    folder: Path
    files: tuple[Path, ...]
    bytes: int  # allocated on disk (a sample cache is sparse until filled)
    removed: int = 0  # files removed by :func:`prune_cache`
    freed: int = 0  # bytes those files held


def _cache_files(folder: Path) -> list[Path]:
    found = [*(folder / "samples").glob("*.cache"), *(folder / "samples").glob("*.tmp")]
    for sub in ("memo", "medical-index"):
        found += [*(folder / sub).glob("*.json"), *(folder / sub).glob("*.tmp")]
    return sorted(p for p in found if p.is_file())


def _on_disk(path: Path) -> int:
    st = path.stat()
    return st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size


def cache_usage(cache_dir: Path | str | None = None) -> CacheUsage:
    """The files of the cache folder (``cache_dir`` or :func:`default_cache_dir`) and their size."""
    folder = Path(cache_dir or default_cache_dir())
    files = _cache_files(folder)
    return CacheUsage(folder, tuple(files), sum(_on_disk(p) for p in files))


def prune_cache(cache_dir: Path | str | None = None, older_than_days: float | None = None,
                now: float | None = None) -> CacheUsage:
    """Remove the cache folder's files, or with ``older_than_days`` those last used (the later of
    their access and modification times) more than that many days ago; returns what is left,
    with how many files and bytes were removed.

    Why a site needs it: a cache is keyed by its data folder's path and options, and holds no
    path (privacy), so the cache of a folder that was moved or deleted is never used again
    and nothing can tell whose it was; a satellite folder's cache can take up to
    ``cache_max_gb``. Removing a cache in use is safe: a running process keeps its mapping,
    and the next run rebuilds the file.
    """
    folder = Path(cache_dir or default_cache_dir())
    now = time.time() if now is None else now
    removed = freed = 0
    for path in _cache_files(folder):
        try:
            st = path.stat()
            if older_than_days is not None and now - max(st.st_atime, st.st_mtime) <= older_than_days * 86400:
                continue
            size = _on_disk(path)
            path.unlink()
        except FileNotFoundError:  # removed meanwhile (another prune, a rebuild)
            continue
        removed, freed = removed + 1, freed + size
    left = cache_usage(folder)
    return CacheUsage(folder, left.files, left.bytes, removed, freed)
