"""Where do a federated encoder's kNN errors fall under whole-class skew: within a site's own
classes, or across sites? A diagnostic over global_queue_benefit.py's run cache, not a
benchmark (``run_all`` runs the scripts of benchmarks/ only, not of benchmarks/notes/).

Under ``--split classes`` each of the 4 sites holds 2 of the 8 glyph classes. Global
negatives are meant to teach a site's encoder what it cannot see: other sites' data. If the
aggregated encoder had learned each site's classes but mixed them up with other sites'
classes, its errors would fall across sites more often than chance; this prints that share.
A wrong class picked at random is another site's in 6 of 7 cases (86%).

    python benchmarks/global_queue_benefit.py --split classes ...   # trains and caches the runs
    python benchmarks/notes/site_errors.py [--work /tmp/fedmoco-bench]

Prints one line per cached federated run of the classes split: its release, kNN top-1 and
the share of its kNN errors (k = 20, T = 0.1, as the benchmark scores) that fall across sites.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def site_of_class(labels: list[str], seed: int, n_sites: int = 4) -> dict[str, int]:
    """Which site holds each class of the pool's ``labels`` under the benchmark's own split
    (``labelled_task.class_partition`` for ``seed``)."""
    from labelled_task import class_partition

    return {labels[j]: site for site, items in enumerate(class_partition(labels, n_sites, seed)) for j in items}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/fedmoco-bench"))
    args = p.parse_args(argv)
    import torch

    from fedmoco.evaluate import extract_features, knn_predict
    from labelled_task import read_labels
    from quality import Setup, labelled

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    runs = sorted((args.work / "runs" / "full").glob("federated-*/job.json"))
    found = 0
    for job_file in runs:
        job = json.loads(job_file.read_text())
        trained = job_file.parent / "backbone.pt"
        if job.get("split") != "classes" or not trained.exists():
            continue
        found += 1
        root, setup, seed = Path(job["root"]), Setup(**job["setup"]), job["seed"]
        _, pool_labels = read_labels(root / "pool")
        owner = site_of_class(pool_labels, seed)
        backbone = torch.load(trained, weights_only=False)["backbone"]
        train, test = labelled(root, "eval-train", setup), labelled(root, "eval-test", setup)
        cpu = torch.device("cpu")
        f_tr, y_tr, _ = extract_features(backbone, train.dataset, device=cpu, progress=False)
        f_te, y_te, _ = extract_features(backbone, test.dataset, device=cpu, progress=False)
        pred = knn_predict(f_tr, y_tr, f_te, len(train.classes), k=setup.knn_k, temperature=0.1).argmax(1)
        site = torch.tensor([owner[c] for c in train.classes])
        wrong = pred != y_te
        across = wrong & (site[pred] != site[y_te])
        release = job.get("run_extra", {}).get("key-release", "none")
        eps = job.get("node_extra", {}).get("dp-epsilon")
        cancel = job.get("run_extra", {}).get("cancel-false-negatives")
        ema = job.get("run_extra", {}).get("release-ema")
        what = (release + (f", eps {eps}" if eps is not None else "") + (", no cancellation" if cancel is False else "")
                + (f", release-ema {ema}" if ema is not None else ""))
        print(f"seed {seed}, {what}: kNN {100 * float((~wrong).float().mean()):.1f}%, "
              f"{int(wrong.sum())} errors, {100 * float(across.sum() / wrong.sum()):.0f}% across sites "
              "(a random wrong class: 86%)")
    if not found:
        print(f"no cached runs of --split classes under {args.work}/runs/full: run "
              "benchmarks/global_queue_benefit.py --split classes first", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
