"""JSON-lines metric logs: one object per line, appended and flushed as training goes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

from fedmoco.atomic import json_safe


class JsonlLogger:
    """Appends records to ``path``; non-finite floats are written as null (valid JSON)."""

    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(json_safe(record)) + "\n")


log = logging.getLogger(__name__)


def read_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    """The JSON objects of ``path``, one per line. A line that is not one (a write cut short
    when a run was killed, so usually the last) is skipped with a warning naming the file and
    line: a run resumes, and its plots draw, from every record that was written whole."""
    with open(path, errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                yield record
            else:
                log.warning("%s:%d: skipped a line that is not a JSON record (a write cut short?)", path, number)

