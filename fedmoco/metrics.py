"""JSON-lines metric logs: one object per line, appended and flushed as training goes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

from fedmoco.atomic import atomic_write_text, json_safe


class JsonlLogger:
    """Appends records to ``path``; non-finite floats are written as null (valid JSON)."""

    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a+b") as fh:
            # A line cut short (a killed run) would swallow this record into itself: end it first.
            # (read_jsonl skips the fragment with a warning; this record stays whole.)
            end = fh.seek(0, 2)
            if end:
                fh.seek(end - 1)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")  # append mode: every write goes to the end
            fh.write((json.dumps(json_safe(record)) + "\n").encode())


log = logging.getLogger(__name__)

#: Fields that are numbers (or null, for a non-finite value) wherever fedmoco writes them: a
#: record holding another type there was written by hand or by another tool, and the plots and
#: --resume, which compare and convert them, ended in tracebacks on it.
NUMERIC_FIELDS = ("epoch", "step", "loss", "lr", "round", "time")


def _not_a_number(record: dict[str, Any]) -> str | None:
    for key in NUMERIC_FIELDS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return key
    return None


def read_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    """The JSON objects of ``path``, one per line. A line that is not one (a write cut short
    when a run was killed, so usually the last) is skipped with a warning naming the file and
    line: a run resumes, and its plots draw, from every record that was written whole. So is a
    record whose :data:`NUMERIC_FIELDS` hold something other than a number."""
    with open(path, errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                bad = _not_a_number(record)
                if bad:
                    log.warning("%s:%d: skipped a record whose %r is not a number", path, number, bad)
                    continue
                yield record
            else:
                log.warning("%s:%d: skipped a line that is not a JSON record (a write cut short?)", path, number)


def keep_records(path: Path | str, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite the JSON-lines file ``path`` atomically with only the records ``keep`` accepts
    (a resumed run's log loses what came after its checkpoint); returns how many were dropped,
    0 when there is no file. Lines that are no record are dropped too (read_jsonl skips them)."""
    path = Path(path)
    if not path.exists():
        return 0
    records = list(read_jsonl(path))
    kept = [r for r in records if keep(r)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)
