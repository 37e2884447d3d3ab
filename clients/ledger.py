"""The site's privacy ledger on its own disk: one JSON file, file-locked, written atomically.

The budget belongs to the site, so the ledger lives where only the site admin decides:
node_config ``ledger-path`` (a file), or ``<state-dir>/privacy-ledger.json``. Nothing the
server sends can point it elsewhere or reset it, and it outlives runs, server restarts and
SuperNode restarts (``Context.state`` lives in the SuperNode's memory and does not).

:func:`locked_ledger` holds an exclusive ``fcntl`` lock on ``<ledger>.lock`` from reading
to writing, so two runs (or two SuperNodes) that share a ledger serialise their spending;
the JSON is replaced atomically (temp file, fsync, rename), so a crash leaves either the old
or the new ledger, never a torn one. An unreadable ledger is an error, never a fresh budget.

A ``key-ledger.pt`` left by an older fedmoco in the same ``state-dir`` (per-record keys, one
fixed (z, q)) is carried over into the new file, so its spending is not forgotten.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedmoco.errors import ConfigError
from fedmoco.ledger import (LEGACY_LEDGER_FILE, LOCK_NOTE, SiteLedger, ledger_lock,  # noqa: F401 re-exported
                            read_ledger)
from fedmoco.site_settings import LEDGER_FILE, ledger_path  # noqa: F401 re-exported

log = logging.getLogger("flwr.fedmoco.client")

#: JSON so that the site admin can read what was spent with any tool; not secret, not shared.
LEDGER_MODE = 0o644


@contextlib.contextmanager
def locked_ledger(path: Path) -> Iterator[dict[str, Any]]:
    """Exclusive access to the ledger at ``path``: yields ``{"ledger": SiteLedger | None}``;
    whatever ``"ledger"`` holds on exit is written back atomically (unless an exception
    escaped). Blocks while another process holds the lock.

    A ledger reached through a symbolic link is locked and written at the file it points to:
    the atomic rename would otherwise replace the link with a copy, and the link and its
    target, each with its own lock, would spend one budget twice. A ledger with other hard
    links is refused for the same reason (ConfigError).
    """
    path = Path(path).expanduser().resolve()
    links = path.stat().st_nlink if path.is_file() else 1
    if links > 1:
        raise ConfigError(f"{path}: the privacy ledger has {links} hard links; each would become a "
                          "budget of its own when it is rewritten: keep one, and point every name at it with a "
                          "symbolic link or the same ledger-path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(ledger_lock(path), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            lock.seek(0)
            written = bool(lock.read(1))  # the lock file is marked once a ledger has been written
            ledger = read_ledger(path)  # refuses a ledger that is gone while the lock is marked
            box: dict[str, Any] = {"ledger": ledger}
            yield box
            if box["ledger"] is not None:
                from fedmoco.keys import write_secret  # lazy: it imports cryptography

                text = json.dumps(box["ledger"].state_dict(), indent=1, sort_keys=True) + "\n"
                write_secret(path, text.encode(), mode=LEDGER_MODE)  # atomic: temp file, fsync, rename
                if not written:
                    lock.write(LOCK_NOTE)
                    lock.flush()
                    os.fsync(lock.fileno())
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
