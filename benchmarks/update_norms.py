"""How far does an honest site move the global model in one round? ||w_site - w_global||_2.

The default ``max-update-norm`` (run_config) is set from these figures. A site's round is
local MoCo training that starts from the global model; this script runs exactly that (the
ClientApp's model, optimizer and schedule: ``clients.task.moco_config`` /
``train_config`` with the run_config defaults: lr 0.06, batch 32, GroupNorm) on a
generated hospital archive, and measures the L2 distance of the shared arrays (query
encoder + projection head) from where they started after 1, 3, 10, 30, ... local steps.
The server records the same quantity per reply in ``rounds.jsonl`` (``update-norm``).

    python benchmarks/update_norms.py --steps 1,3,10,30,100 --archs tiny,resnet18

Writes benchmarks/results/update_norms.md (or --out) and one JSON line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import command_line, device_name, emit_json, machine_lines, markdown_table, write_report  # noqa: E402


def norms_after(arch: str, data_path: Path, steps: list[int], image_size: int) -> tuple[dict[int, float], float]:
    """{local steps: ||w - w_start||_2 of the shared arrays}, and ||w_start||_2."""
    import numpy as np
    import torch

    from clients.task import RUN_DEFAULTS, moco_config, shared_arrays, train_config
    from fedmoco.data import DataConfig, build_pretrain_data
    from fedmoco.device import select_device
    from fedmoco.moco import MoCo
    from fedmoco.train import Trainer, make_loader

    run = {**RUN_DEFAULTS, "arch": arch, "image-size": image_size}
    torch.manual_seed(0)
    model = MoCo(moco_config(run))
    start = {k: a.numpy().astype(np.float64) for k, a in shared_arrays(model).items()}
    tcfg = train_config(run)
    data = build_pretrain_data("medical", data_path, DataConfig(image_size=image_size, seed=0))
    device = select_device("cpu")
    loader = make_loader(data.dataset, tcfg, device, seed=0)
    trainer = Trainer(model, tcfg, device, total_steps=max(steps), steps_per_epoch=len(loader), progress=False)
    out, done, epoch = {}, 0, 0
    while done < max(steps):
        nxt = min(s for s in steps if s > done)
        summary = trainer.train_epoch(loader, epoch=epoch, max_steps=nxt - done)  # stop at the next point
        done += summary.steps
        epoch += 1
        if done in steps:
            now = shared_arrays(model)
            out[done] = float(np.sqrt(sum(float(((now[k].numpy() - v) ** 2).sum()) for k, v in start.items())))
    return out, float(np.sqrt(sum(float((v ** 2).sum()) for v in start.values())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="1,3,10,30,100", help="local steps at which to measure")
    p.add_argument("--archs", default="tiny,resnet18")
    p.add_argument("--patients", type=int, default=20)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "update_norms.md")
    p.add_argument("--device", default="cpu", type=device_name, help="accepted for the suite (benchmarks/run_all.py); the sites train on the CPU whatever it says")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    import torch

    from domains.medical.demo import make_demo_archive

    from clients.task import RUN_DEFAULTS

    torch.set_num_threads(1)
    bound = float(RUN_DEFAULTS["max-update-norm"])
    steps = sorted({int(s) for s in args.steps.split(",")})
    t0 = time.perf_counter()
    rows, record, largest, starts = [], {"bench": "update_norms"}, (0.0, "", 0), []
    with tempfile.TemporaryDirectory(prefix="fedmoco-norms-") as tmp:
        site = make_demo_archive(Path(tmp) / "site", n_patients=args.patients, seed=0, image_size=args.image_size)
        for arch in args.archs.split(","):
            norms, start = norms_after(arch, site, steps, args.image_size)
            rows.append([arch, f"{start:.3g}", *(f"{norms[s]:.3g}" for s in steps)])
            record[f"{arch}-norm-after-{steps[-1]}-steps"] = norms[steps[-1]]
            largest = max(largest, max((v, arch, s) for s, v in norms.items()))
            starts.append(start)
            print(f"{arch}: {norms}", flush=True)
    lines = [
        "# Update norms of an honest site, ||w_site - w_global||_2 after local steps",
        "",
        f"`{command_line('update_norms.py', argv)}`, {time.perf_counter() - t0:.0f} s",
        "",
        *machine_lines(),
        f"- one generated hospital archive ({args.patients} patients, {args.image_size} px), run_config "
        "defaults (lr 0.06, momentum 0.9, weight decay 5e-4, batch 32, GroupNorm, small-input), from a fresh model",
        "",
        *markdown_table(["encoder", "||w_global||", *(f"{s} step(s)" for s in steps)], rows),
        "",
        f"The default `max-update-norm` ({bound:g}, run_config) is {bound / largest[0]:.0f}x the largest honest "
        f"norm above ({largest[1]}, {largest[2]} steps: {largest[0]:.3g}), and "
        + (f"below every initial model norm (smallest {min(starts):.3g}), so an honest round passes and one reply "
           "cannot replace the model" if bound < min(starts) else
           f"NOT below the smallest initial model norm ({min(starts):.3g}): one reply could replace the model")
        + " (docs/federation.md, \"Hostile sites\").",
        "",
    ]
    write_report(args.out, lines)
    record["max_update_norm_over_largest"] = round(bound / largest[0], 2)
    emit_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
