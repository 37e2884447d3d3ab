"""Atomic file writes: a temp file in the same folder, fsync, rename over the target, fsync the folder.

A reader (or a crash) never sees a half-written checkpoint, ledger or key.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None], *, mode: int | None = None) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path``, fsync it and rename it over ``path``.

    ``mode`` (e.g. ``0o600`` for a key) is set on the temp file before any byte is written, so
    the result has that mode whatever the mode of a file that was there. Without it the file
    gets the mode ``open()`` would give a new file, 0o666 less the umask: ``mkstemp`` alone
    makes every checkpoint, export and report 0600, unreadable to the rest of a team.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # torch.save's zip writer meets an interrupt or a full disk in its __exit__ and raises
        # RuntimeError("... unexpected pos ...") from it: the cause is what the user must see
        # (Ctrl-C: one line and exit 130; a full disk: one line naming the file).
        cause = exc.__context__
        if isinstance(exc, RuntimeError) and isinstance(cause, (KeyboardInterrupt, OSError)):
            raise cause from None
        raise
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable: until the folder's entry is on disk, a power cut
    can bring back the old file (a privacy ledger that under-counts what was already sent).
    Filesystems that cannot fsync a folder (some network mounts) are left as they are."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(path: Path | str) -> int:
    """Delete the temp files an interrupted :func:`atomic_write` of ``path`` left behind (a
    SIGKILL during the write leaves one, up to a checkpoint's size); returns how many. Only for
    a file with a single writer, such as a run's checkpoint at the start of the run."""
    path = Path(path)
    gone = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):  # none in a missing folder
        tmp.unlink(missing_ok=True)
        gone += 1
    return gone


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc/self/status);
    else set and restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def json_safe(x: Any, *, skip_private: bool = False) -> Any:
    """``x`` as standard JSON values: NaN and infinities become null (``json.dumps`` would
    write the non-standard ``NaN`` that strict parsers refuse), numpy scalars Python numbers,
    keys strings. ``skip_private`` drops keys that start with ``_`` (in-memory extras)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v, skip_private=skip_private) for k, v in x.items()
                if not (skip_private and str(k).startswith("_"))}
    if isinstance(x, (list, tuple)):
        return [json_safe(v, skip_private=skip_private) for v in x]
    np = sys.modules.get("numpy")  # not imported here: `fedmoco --help` must not wait for numpy
    if np is not None and isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def atomic_write_text(path: Path | str, text: str) -> Path:
    """``text`` (UTF-8) written to ``path`` atomically (:func:`atomic_write`). A file name in it
    that is not UTF-8 (surrogate-escaped, as Python decodes POSIX names) keeps its own bytes."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8", "surrogateescape")))


def atomic_write_json(path: Path | str, obj: Any, *, indent: int | None = 2) -> Path:
    """``obj`` as standard JSON (:func:`json_safe`), written to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent))
