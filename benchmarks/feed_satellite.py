"""Satellite data feed: pairs/s per core without and with the raster cache, and on a GPU.

Generates the 13-band demo archive (``make_demo_archive(bands=13)``: 256 px scenes, one
Sentinel-2 product as 13 JPEG 2000 band files at 10/20/60 m, resampled on every read without
the cache) and measures, at 64 px tiles (the earlier satellite_throughput setting), what
``benchmarks/feed_common.py`` describes. With ``--device cuda`` the GPU feed runs at
``--gpu-image-size`` (224 px tiles) against the MoCo ResNet-18 step with 13 input channels.

    python benchmarks/feed_satellite.py [--quick] [--device cuda]

Writes benchmarks/results/feed_satellite.md (or --out) and prints one JSON line last.
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
from feed_common import (add_feed_args, batched_pass, feed_record, gpu_feed_rate, gpu_lines,  # noqa: E402
                         interleaved_rates, load_note, per_sample_pass, profile_lines, rate_rows, step_rate)

from domains.satellite import make_demo_archive  # noqa: E402
from fedmoco.data import DataConfig, build_pretrain_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(p)
    p.add_argument("--quick", action="store_true", help="256 samples, 2 timed passes")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gpu-image-size", type=int, default=224)
    add_feed_args(p, "feed_satellite")
    args = p.parse_args(argv)
    device = torch.device(check_device(args.device))
    n, repeats = (256, 2) if args.quick else (args.samples, 5)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_archive(Path(tmp) / "archive", bands=13, seed=0, tile_size=64)
        cache_dir = str(Path(tmp) / "cache")
        opts = {"samples_per_epoch": n}
        plain = build_pretrain_data("satellite", root, DataConfig(image_size=args.image_size, cache=False,
                                                                   options=opts)).dataset
        cached = build_pretrain_data("satellite", root, DataConfig(image_size=args.image_size, cache_dir=cache_dir,
                                                                    options=opts)).dataset
        channels = cached.reader.layout.in_channels
        before = load_note()
        bases, views = cached.batched_views()
        rates = interleaved_rates({"base": per_sample_pass(plain, n), "cached": per_sample_pass(cached, n),
                                   "batched": batched_pass(bases, views, n, args.batch_size)}, repeats)
        after = load_note()
        profiled = profile_lines(bases, views, n, args.batch_size,
                                 "cached tiles + batched views on the CPU") if args.profile else []
        gpu = {}
        if device.type == "cuda":
            big = build_pretrain_data("satellite", root, DataConfig(
                image_size=args.gpu_image_size, cache_dir=cache_dir, options={"samples_per_epoch": 4096})).dataset
            gbases, gviews = big.batched_views()
            steps = 10 if args.quick else 30
            gpu["feed"] = gpu_feed_rate(gbases, gviews, device, args.gpu_batch_size, steps, args.workers)
            gpu["step"] = step_rate(channels, args.gpu_image_size, args.gpu_batch_size, device, steps)
    rows = rate_rows(("today: GDAL read + two per-sample views (no cache)",
                      "cache: cached window + two per-sample views (torchvision)",
                      "cache + batched views on the CPU (fedmoco.gpu_augment)"), rates)
    lines = [
        "# Satellite data feed: raster cache and batched views",
        "",
        f"Command: `{command_line('feed_satellite.py', argv)}`",
        "",
        machine_line(args.device),
        "",
        f"Archive: `make_demo_archive(bands=13, seed=0, tile_size=64)`, {channels} channels, random "
        f"{args.image_size} px tiles, {n} samples per pass.",
        "",
        "Pairs/s per core: one process, one intra-op thread, median of the timed passes (min-max) after a "
        "warm-up pass; the three paths take turns pass by pass. A pair = the two views MoCo consumes per "
        "tile.",
        "",
        *markdown_table(["path", "pairs/s per core", "vs today"], rows),
        "",
        f"Machine load: {before} before, {after} after. The cores are shared with other jobs; the rows are "
        "measured in turns, pass by pass, so their ratios are the figure to read.",
    ]
    lines += profiled
    if gpu:
        lines += gpu_lines(f"GPU ({torch.cuda.get_device_name()}), {args.gpu_image_size} px tiles",
                           f"feed: cached rasters, {args.workers} loader workers, views on the GPU, "
                           f"batch {args.gpu_batch_size}",
                           f"MoCo step: ResNet-18, {channels} channels, split BN, AMP, batch {args.gpu_batch_size}",
                           gpu)
    write_report(args.out, lines)
    emit_json(feed_record("feed_satellite", rates, gpu, image_size=args.image_size, bands=channels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
