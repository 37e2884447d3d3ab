"""Shared by the benchmarks: a description of the machine and library versions, report writing,
and the suite's conventions (``--device``, one JSON line of headline figures per script)."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def gpu_name(device: str = "cpu") -> str:
    """The CUDA device's name when ``device`` is CUDA and one is visible, else ``none``."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "none"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What every table records: CPU model, cores, GPU, torch version, date (UTC)."""
    import torch

    return {"cpu": cpu_model(), "cores": cores(), "gpu": gpu_name(device), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def machine_line(device: str = "cpu") -> str:
    """One markdown line: ``Machine: CPU, N cores, GPU ...; torch X; date``."""
    m = machine_info(device)
    n = m["cores"]
    return f"Machine: {m['cpu']}, {n} core{'s' * (n != 1)}, GPU {m['gpu']}; torch {m['torch']}; {m['date']}"


def device_name(value: str) -> str:
    """argparse type of ``--device``: cpu, cuda or cuda:N, whether or not a GPU is visible (the
    scripts that use one also call :func:`check_device`)."""
    import argparse

    if re.fullmatch(r"cpu|cuda(:\d+)?", value) is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    return value


def add_device_arg(parser: Any, default: str = "cpu") -> None:
    """The suite's uniform ``--device`` option (cpu | cuda | cuda:N)."""
    parser.add_argument("--device", default=default, type=device_name, help=f"cpu | cuda | cuda:N (default {default})")


def check_device(device: str) -> str:
    """``device`` if usable; exits with one line (status 2) when it is not cpu, cuda or cuda:N
    (``gpu`` gave torch's traceback in some scripts and ran on the CPU in others; an audit), or
    when CUDA is asked for but absent."""
    import torch

    if re.fullmatch(r"cpu|cuda(:\d+)?", str(device)) is None:
        print(f"--device {device}: expected cpu, cuda or cuda:N", file=sys.stderr)
        raise SystemExit(2)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {device}: no CUDA device is visible to torch", file=sys.stderr)
        raise SystemExit(2)
    if str(device).startswith("cuda:") and int(str(device)[5:]) >= torch.cuda.device_count():
        print(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible", file=sys.stderr)
        raise SystemExit(2)
    return str(device)


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        # 4 significant digits, not 4 decimals: delta = 1e-5 must not print as 0.0
        return None if not math.isfinite(value) else float(f"{value:.4g}") if abs(value) < 1 else round(value, 4)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def emit_json(record: dict[str, Any]) -> str:
    """Print the headline figures as ONE JSON line ending in ``}`` (the suite's convention:
    ``run_all.py`` and CI read the last such line of a script's output). ``bench`` names
    the script; NaN/inf become null so the line is strict JSON. Returns the line."""
    if "bench" not in record:
        raise ValueError("a benchmark's JSON line needs a 'bench' key")
    line = json.dumps(_plain(record), sort_keys=False, allow_nan=False)
    print(line, flush=True)
    return line


def last_json_line(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that parses as a JSON object with a ``bench`` key."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "bench" in obj:
                return obj
    return None


def machine_lines() -> list[str]:
    """Markdown bullet lines: date (UTC), CPU, cores, GPU, OS, Python and the versions that shape
    the numbers."""
    import numpy
    import rasterio
    import torch
    import torchvision

    return [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- CPU: {cpu_model()}, {cores()} core{'s' * (cores() != 1)} available; GPU: {gpu_name('cuda')}",
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
    """The command that produced a report, as a user would type it in the repository root: paths
    inside the checkout (run_all passes absolute ``--out`` paths) are written relative to it."""
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    args = argv if argv is not None else sys.argv[1:]
    return f"python benchmarks/{script}" + "".join(f" {str(a).replace(root, '')}" for a in args)


def write_report(out: Path, lines: list[str]) -> None:
    """Write the markdown report and echo it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
