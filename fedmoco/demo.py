"""``make demo``: generated data, a short pretraining run, kNN evaluation, plots.

Everything is generated locally under ``demo-output/`` (no downloads) and sized to finish
in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from fedmoco.cli import main as cli

OUT = Path("demo-output")


def centralized(out: Path = OUT) -> int:
    """Pretrain a tiny encoder on generated shape images, then kNN-evaluate it."""
    data = out / "images"
    run = out / "pretrain"
    if not data.exists():
        cli(["make-demo-data", "--domain", "images", "--out", str(data)])
    if run.exists():
        shutil.rmtree(run)
    rc = cli(["pretrain", "--domain", "images", "--data", str(data), "--out", str(run), "--arch", "tiny",
              "--image-size", "32", "--epochs", "8", "--batch-size", "32", "--hidden-dim", "256",
              "--queue-size", "512", "--workers", "2", "--lr", "0.3"])
    if rc:
        return rc
    return cli(["-q", "knn", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(data)])


def main() -> int:
    start = time.perf_counter()
    rc = centralized()
    print(f"demo finished in {time.perf_counter() - start:.0f}s; outputs under {OUT.resolve()}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
