"""Batched views on CUDA equal the same views on the CPU, given the same random draws.

Both devices run the batched path (``per_image = False``): on a CPU the views otherwise go
image by image, and the medical per-image path interpolates twice where a rotated image's
batched grid sample interpolates once (MONAI's order; up to a few normalised units at the
edges of a rotated image). That path is checked against the batched one and against MONAI
in tests/fedmoco/test_gpu_augment.py.

    python benchmarks/views_device_check.py [--device cuda] [--quick]

Prints the largest absolute difference per domain and one JSON line last; exits 1 when a
difference exceeds 1e-3 (float32 on both devices; only summation order differs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from common import add_device_arg, check_device, command_line, emit_json, machine_lines, write_report  # noqa: E402

from domains.medical.options import MedicalOptions  # noqa: E402
from domains.satellite.options import parse_options  # noqa: E402
from fedmoco.data import Normalization  # noqa: E402
from fedmoco.gpu_augment import MedicalViews, SatelliteViews  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(p, default="cuda")
    p.add_argument("--quick", action="store_true", help="(already quick: one batch per domain)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "views_device_check.md")
    args = p.parse_args(argv)
    dev = torch.device(check_device(args.device))
    # cuDNN convolutions (the medical blur) default to TF32 on recent GPUs: a 10-bit mantissa,
    # about 3e-3 off float32 here, which is the GPU's arithmetic, not a different view
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    med = MedicalViews(MedicalOptions.parse({}), 224, Normalization([0.5], [0.25]))
    med.per_image = False
    x = torch.rand(16, 1, 317, 317) * 1.4 - 0.2
    jit = torch.rand(16) < 0.5
    params = med.sample_params(16, 317, torch.device("cpu"))
    params["noise_std"].zero_()  # noise is drawn on the device: compare the deterministic part
    cpu = med.view(x, jit, params)
    gpu = med.to(dev).view(x.to(dev), jit.to(dev), {k: v.to(dev) for k, v in params.items()}).cpu()
    med_diff = float((cpu - gpu).abs().max())
    sat = SatelliteViews(parse_options({}), 64, Normalization([0.2] * 13, [0.1] * 13), [490.0 + 40 * i for i in range(13)], {})
    sat.per_image = False
    t = torch.rand(16, 13, 64, 64)
    sp = sat.sample_params(16, 64, 64, torch.device("cpu"))
    sp["noise_std"].zero_()
    cpu = sat.view(t, sp)
    gpu = sat.to(dev).view(t.to(dev), {k: v.to(dev) for k, v in sp.items()}).cpu()
    sat_diff = float((cpu - gpu).abs().max())
    ok = max(med_diff, sat_diff) < 1e-3
    write_report(args.out, [
        "# Batched views: CPU against the training device, same random draws", "",
        f"Command: `{command_line('views_device_check.py', argv)}`", "",
        *machine_lines(), "",
        "One batch of 16 per domain through the batched views (`fedmoco.gpu_augment`, `per_image = False`), "
        "parameters drawn once on the CPU and applied on both devices; the Gaussian noise (drawn on the device) "
        "set to 0. Medical: 317 px bases to 224 px views; satellite: 13-band 64 px tiles. Passes below 1e-3 "
        "(float32 on both devices; only summation order may differ).", "",
        "| domain | max abs difference, CPU vs " + str(dev) + " |", "|---|---|",
        f"| medical | {med_diff:.2e} |", f"| satellite | {sat_diff:.2e} |", "",
        f"Verdict: {'pass' if ok else 'FAIL'}" + ("" if dev.type == "cuda" else
                                                  f" (device {dev}: both sides ran on the CPU, a self-check only)"),
        ""])
    emit_json({"bench": "views_device_check", "device": str(dev), "medical_max_abs_diff": med_diff,
               "satellite_max_abs_diff": sat_diff})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
