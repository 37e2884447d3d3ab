"""What the diagnostic probes of benchmarks/notes/ share: the glyph task they train on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_TASK = Path("/tmp/fedmoco-bench/glyphs-v3-100-100-100")


def add_task_argument(p: argparse.ArgumentParser) -> None:
    """``--task``: the glyph task folder that benchmarks/quality.py writes."""
    p.add_argument("--task", type=Path, default=DEFAULT_TASK,
                   help="the glyph task folder (benchmarks/quality.py writes it)")


def task_missing(task: Path) -> bool:
    """True, after one line on stderr, when ``task`` holds no glyph pool."""
    if (task / "pool").is_dir():
        return False
    print(f"{task}/pool: no glyph task there; run benchmarks/quality.py once first", file=sys.stderr)
    return True
