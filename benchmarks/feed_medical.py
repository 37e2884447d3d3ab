"""Medical data feed: pairs/s per core without and with the decoded-sample cache, and on a GPU.

Generates a synthetic hospital archive (``make_demo_archive``: 512 px CT slices and CRs in
the demo's mix of transfer syntaxes, JPEG 2000 included) and measures, at 224 px, what
``benchmarks/feed_common.py`` describes: per-core CPU rates for today's path, the cached
per-sample path and cached bases with batched views; with ``--device cuda`` the GPU feed
against the MoCo ResNet-18 step.

    python benchmarks/feed_medical.py [--quick] [--device cuda]

Writes benchmarks/results/feed_medical.md (or --out) and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from common import add_device_arg, check_device, command_line, emit_json, machine_line, markdown_table, write_report  # noqa: E402
from feed_common import (add_feed_args, batched_pass, feed_record, gpu_lines, gpu_rates,  # noqa: E402
                         interleaved_rates, load_note, per_sample_pass, profile_lines, rate_rows)

from domains.medical import make_demo_archive  # noqa: E402
from fedmoco.data import DataConfig, build_pretrain_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(p)
    p.add_argument("--quick", action="store_true", help="small archive, 2 timed passes (about a minute on CPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32, help="CPU batch for batched views (default 32)")
    add_feed_args(p, "feed_medical")
    args = p.parse_args(argv)
    device = torch.device(check_device(args.device))
    patients, repeats = (2, 2) if args.quick else (8, 5)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_archive(Path(tmp) / "archive", n_patients=patients, image_size=512, n_slices=8, seed=0)
        cache_dir = str(Path(tmp) / "cache")
        plain = build_pretrain_data("medical", root, DataConfig(image_size=args.image_size, cache=False)).dataset
        cached = build_pretrain_data("medical", root, DataConfig(image_size=args.image_size, cache_dir=cache_dir)).dataset
        n = len(plain)
        before = load_note()
        bases, views = cached.batched_views()
        rates = interleaved_rates({"base": per_sample_pass(plain, n), "cached": per_sample_pass(cached, n),
                                   "batched": batched_pass(bases, views, n, args.batch_size)}, repeats)
        after = load_note()
        profiled = profile_lines(bases, views, n, args.batch_size,
                                 "cached bases + batched views on the CPU") if args.profile else []
        gpu = {}
        if device.type == "cuda":
            steps = 10 if args.quick else 30
            gpu = gpu_rates(bases, views, cached, 1, args.image_size, device, args.gpu_batch_size, steps, args.workers)
    rows = rate_rows(("today: read + decode + window + 2 views (no cache)",
                      "cache: cached base + 2 per-sample views (MONAI)",
                      "cache + batched views on the CPU (fedmoco.gpu_augment)"), rates)
    lines = [
        "# Medical data feed: decoded-sample cache and batched views",
        "",
        f"Command: `{command_line('feed_medical.py', argv)}`",
        "",
        machine_line(args.device),
        "",
        f"Archive: `make_demo_archive(n_patients={patients}, image_size=512, n_slices=8)`: {n} samples (512 px CT "
        f"in several transfer syntaxes incl. JPEG 2000, MONOCHROME1 CRs), views at {args.image_size} px.",
        "",
        "Pairs/s per core: one process, one intra-op thread, median of the timed passes (min-max) after a "
        "warm-up pass that also fills the cache; the three paths take turns pass by pass. A pair = the two "
        "views MoCo consumes per image.",
        "",
        *markdown_table(["path", "pairs/s per core", "vs today"], rows),
        "",
        f"Machine load: {before} before, {after} after. The 2 cores are shared with other jobs, so absolute "
        "rates vary by tens of percent between runs; the three rows take turns, so their ratios hold.",
    ]
    lines += profiled
    if gpu:
        lines += gpu_lines(f"GPU ({torch.cuda.get_device_name()})",
                           f"feed: cached bases, {args.workers} loader workers, views on the GPU, batch {args.gpu_batch_size}",
                           f"MoCo step: ResNet-18, 1 channel, split BN, AMP, batch {args.gpu_batch_size}", gpu)
        lines += ["", f"fedmoco's training loop end to end (make_loader + Trainer.train_epoch, {args.workers} "
                      f"workers, batch {args.gpu_batch_size}): {gpu['trainer']:,.0f} images/s, "
                      f"{gpu['trainer'] / gpu['step']:.2f}x the step alone."]
    write_report(args.out, lines)
    emit_json(feed_record("feed_medical", rates, gpu, image_size=args.image_size)
              | ({"gpu_trainer_images_per_s": round(gpu["trainer"])} if gpu else {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
