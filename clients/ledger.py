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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fedmoco.errors import ConfigError
from fedmoco.ledger import SiteLedger
from fedmoco.site_settings import LEDGER_FILE, ledger_path  # noqa: F401 re-exported

LEGACY_LEDGER_FILE = "key-ledger.pt"
#: JSON so that the site admin can read what was spent with any tool; not secret, not shared.
LEDGER_MODE = 0o644


def read_ledger(path: Path) -> SiteLedger | None:
    """The ledger at ``path`` (or carried over from a legacy ``key-ledger.pt`` beside it), or
    None if the site has none yet. ConfigError naming the file if it cannot be read."""
    if path.is_file():
        try:
            return SiteLedger.from_state_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: privacy ledger unreadable ({exc}); fix or remove it deliberately") from None
    legacy = path.parent / LEGACY_LEDGER_FILE
    if legacy.is_file():
        try:
            d = torch.load(legacy, map_location="cpu", weights_only=True)
            history = [(float(d["noise_multiplier"]), float(d["sample_rate"]), int(d["releases"]))]
            # The old ledger planned (z, q) once; its releases so far are the plan's minimum.
            return SiteLedger("keys", float(d["epsilon_budget"]), float(d["delta"]), max(int(d["releases"]), 1),
                              [h for h in history if h[2] > 0])
        except Exception as exc:  # noqa: BLE001 - any damage: refuse, never start afresh
            raise ConfigError(f"{legacy}: old privacy ledger unreadable ({exc})") from None
    return None


@contextlib.contextmanager
def locked_ledger(path: Path) -> Iterator[dict[str, Any]]:
    """Exclusive access to the ledger at ``path``: yields ``{"ledger": SiteLedger | None}``;
    whatever ``"ledger"`` holds on exit is written back atomically (unless an exception
    escaped). Blocks while another process holds the lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            box: dict[str, Any] = {"ledger": read_ledger(path)}
            yield box
            if box["ledger"] is not None:
                from fedmoco.keys import write_secret  # lazy: it imports cryptography

                text = json.dumps(box["ledger"].state_dict(), indent=1, sort_keys=True) + "\n"
                write_secret(path, text.encode(), mode=LEDGER_MODE)  # atomic: temp file, fsync, rename
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
