"""Does the DP global key queue help? kNN accuracy of the aggregated encoder with and without it.

Three sites, each with its own generated shape-image archive (``domains.images``, different
seeds), run the real FedMoCo server and ClientApp in one process (``server.inprocess``) for
a few rounds with a tiny encoder. The aggregated encoder is then scored by weighted kNN
(``fedmoco knn``) on a separate labelled archive. Settings compared, same seeds:

* ``no keys``: ``share-keys=false``: sites contrast against their local queue only;
* ``keys, eps=8``: the default, DP-noised keys (Poisson rate q, z from ``calibrate_noise``);
* ``keys, eps=1e6``: nearly noise-free keys, to separate the value of the keys from the
  cost of the noise (never a setting for real data).

    python benchmarks/federation_global_queue.py --seeds 5 --rounds 8

Writes benchmarks/results/federation_global_queue.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import command_line, cpu_model, write_report  # noqa: E402

SETTINGS = {
    "no keys": {"share-keys": False},
    "keys, eps=8": {"share-keys": True, "dp-epsilon": 8.0},
    "keys, eps=1e6": {"share-keys": True, "dp-epsilon": 1e6},
}


def one_run(work: Path, sites: list[Path], labelled: Path, seed: int, rounds: int, extra: dict) -> float:
    from clients.app import app as client_app
    from clients.task import RUN_DEFAULTS
    from fedmoco.cli import main as cli
    from server.app import run_federation
    from server.inprocess import InProcessGrid, make_context

    run = {**RUN_DEFAULTS, "arch": "tiny", "in-channels": 1, "image-size": 32, "domain": "images",
           "batch-size": 16, "local-epochs": 2, "lr": 0.3, "local-queue-size": 256, "num-server-rounds": rounds,
           "demo-root": str(sites[0].parent), "out-dir": str(work / "server"), "min-nodes": len(sites),
           "key-sample-rate": 0.3, "queue-sample": 512, "global-queue-size": 2048, "seed": seed,
           "plots": False, **extra}
    grid = InProcessGrid({100 + i: (client_app, make_context(100 + i, {"partition-id": i}, run))
                          for i in range(len(sites))})
    result = run_federation(grid, run)
    rc = cli(["-q", "knn", "--checkpoint", str(result.encoder), "--data", str(labelled), "--out", str(work / "eval"),
              "--seed", str(seed)])
    if rc:
        raise RuntimeError("knn failed")
    return json.loads((work / "eval" / "knn.json").read_text())["top1"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federation_global_queue.md")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)  # the rounds' INFO lines would bury the table
    import torch

    from domains.images import make_demo_images

    torch.set_num_threads(1)
    acc: dict[str, list[float]] = {name: [] for name in SETTINGS}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedmoco-gq-") as tmp:
        root = Path(tmp)
        sites = [make_demo_images(root / "sites" / f"site-{i}", n_per_class=16, size=32, seed=i, rgb=False)
                 for i in range(args.sites)]
        labelled = make_demo_images(root / "labelled", n_per_class=30, size=32, seed=99, rgb=False)
        for seed in range(args.seeds):
            for name, extra in SETTINGS.items():
                work = root / f"run-{seed}-{name.replace(' ', '').replace(',', '-')}"
                acc[name].append(one_run(work, sites, labelled, seed, args.rounds, extra))
                print(f"seed {seed} {name}: kNN top-1 {acc[name][-1]:.1f}%", flush=True)
    lines = [
        "# Does the DP global key queue help?",
        "",
        f"`{command_line('federation_global_queue.py', argv)}`, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s",
        "",
        f"- CPU: {cpu_model()}; torch {torch.__version__}, 1 intra-op thread",
        f"- {args.sites} sites x 64 generated 32 px grayscale shape images (4 classes), tiny encoder, "
        f"{args.rounds} rounds x 2 local epochs, key sample rate 0.3; kNN (k=200, T=0.1) on a separate "
        "labelled archive of 120 images (30% held out)",
        "",
        "| setting | kNN top-1 per seed (%) | mean (%) |",
        "|---|---|---|",
        *[f"| {name} | {', '.join(f'{a:.1f}' for a in vals)} | {statistics.mean(vals):.1f} |"
          for name, vals in acc.items()],
        "",
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
