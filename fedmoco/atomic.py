"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A reader (or a crash) never sees a half-written checkpoint, ledger or key.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None], *, mode: int | None = None) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path``, fsync it and rename it over ``path``.

    ``mode`` (e.g. ``0o600``) is set on the temp file before any byte is written, so the result
    has that mode whatever the mode of a file that was there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
