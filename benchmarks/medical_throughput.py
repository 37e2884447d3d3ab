"""Medical data pipeline throughput vs the MoCo ResNet-18 training step, both at 224 px.

Generates a synthetic hospital archive (`make_demo_archive`, 512 px CT slices and CRs in the
demo's mix of transfer syntaxes) in a temporary folder and measures:

* decode: ``read_dicom`` per transfer syntax (ms per 512 px frame, main process);
* pairs: ``dataset[i]`` = read + window + two independently augmented 224 px views,
  through a DataLoader (batch 32, ``collate_views``) with 0 workers and with 2 workers. One
  untimed warm-up epoch first; timed epochs with workers include starting them, as every
  training epoch does;
* MoCo step: ``fedmoco.moco.MoCo`` with a ResNet-18 encoder (1 input channel, split BN,
  queue 4096) at 224 px: momentum update, both forwards, loss, backward, SGD step, on CPU.

One "image" is one sample, i.e. one (query, key) pair: the unit a MoCo step consumes.

    python benchmarks/medical_throughput.py

Writes benchmarks/results/medical_throughput.md (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import monai  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from pydicom.uid import UID  # noqa: E402
from common import (add_device_arg, check_device, command_line, cpu_model, emit_json, gpu_name,  # noqa: E402
                    markdown_table, write_report)
from torch.utils.data import DataLoader  # noqa: E402

from domains.medical import build_pretrain_data, make_demo_archive, read_dicom  # noqa: E402
from fedmoco.data import DataConfig, collate_views  # noqa: E402


def decode_ms(root: Path, repeats: int) -> dict[str, tuple[int, float]]:
    """Transfer syntax name -> (frames, median ms per frame over ``repeats`` passes)."""
    by_syntax: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            by_syntax[UID(read_dicom(path).transfer_syntax).name].append(path)
        except ValueError:
            continue  # the archive's deliberately broken files
    out = {}
    for name, paths in sorted(by_syntax.items()):
        frames = sum(read_dicom(p).pixels.shape[0] for p in paths)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for p in paths:
                read_dicom(p)
            times.append((time.perf_counter() - start) / frames * 1000)
        out[name] = (frames, statistics.median(times))
    return out


def pair_rates(dataset, workers: int, batch: int, repeats: int) -> list[float]:
    """Pairs per second of ``repeats`` timed epochs after a warm-up epoch."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate_views, shuffle=True)
    for _ in loader:  # warm-up: page cache, lazy imports, convolution primitives
        pass
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(views[0].shape[0] for views, _ in loader if views is not None)
        rates.append(n / (time.perf_counter() - start))
    return rates


def moco_rate(image_size: int, batch: int, steps: int, warmup: int = 2,
              device: str = "cpu") -> tuple[list[float], str]:
    """Pairs per second of MoCo ResNet-18 training steps on ``device``, and what was measured."""
    from fedmoco.config import MoCoConfig, TrainConfig
    from fedmoco.moco import MoCo
    from fedmoco.train import build_optimizer

    model = MoCo(MoCoConfig(arch="resnet18", in_channels=1, queue_size=4096)).to(device).train()
    opt = build_optimizer(model, TrainConfig(batch_size=batch))
    x_q, x_k = (torch.randn(batch, 1, image_size, image_size, device=device) for _ in range(2))
    rates = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = model(x_q, x_k).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()  # the step is asynchronous on CUDA
        if step >= warmup:
            rates.append(batch / (time.perf_counter() - start))
    return rates, "fedmoco.moco.MoCo, ResNet-18, 1 channel, split BN (8 splits), MLP head, queue 4096, SGD"


def spread(rates: list[float]) -> str:
    """Median with the range: the 2 shared cores make single runs noisy."""
    return f"{statistics.median(rates):,.1f} ({min(rates):,.1f}-{max(rates):,.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--slices", type=int, default=8, help="CT slices per patient (default 8)")
    parser.add_argument("--source-size", type=int, default=512, help="pixels of the stored images (default 512)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per setting (default 3)")
    parser.add_argument("--moco-steps", type=int, default=5, help="timed MoCo steps after 2 warm-up steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "medical_throughput.md")
    parser.add_argument("--quick", action="store_true", help="4 patients, 1 timed epoch, 2 MoCo steps")
    add_device_arg(parser)
    args = parser.parse_args(argv)
    check_device(args.device)
    if args.quick:
        args.patients, args.repeats, args.moco_steps = min(args.patients, 4), 1, min(args.moco_steps, 2)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedmoco-med-bench-") as tmp:
        start = time.perf_counter()
        root = make_demo_archive(Path(tmp) / "hospital", n_patients=args.patients, image_size=args.source_size,
                                 n_slices=args.slices, seed=0)
        generated = time.perf_counter() - start
        decode = decode_ms(root, args.repeats)
        print(f"decode ms per file: {decode}", flush=True)  # not a line a JSON reader could mistake
        data = build_pretrain_data(root, DataConfig(image_size=args.image_size, seed=0,
                                                    options={"cache_dir": str(Path(tmp) / "cache")}))
        n_samples = len(data.dataset)
        rates = {"0 workers": pair_rates(data.dataset, 0, args.batch_size, args.repeats)}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        rates["0 workers, 1 thread"] = pair_rates(data.dataset, 0, args.batch_size, args.repeats)
        torch.set_num_threads(threads)
        rates["2 workers"] = pair_rates(data.dataset, 2, args.batch_size, args.repeats)
        print(f"pairs/s: {rates}", flush=True)
    moco, moco_what = moco_rate(args.image_size, args.batch_size, args.moco_steps, device=args.device)
    print(moco, flush=True)
    load_after = os.getloadavg()

    best_loader = max(statistics.median(r) for k, r in rates.items() if "workers" in k)
    step = statistics.median(moco)
    command = command_line("medical_throughput.py", argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        "# Medical data pipeline throughput",
        "",
        f"Command: `{command}`",
        "",
        f"- CPU: {cpu_model()}, {cores} cores available; GPU: {gpu_name(args.device)} (MoCo step on {args.device})",
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; Python {sys.version.split()[0]}, numpy {np.__version__}, torch {torch.__version__} "
        f"({threads} intra-op threads), torchvision {torchvision.__version__}, MONAI {monai.__version__}, "
        f"pydicom {pydicom.__version__}",
        f"- Load average (1 min): {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end "
        "(the cores are shared with other jobs; figures vary by tens of percent between runs)",
        "",
        f"Archive: `make_demo_archive(n_patients={args.patients}, image_size={args.source_size}, "
        f"n_slices={args.slices}, seed=0)`, written in {generated:.1f} s: {n_samples} samples "
        f"({args.source_size} px CT slices in HU and MONOCHROME1 CRs; one multi-frame Enhanced CT) plus 4 "
        "broken or non-image files, which the scan skips.",
        "",
        "## Decoding (`read_dicom`, main process)",
        "",
        *markdown_table(["transfer syntax", "frames", "ms per frame"],
                        [[name, n, f"{ms:.2f}"] for name, (n, ms) in decode.items()]),
        "",
        f"## Read + window + two augmented views at {args.image_size} px vs the MoCo step",
        "",
        f"Batch {args.batch_size}; median of {args.repeats} timed epochs (min-max in brackets). Default "
        "augmentations (docs/medical.md). An image = one sample = one (query, key) pair.",
        "",
        *markdown_table(["what", "images/s"],
                        [[f"data pipeline, {k}", spread(r)] for k, r in rates.items()]
                        + [[f"MoCo training step ({moco_what}), batch {args.batch_size}, "
                            f"median of {args.moco_steps} steps after 2 warm-up", spread(moco)]]),
        "",
        f"Data pipeline / MoCo step: {best_loader / step:.1f}x with the fastest setting above, "
        f"{statistics.median(rates['0 workers']) / step:.1f}x even in the main process. "
        + ("The data pipeline is not the bottleneck." if min(best_loader, statistics.median(rates['0 workers']))
           >= step else "WARNING: the data pipeline is slower than the training step."),
        "",
        "Notes: during training the DataLoader workers share the 2 cores with the training step, so the "
        "rates above are upper bounds for each side alone; what matters is that loading needs a fraction "
        "of the time a step needs. *0 workers, 1 thread* is what each DataLoader worker runs with.",
        "",
    ]
    write_report(args.out, lines)
    emit_json({"bench": "medical_throughput", "device": args.device, "cores": cores,
               "pairs_per_s": {k: statistics.median(r) for k, r in rates.items()},
               # the one-thread rate: what one core gives (each DataLoader worker runs so); the best
               # setting divided by every core understated it when that setting was one thread (an audit)
               "pairs_per_s_per_core": statistics.median(rates["0 workers, 1 thread"]), "moco_step_pairs_per_s": step,
               "feed_over_step": best_loader / step})
    return 0


if __name__ == "__main__":
    sys.exit(main())
