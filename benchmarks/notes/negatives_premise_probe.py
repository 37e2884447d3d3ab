"""Can negatives from data a site never trains on help at all? The global queue's premise,
tested without federation and without DP; a diagnostic, not a benchmark (``run_all`` runs the
scripts of benchmarks/ only).

Centralized MoCo on 4 of the glyph task's 8 classes (their 400 pool images; which 4 is drawn
per seed), the benchmark's tiny GroupNorm CNN, batch 32, K = 256, m = 0.99, T = 0.2, SGD lr
0.12 per 256 (the federated rows' client rate), cosine schedule, 30 epochs. kNN and linear
probe on all 8 classes (benchmarks/quality.py's ``score``). Modes:

- ``none``: MoCo on the 4 classes alone (a site under whole-class skew, without a federation);
- ``extra``: plus ``--n-extra`` keys of the other 4 classes' images each epoch, encoded at the
  epoch's start by a copy of the momentum encoder: the most a global queue could hand a site,
  exact (no DP) and encoded consistently with the site's own keys (no federation drift);
- ``extrastep``: the same, encoded afresh every step by the current momentum encoder;
- ``all``: MoCo on all 8 classes (what the other classes' images give when trained on).

    python benchmarks/quality.py --quick   # once, to write the glyph task (or any run of it)
    python benchmarks/notes/negatives_premise_probe.py none extra all --seeds 3
    python benchmarks/notes/negatives_premise_probe.py extra extrastep --n-extra 64 --seeds 3

Prints one JSON line per run and a table of mean ± std per mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_common import add_task_argument, task_missing  # noqa: E402
from quality import mean_std  # noqa: E402

MODES = ("none", "extra", "extrastep", "all")


def run(mode: str, seed: int, root: Path, epochs: int, n_extra: int) -> dict:
    """One training run; returns its kNN / probe top-1 (%) on all 8 classes and diagnostics."""
    import math
    from dataclasses import replace

    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Subset

    from fedmoco.config import MoCoConfig
    from fedmoco.data import DataConfig, build_pretrain_data
    from fedmoco.moco import MoCo
    from labelled_task import read_labels
    from quality import RECIPE, Setup, moco_overrides, score

    setup = replace(Setup(), lr=0.12)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ds = build_pretrain_data("images", root / "pool", DataConfig(image_size=setup.image_size, seed=seed,
                                                                   options=dict(RECIPE))).dataset
    names, labels = read_labels(root / "pool")
    if [p.name for p in ds.files] != names:
        raise RuntimeError(f"{root / 'pool'}: the dataset's files are not in labels.csv's order")
    classes = sorted(set(labels))
    rng.shuffle(classes)
    own = set(classes[:4])
    seen = [i for i, c in enumerate(labels) if c in own]
    unseen = [i for i, c in enumerate(labels) if c not in own]
    model = MoCo(MoCoConfig(in_channels=1, **moco_overrides(setup)))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=setup.scaled_lr,
                          momentum=0.9, weight_decay=setup.weight_decay)
    loader = DataLoader(Subset(ds, seen + unseen if mode == "all" else seen), batch_size=setup.batch_size,
                        shuffle=True, drop_last=True)

    def unseen_keys(encoder: torch.nn.Module) -> torch.Tensor:  # (n_extra, D) unit rows
        pick = rng.choice(unseen, size=min(n_extra, len(unseen)), replace=False).tolist()
        with torch.no_grad():
            return torch.nn.functional.normalize(encoder(torch.stack([ds[i][0] for i in pick])), dim=1)

    total, step, stds, shares = epochs * len(loader), 0, [], []
    for _ in range(epochs):
        extra = unseen_keys(copy.deepcopy(model.encoder_k).eval()) if mode == "extra" else None
        model.train()
        for xq, xk in loader:
            for group in opt.param_groups:
                group["lr"] = setup.scaled_lr * 0.5 * (1 + math.cos(math.pi * step / total))
            if mode == "extrastep":
                extra = unseen_keys(model.encoder_k)
            out = model(xq, xk, extra)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            step += 1
            stds.append(float(out.stats["emb_std"]))
            shares.append(float(out.stats["global_share"]))
    result = score(model.encoder_q.backbone, root, setup, seed)
    return {"mode": mode, "seed": seed, "n_extra": n_extra if mode.startswith("extra") else 0,
            "knn": round(result["knn"], 2), "probe": round(result["probe"], 2),
            "emb_std": round(statistics.mean(stds), 4), "extra_share": round(statistics.mean(shares), 3),
            "trained_classes": sorted(own)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("modes", nargs="+", choices=MODES)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n-extra", type=int, default=300, help="unseen-class keys per epoch (extra) or step (extrastep)")
    add_task_argument(p)
    args = p.parse_args(argv)
    if task_missing(args.task):
        return 2
    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    rows = []
    for seed in range(args.seeds):
        for mode in args.modes:
            rows.append(run(mode, seed, args.task, args.epochs, args.n_extra))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| mode | kNN | probe | emb-std | extra negatives' share |\n|---|---|---|---|---|")
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]

        def ms(key: str) -> str:
            return mean_std([r[key] for r in mine])
        print(f"| {mode} | {ms('knn')} | {ms('probe')} | {statistics.mean(r['emb_std'] for r in mine):.3f} "
              f"| {statistics.mean(r['extra_share'] for r in mine):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
