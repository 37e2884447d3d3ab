"""Stop what a launcher started when the launcher itself is killed, even by SIGKILL.

    python -m server.reaper LAUNCHER_PID ROOT_PID [ROOT_PID ...]

Why: ``server.simulation`` starts a SuperLink, which starts ``flwr-simulation`` in a session
of its own, which starts Ray's servers and workers. On SIGINT or SIGTERM the launcher stops
them all (:func:`server.launch.stop_process`); a SIGKILL runs no handler, and the SuperLink's
parent-death signal (:func:`server.launch.die_with_parent`) reaches only the SuperLink. The
rest ran the federation to its last round, spending every site's privacy budget, and left
Ray's agents behind.

While the launcher lives, this process notes every descendant of the roots twice a second (with
its start time, so that a reused process id is never mistaken for one of them). Once the
launcher is gone it sends SIGTERM to each noted process still running, and to their
descendants, then SIGKILL after 10 s. A launcher that ends normally stops it first.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from server.launch import _alive, _send, _stat_fields, descendants

POLL_S = 0.5
GRACE_S = 10.0


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None


def same_process(pid: int, started: str | None) -> bool:
    return started is not None and start_time(pid) == started and _alive(pid)


def watch(launcher: int, roots: list[int], *, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> int:
    """Note the roots' descendants while ``launcher`` lives; then stop them. Returns how many
    processes were signalled."""
    launcher_started = start_time(launcher)
    # each process is known by (pid, start time) from when it was first seen: a pid that ends
    # and is reused (a root included) is another process, never signalled
    known: dict[int, str] = {pid: st for pid in roots if (st := start_time(pid)) is not None}
    while same_process(launcher, launcher_started):
        _note_descendants(known)
        known = {pid: st for pid, st in known.items() if same_process(pid, st)}
        time.sleep(poll_s)
    _note_descendants(known)  # those started since the last look
    targets = {pid: st for pid, st in known.items() if same_process(pid, st)}
    for pid, st in targets.items():
        if same_process(pid, st):
            _send(os.kill, pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(same_process(pid, st) for pid, st in targets.items()):
        time.sleep(0.1)
    for pid, st in targets.items():
        if same_process(pid, st):
            _send(os.kill, pid, signal.SIGKILL)
    return len(targets)


def _note_descendants(known: dict[int, str]) -> None:
    """Add the live descendants of the known processes (still the same ones) to ``known``."""
    for parent, started in list(known.items()):
        if not same_process(parent, started):
            continue
        for pid in descendants(parent):
            if pid not in known and (st := start_time(pid)) is not None:
                known[pid] = st


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        launcher, *roots = (int(a) for a in args)
    except ValueError:
        launcher, roots = 0, []
    if not launcher or not roots:
        print("usage: python -m server.reaper LAUNCHER_PID ROOT_PID [ROOT_PID ...]", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the launcher's to handle
    watch(launcher, roots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
