"""Do the examples' generated tasks reward pretraining? A centralized stand-in, probed.

For the hospitals' lung-lesion task or the stations' land-cover task
(:mod:`examples.demo`): pool three sites' unlabelled archives, pretrain the examples' tiny
GroupNorm encoder with ``fedmoco pretrain``, then fit a logistic-regression probe on frozen
backbone features of the labelled set with grouped k-fold cross-validation (no patient or
scene on both sides), and do the same from a random-init encoder of that architecture.

    python benchmarks/demo_tasks_probe.py --domain satellite --epochs 12 --queue-size 64 --lr 0.2
    python benchmarks/demo_tasks_probe.py --domain medical --epochs 12 --queue-size 64 --lr 0.2 \\
        --data-option crop_scale=0.8

Writes benchmarks/results/demo_tasks_probe_<domain>.md (or --out: command, date, machine and
the table) and prints one JSON line (benchmarks/common.py convention).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
# examples/ is not installed (it drives server/, which the core never imports): import it from the checkout
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from common import command_line, device_name, emit_json, machine_lines, write_report  # noqa: E402

from fedmoco.checkpoint import atomic_save, load_checkpoint  # noqa: E402
from fedmoco.cli import main as cli  # noqa: E402
from fedmoco.config import MoCoConfig  # noqa: E402
from fedmoco.data import DataConfig, build_labelled_data  # noqa: E402
from examples.demo import TASKS, make_example_data  # noqa: E402
from fedmoco.evaluate import extract_features  # noqa: E402
from fedmoco.moco import MoCo  # noqa: E402
from fedmoco.pretrain import make_checkpoint, model_from_checkpoint  # noqa: E402
from fedmoco.site_settings import SITE_SETTINGS_FILE  # noqa: E402


def _features(checkpoint: Path, domain: str, images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Frozen backbone features (n, D) and labels (n,) of a labelled folder, in file order."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint)
    cfg = DataConfig(image_size=ckpt["data"]["image_size"], options=ckpt["data"]["options"])
    data = build_labelled_data(domain, images, cfg, labels, None)
    feats, y, _ = extract_features(model.encoder_q.backbone, data.dataset, device=torch.device("cpu"),
                                   progress=False)
    return feats.numpy(), y.numpy()


def _auroc(y: np.ndarray, p: np.ndarray, classes: np.ndarray) -> float:
    return float(roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else
                 roc_auc_score(y, p, multi_class="ovr", labels=classes))


def held_out(f: np.ndarray, y: np.ndarray, ft: np.ndarray, yt: np.ndarray) -> float:
    """Macro AUROC on a separate labelled archive (features ``ft``, labels ``yt``) of a logistic
    probe fitted on the whole labelled set (``f``, ``y``): no fold of 30 images decides it."""
    scale = StandardScaler().fit(f)
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(scale.transform(f), y)
    return _auroc(yt, clf.predict_proba(scale.transform(ft)), clf.classes_)


def probe(f: np.ndarray, y: np.ndarray, labels: Path, folds: int) -> tuple[float, float]:
    """Grouped-CV (macro AUROC, accuracy) of a logistic probe on frozen features ``f`` (n, D)
    with labels ``y`` (n,) of the files listed in ``labels``, in file order."""
    # the labelled datasets keep file order, and every file here is one sample: map groups by path
    with open(labels) as fh:
        group_of = {r["path"]: r["group"] for r in csv.DictReader(fh)}
    groups = np.array([group_of[p] for p in sorted(group_of)])
    if len(groups) != len(y):
        raise RuntimeError(f"{labels}: {len(groups)} labelled files but {len(y)} samples; expected one per file")
    aucs, accs = [], []
    for tr, te in GroupKFold(folds).split(f, y, groups):
        scale = StandardScaler().fit(f[tr])
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(scale.transform(f[tr]), y[tr])
        p = clf.predict_proba(scale.transform(f[te]))
        accs.append(float((clf.classes_[p.argmax(1)] == y[te]).mean()))
        aucs.append(_auroc(y[te], p, clf.classes_))
    return float(np.mean(aucs)), float(np.mean(accs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain", choices=sorted(TASKS), default="satellite")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--device", default="cpu", type=device_name, help="accepted for the benchmark suite (benchmarks/run_all.py); "
                   "the probe runs on the CPU whatever it says")
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--norm", default="group", choices=["group", "batch", "split-batch"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-option", action="append", default=[])
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--work", type=Path, help="keep the data and runs here (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="the markdown report (default: "
                   "benchmarks/results/demo_tasks_probe_<domain>.md)")
    args = p.parse_args(argv)
    out = args.out or Path(__file__).resolve().parent / "results" / f"demo_tasks_probe_{args.domain}.md"
    task = TASKS[args.domain]
    if args.work is not None:
        return _probe(args, argv, out, task, args.work)
    with tempfile.TemporaryDirectory(prefix="demo-probe-") as work:  # ~14 MB a run, removed after
        return _probe(args, argv, out, task, Path(work))


def _probe(args: argparse.Namespace, argv: list[str] | None, out: Path, task, work: Path) -> int:
    sites, labelled = make_example_data(args.domain, work, 3)
    pool = work / "pool"
    for i, site in enumerate(sites):
        if not (pool / f"site-{i}").exists():  # images only: a site's settings file is no sample
            shutil.copytree(site, pool / f"site-{i}", ignore=shutil.ignore_patterns(SITE_SETTINGS_FILE))
    size = task.run_config["image-size"]
    options = [o for kv in task.run_config.get("data-options", "").split(",") if kv for o in ("--data-option", kv)]
    for kv in args.data_option:
        options += ["--data-option", kv]
    rc = cli(["-q", "pretrain", "--domain", args.domain, "--data", str(pool), "--out", str(work / "run"),
              "--arch", "tiny", "--norm", args.norm, "--hidden-dim", "512", "--image-size", str(size),
              "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--workers", "0", "--no-plots",
              "--lr", str(args.lr), "--queue-size", str(args.queue_size), "--momentum", str(args.momentum), *options])
    if rc:
        return rc
    ckpt = load_checkpoint(work / "run" / "checkpoint.pt")
    torch.manual_seed(0)
    atomic_save(make_checkpoint(MoCo(MoCoConfig.from_dict(ckpt["moco_config"])), data=ckpt["data"]), work / "random.pt")
    images, labels = labelled / task.data_subdir, labelled / "labels.csv"
    test = labelled.parent / "test"  # the hospitals' held-out patients (examples.demo)
    scores: dict[str, tuple[float, float]] = {}
    held: dict[str, float] = {}
    for name, ckpt in (("pretrained", work / "run" / "checkpoint.pt"), ("random", work / "random.pt")):
        f, y = _features(ckpt, args.domain, images, labels)  # once per encoder, for both probes
        scores[name] = probe(f, y, labels, args.folds)
        if task.make_test is not None:
            held[name] = held_out(f, y, *_features(ckpt, args.domain, test / task.data_subdir, test / "labels.csv"))
    pre, rnd = scores["pretrained"], scores["random"]
    head = "| task | pretrained AUROC / acc | random init AUROC / acc |" + (
        " held-out AUROC, pretrained / random |" if held else "")
    row = (f"| {args.domain}: {task.what} | {pre[0]:.3f} / {100 * pre[1]:.1f}% | "
           f"{rnd[0]:.3f} / {100 * rnd[1]:.1f}% |" + (f" {held['pretrained']:.3f} / {held['random']:.3f} |" if held else ""))
    write_report(out, [
        f"# Do the {args.domain} example's generated task reward pretraining? (centralized probe)", "",
        f"Command: `{command_line('demo_tasks_probe.py', argv)}`", "",
        *machine_lines(), "",
        f"The three example sites' unlabelled archives (`examples.demo`, synthetic data) pooled; the examples' tiny "
        f"GroupNorm encoder ({args.norm} norm) pretrained with `fedmoco pretrain` for {args.epochs} epochs (batch "
        f"{args.batch_size}, K {args.queue_size}, lr {args.lr}, m {args.momentum}); a logistic-regression probe "
        f"(C = 0.1, standardised features) on the frozen backbone, scored by {args.folds}-fold grouped "
        "cross-validation (no patient or scene on both sides; macro AUROC and accuracy, mean over folds)"
        + ("; held-out: the probe fitted on the whole labelled set, scored on the separate test archive" if held else "")
        + ". Random init: the same architecture, seed 0.", "",
        head, "|---|---|---|" + ("---|" if held else ""), row, ""])
    emit_json({"bench": "demo_tasks_probe", "domain": args.domain, "pretrained_auroc": pre[0],
               "pretrained_accuracy": pre[1], "random_auroc": rnd[0], "random_accuracy": rnd[1],
               "held_out_pretrained_auroc": held.get("pretrained"), "held_out_random_auroc": held.get("random"),
               "epochs": args.epochs, "queue_size": args.queue_size, "lr": args.lr, "norm": args.norm,
               "batch_size": args.batch_size})
    return 0


if __name__ == "__main__":
    sys.exit(main())
