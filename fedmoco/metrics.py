"""JSON-lines metric logs: one object per line, appended and flushed as training goes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator


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
            fh.write(json.dumps(_clean(record)) + "\n")


def read_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    with open(path) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
