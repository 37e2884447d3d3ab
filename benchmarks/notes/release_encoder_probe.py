"""Which encoder may encode extra negatives? A centralized probe of the global-queue collapse;
a diagnostic, not a benchmark (``run_all`` runs the scripts of benchmarks/ only).

MoCo on the even half of the glyph pool (benchmarks/labelled_task.py, 400 images, the
benchmark's tiny GroupNorm CNN, batch 32, K = 256, m = 0.99, T = 0.2, SGD lr 0.015), with 300
extra negatives each epoch: the odd half's first views, encoded at the epoch's start by

- ``query``: a copy of the query encoder (what the federation's releases used before
  run_config ``release-ema``: the round's global model is a query encoder);
- ``momentum``: a copy of the momentum (key) encoder;
- ``ema<mu>``: a moving average of the query-encoder copies, keeping ``mu`` of the previous
  one per epoch (``ema0.78``: what m = 0.99 keeps over an epoch of 25 steps);
- ``none``: no extra negatives.

    python benchmarks/quality.py --quick   # once, to write the glyph task (or any run of it)
    python benchmarks/notes/release_encoder_probe.py query momentum ema0.78 ema0.5 none

Prints, every 3 epochs, the std per dimension of the normalised queries (emb-std: 0.088 when
spread over the sphere, 0 when collapsed) and the extra negatives' share of the softmax.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_common import add_task_argument, task_missing  # noqa: E402


def run(mode: str, root: Path, epochs: int = 30) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Subset

    from dataclasses import replace

    from fedmoco.config import MoCoConfig
    from fedmoco.data import DataConfig, build_pretrain_data
    from fedmoco.moco import MoCo
    from quality import Setup, moco_overrides

    setup = replace(Setup(), lr=0.12)  # the benchmark's encoder and hyper-parameters, its federated lr
    torch.manual_seed(0)
    ds = build_pretrain_data("images", root / "pool", DataConfig(
        image_size=setup.image_size, options={"flip": False, "crop_scale_min": 0.5})).dataset
    train_half, other_half = list(range(0, len(ds), 2)), torch.arange(1, len(ds), 2)
    model = MoCo(MoCoConfig(in_channels=1, **moco_overrides(setup)))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=setup.scaled_lr, momentum=0.9,
                          weight_decay=setup.weight_decay)
    loader = DataLoader(Subset(ds, train_half), batch_size=setup.batch_size, shuffle=True, drop_last=True)
    mu = float(mode[3:]) if mode.startswith("ema") else None
    average = None

    def encode(encoder: torch.nn.Module) -> torch.Tensor:  # (300, D) unit rows of the other half
        pick = other_half[torch.randperm(len(other_half))[:300]].tolist()
        with torch.no_grad():
            return F.normalize(encoder.eval()(torch.stack([ds[i][0] for i in pick])), dim=1)

    for epoch in range(epochs):
        extra = None
        if mode == "query":
            extra = encode(copy.deepcopy(model.encoder_q))
        elif mode == "momentum":
            extra = encode(copy.deepcopy(model.encoder_k))
        elif mu is not None:
            snapshot = copy.deepcopy(model.encoder_q)
            if average is None:
                average = snapshot
            else:
                with torch.no_grad():
                    for a, s in zip(average.parameters(), snapshot.parameters()):
                        a.mul_(mu).add_(s, alpha=1 - mu)
            extra = encode(copy.deepcopy(average))
        model.train()
        stds, shares = [], []
        for xq, xk in loader:
            out = model(xq, xk, extra)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            stds.append(float(out.stats["emb_std"]))
            shares.append(float(out.stats["global_share"]))
        if epoch % 3 == 0 or epoch == epochs - 1:
            print(f"{mode}: epoch {epoch:2d}  emb-std {sum(stds) / len(stds):.4f}  "
                  f"extra negatives' share {sum(shares) / len(shares):.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("modes", nargs="+", help="query | momentum | ema<mu> | none")
    add_task_argument(p)
    args = p.parse_args(argv)
    if task_missing(args.task):
        return 2
    bad = [m for m in args.modes if m not in ("query", "momentum", "none") and not m.startswith("ema")]
    if bad:
        p.error(f"unknown mode(s) {bad}: query, momentum, ema<mu> or none")
    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    for mode in args.modes:
        run(mode, args.task)
    return 0


if __name__ == "__main__":
    sys.exit(main())
