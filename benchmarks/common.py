"""Shared by the benchmarks: a description of the machine and library versions, report writing."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines() -> list[str]:
    """Markdown bullet lines: CPU, cores, OS, Python and the versions that shape the numbers."""
    import numpy
    import rasterio
    import torch
    import torchvision

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- CPU: {cpu_model()}, {cores} cores available",
        f"- OS: {platform.platform()}",
        f"- Python {sys.version.split()[0]}, numpy {numpy.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), torchvision {torchvision.__version__}",
        f"- rasterio {rasterio.__version__}, GDAL {rasterio.__gdal_version__}",
    ]


def markdown_table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that produced a report, as a user would type it."""
    return f"python benchmarks/{script}" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))


def write_report(out: Path, lines: list[str]) -> None:
    """Write the markdown report and echo it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
