"""Quality at equal budget on the glyphs task: fedmoco's MoCo against lightly's, and federated.

Every row trains the same tiny CNN (``fedmoco.encoders.TinyCNN``) for the same number of
passes over the pretraining pool, with the same views (the images recipe with ``flip=false``:
the task has mirrored classes), batch, K, m, T, learning-rate schedule and seed, then scores
the frozen backbone by weighted kNN (k = 20, T = 0.1) and a linear probe (100 epochs) fitted
on ``eval-train`` and scored on ``eval-test`` (benchmarks/labelled_task.py). Rows:

- raw pixels: kNN / probe on the normalised pixels (no encoder);
- random init: the untrained tiny CNN;
- lightly MoCo: lightly's blocks (MoCoProjectionHead, NTXentLoss with a memory bank,
  update_momentum, and for split BN lightly's SplitBatchNorm + batch_shuffle) around the
  same backbone, in a plain PyTorch loop with persistent loader workers;
- fedmoco MoCo: ``fedmoco.pretrain.pretrain``, the path ``fedmoco pretrain`` takes;
- fedmoco federated, IID / Dirichlet(0.5) label skew over 4 sites: the real ServerApp
  strategy and ClientApp in one process (``server.inprocess``), no global negatives; one
  local epoch per round and as many rounds as the centralized runs have epochs, so each
  row sees every pool image the same number of times;
- the recipe ablation: fedmoco MoCo without the intensity nuisance (offset = ramp = noise
  = 0), and with the images domain's default flip on.

    python benchmarks/quality.py --quick                       # 1 seed, small task, 3 epochs (a smoke run)
    python benchmarks/quality.py --seeds 3 --jobs 2 --workers 0  # the CPU table
    python benchmarks/quality.py --seeds 3 --jobs 8 --device cuda

The defaults are the budget measured to be learnable on CPU (benchmarks/notes/quality.md,
"task v3 design"): glyphs v3 with 100 pool images per class, 60 passes, batch 32, K = 256,
lr 0.03 per 256 (0.00375 at batch 32), crop_scale_min 0.5; one centralized run takes about
5 minutes on one CPU thread (--workers 0) and reaches ~36% kNN / ~65% probe against 19% / 21%
for raw pixels and 18% / 27% for random init.

Writes benchmarks/results/quality.md (or --out) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_device_arg, check_device, emit_json, machine_line, write_report  # noqa: E402
from labelled_task import QUICK, VERSION, TaskSize, make_task, split_sites  # noqa: E402

#: The views every MoCo row trains on: the images recipe, flip off (mirrored classes).
#: Crops keep at least half the image (crop_scale_min 0.5): at 32 px the default 0.2 often
#: cuts the glyph away (benchmarks/notes/quality.md, task v3 design).
RECIPE = {"flip": False, "crop_scale_min": 0.5}
NO_NUISANCE = {**RECIPE, "offset": 0.0, "ramp": 0.0, "noise": 0.0}
FLIP_ON = {**RECIPE, "flip": True}


#: Short ids of the rows (for --rows) -> their names in the tables.
ROW_IDS = {"raw": "raw pixels", "random": "random init", "lightly": "lightly MoCo", "fedmoco": "fedmoco MoCo",
           "fed-iid": "fedmoco federated, IID, 4 sites", "fed-dirichlet": "fedmoco federated, Dirichlet 0.5, 4 sites",
           "no-nuisance": "fedmoco MoCo, no offset/ramp/noise", "flip-on": "fedmoco MoCo, flip on (images default)"}
ROW_IDS_BY_NAME = {v: k for k, v in ROW_IDS.items()}


@dataclass
class Setup:
    """The shared budget and hyper-parameters of every trained row."""

    epochs: int = 60
    batch_size: int = 32
    queue_size: int = 256  # K
    momentum: float = 0.99  # m
    temperature: float = 0.2  # T
    # For batch 256, scaled linearly (fedmoco's convention): 0.00375 at batch 32. Without
    # warm-up, 0.48 (0.06 at batch 32) collapses the embeddings in the first epoch and the
    # encoders end below random init by kNN (benchmarks/notes/quality.md, task v3 design).
    lr: float = 0.03
    weight_decay: float = 5e-4
    norm: str = "group"
    dim: int = 128
    hidden_dim: int = 512
    image_size: int = 32
    workers: int = 1
    threads: int = 1
    device: str = "cpu"
    knn_k: int = 20
    probe_epochs: int = 100
    # --quick: the code the runs were made with (code_fingerprint), part of their cache key, so
    # `make bench` measures this checkout. Full runs leave it "" and reuse runs across code
    # versions, as their tables' provenance notes say.
    code: str = ""

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 256


@dataclass
class Job:
    """One row x seed. ``kind``: raw, random, lightly, fedmoco, federated."""

    row: str
    kind: str
    seed: int
    root: str
    setup: Setup
    options: dict[str, Any] = field(default_factory=lambda: dict(RECIPE))
    split: str = ""  # federated: iid | dirichlet
    run_extra: dict[str, Any] = field(default_factory=dict)  # federated: run_config overrides
    node_extra: dict[str, Any] = field(default_factory=dict)  # federated: node_config for every site


# -- evaluation --------------------------------------------------------------------------

def pool_normalization(root: Path, image_size: int):
    """The pool's per-channel mean/std, shared by every row's training and evaluation."""
    from domains.images.dataset import estimate_normalization
    from fedmoco.data import list_files

    return estimate_normalization(list_files(root / "pool", (".png",)), 1, image_size)


def labelled(root: Path, name: str, setup: Setup):
    from fedmoco.data import DataConfig, build_labelled_data

    folder = root / name
    return build_labelled_data("images", folder, DataConfig(image_size=setup.image_size), folder / "labels.csv",
                               pool_normalization(root, setup.image_size))


def score(backbone, root: Path, setup: Setup, seed: int) -> dict[str, float]:
    """kNN and linear-probe top-1 (%) of a frozen backbone ((N, C, H, W) -> (N, F)), or of
    raw pixels when ``backbone`` is None."""
    import torch

    from fedmoco.evaluate import ProbeConfig, extract_features, knn_predict, linear_probe

    device = torch.device(setup.device)
    net = backbone if backbone is not None else torch.nn.Flatten()
    tr, te = labelled(root, "eval-train", setup), labelled(root, "eval-test", setup)
    f_tr, y_tr, _ = extract_features(net, tr.dataset, device=device, progress=False)
    f_te, y_te, _ = extract_features(net, te.dataset, device=device, progress=False)
    n_cls = len(tr.classes)
    knn = knn_predict(f_tr, y_tr, f_te, n_cls, k=setup.knn_k, temperature=0.1)
    torch.manual_seed(seed)  # the probe's initial weights: without it raw pixels' probe varied by ~1.5 points
    clf = linear_probe(f_tr, y_tr, n_cls, ProbeConfig(epochs=setup.probe_epochs, seed=seed), progress=False)
    with torch.no_grad():
        probe = clf(f_te)
    return {"knn": top1(knn, y_te), "probe": top1(probe, y_te)}


def top1(scores, labels) -> float:
    """Top-1 accuracy (%) of class scores (N, C) against labels (N,)."""
    return 100.0 * float((scores.argmax(1) == labels).float().mean())


# -- training ----------------------------------------------------------------------------

def moco_overrides(setup: Setup) -> dict[str, Any]:
    return {"arch": "tiny", "norm": setup.norm, "dim": setup.dim, "hidden_dim": setup.hidden_dim,
            "queue_size": setup.queue_size, "momentum": setup.momentum, "temperature": setup.temperature,
            "small_input": True}


def train_fedmoco(job: Job, work: Path):
    """``fedmoco.pretrain.pretrain`` on the pool -> (backbone, seconds per epoch)."""
    import torch

    from fedmoco.checkpoint import load_checkpoint
    from fedmoco.config import TrainConfig
    from fedmoco.data import DataConfig
    from fedmoco.metrics import read_jsonl
    from fedmoco.pretrain import model_from_checkpoint, pretrain

    s = job.setup
    tcfg = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay,
                       warmup_epochs=0.0, num_workers=s.workers, seed=job.seed)
    result = pretrain("images", Path(job.root) / "pool", work, moco_overrides=moco_overrides(s), train_cfg=tcfg,
                      data_cfg=DataConfig(image_size=s.image_size, seed=job.seed, options=dict(job.options)),
                      device=torch.device(s.device), progress=False)
    epochs = [r["seconds"] for r in read_jsonl(result.metrics) if r.get("event") == "epoch"]
    model = model_from_checkpoint(load_checkpoint(result.checkpoint))
    return model.encoder_q.backbone, statistics.mean(epochs)


def lightly_model(setup: Setup, in_channels: int):
    """Query and key networks (backbone + lightly MoCoProjectionHead) and whether keys are
    batch-shuffled (split BN only, as lightly's own CIFAR-10 benchmark does)."""
    import torch
    from lightly.models.batchnorm import SplitBatchNorm
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad

    from fedmoco.encoders import TinyCNN, norm_layer

    if setup.norm == "split-batch":
        norm = lambda c: SplitBatchNorm(c, num_splits=8)  # noqa: E731
    else:
        norm = norm_layer(setup.norm)
    backbone = TinyCNN(in_channels, norm)
    query = torch.nn.ModuleDict({"backbone": backbone,
                                 "head": MoCoProjectionHead(backbone.out_dim, setup.hidden_dim, setup.dim)})
    key = copy.deepcopy(query)
    deactivate_requires_grad(key)
    return query, key, setup.norm == "split-batch"


def train_lightly(job: Job, work: Path):
    """MoCo v2 from lightly's blocks on the same views -> (backbone, seconds per epoch)."""
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.utils import batch_shuffle, batch_unshuffle, update_momentum
    from torch.utils.data import DataLoader

    from fedmoco.data import DataConfig, build_pretrain_data
    from fedmoco.pretrain import seed_everything

    s = job.setup
    device = torch.device(s.device)
    seed_everything(job.seed)
    data = build_pretrain_data("images", Path(job.root) / "pool",
                               DataConfig(image_size=s.image_size, seed=job.seed, options=dict(job.options)))
    loader = DataLoader(data.dataset, batch_size=s.batch_size, shuffle=True, drop_last=True,
                        num_workers=s.workers, persistent_workers=s.workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(job.seed))
    query, key, shuffle = lightly_model(s, data.in_channels)
    query, key = query.to(device), key.to(device)
    criterion = NTXentLoss(temperature=s.temperature, memory_bank_size=(s.queue_size, s.dim)).to(device)
    opt = torch.optim.SGD(query.parameters(), lr=s.scaled_lr, momentum=0.9, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs * len(loader))
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    epoch_s = []
    for _ in range(s.epochs):
        t0 = time.perf_counter()
        query.train()
        for x_q, x_k in loader:
            x_q, x_k = x_q.to(device, non_blocking=True), x_k.to(device, non_blocking=True)
            update_momentum(query, key, m=s.momentum)
            with torch.autocast(device.type, enabled=use_amp):
                q = query["head"](query["backbone"](x_q))
                with torch.no_grad():
                    if shuffle:
                        x_k, order = batch_shuffle(x_k)
                    k = key["head"](key["backbone"](x_k))
                    if shuffle:
                        k = batch_unshuffle(k, order)
                loss = criterion(q, k)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
        if not math.isfinite(float(loss)):
            raise FloatingPointError("lightly MoCo: loss is not finite")
        epoch_s.append(time.perf_counter() - t0)
    return query["backbone"].eval(), statistics.mean(epoch_s)


def federated_run_config(job: Job, work: Path, n_sites: int) -> dict[str, Any]:
    """run_config of a federated row: the centralized rows' settings, one local epoch per round."""
    from clients.task import RUN_DEFAULTS

    s = job.setup
    norm = pool_normalization(Path(job.root), s.image_size)
    run = {**RUN_DEFAULTS, "arch": "tiny", "in-channels": 1, "image-size": s.image_size, "small-input": True,
           "norm": s.norm, "dim": s.dim, "hidden-dim": s.hidden_dim, "local-queue-size": s.queue_size,
           "momentum": s.momentum, "temperature": s.temperature, "local-epochs": 1, "batch-size": s.batch_size,
           "lr": s.lr, "weight-decay": s.weight_decay, "warmup-epochs": 0.0, "num-workers": s.workers,
           "seed": job.seed, "domain": "images", "num-server-rounds": s.epochs, "min-nodes": n_sites,
           "data-options": ",".join(f"{k}={str(v).lower()}" for k, v in job.options.items()),
           "input-mean": f"{norm.mean[0]:.6f}", "input-std": f"{norm.std[0]:.6f}",
           "out-dir": str(work / "server"), "plots": False, "resume": False}
    # No global negatives unless the job asks for them (both generations of the switch).
    if "key-release" in RUN_DEFAULTS:
        run["key-release"] = "none"
    if "share-keys" in RUN_DEFAULTS:
        run["share-keys"] = False
    run.update(job.run_extra)
    return run


def train_federated(job: Job, work: Path):
    """4 sites in one process with the real ServerApp strategy and ClientApp -> (aggregated
    backbone, seconds per round, summed over sites)."""
    from clients.app import app as client_app
    from fedmoco.checkpoint import load_checkpoint
    from fedmoco.pretrain import model_from_checkpoint
    from server.app import run_federation
    from server.inprocess import InProcessGrid, make_context

    sites = split_sites(Path(job.root), job.split, n_sites=4, alpha=0.5, seed=job.seed)
    run = federated_run_config(job, work, len(sites))
    grid = InProcessGrid({100 + i: (client_app, make_context(
        100 + i, {"data-path": str(site), "device": job.setup.device, "threads": job.setup.threads,
                  "state-dir": str(work / f"state-{i}"), **job.node_extra}, run))
        for i, site in enumerate(sites)})
    result = run_federation(grid, run)
    if result.rounds_done != job.setup.epochs:
        raise RuntimeError(f"federation stopped after {result.rounds_done} of {job.setup.epochs} rounds")
    per_round = statistics.mean(
        sum(t for r, _, t in grid.timings if r == rnd) for rnd in {r for r, _, _ in grid.timings})
    model = model_from_checkpoint(load_checkpoint(result.encoder))
    return model.encoder_q.backbone, per_round, result


def random_backbone(job: Job):
    import torch

    from fedmoco.moco import MoCo
    from fedmoco.config import MoCoConfig

    torch.manual_seed(job.seed)
    return MoCo(MoCoConfig(in_channels=1, **moco_overrides(job.setup))).encoder_q.backbone


def run_job(job: Job, work_root: str) -> dict[str, Any]:
    """Train (if the row trains) and score one job; cached as JSON under ``work_root``."""
    import torch

    torch.set_num_threads(job.setup.threads)
    logging.disable(logging.WARNING)  # the rounds' INFO lines would bury the tables
    signature = json.loads(json.dumps(asdict(job), default=str))
    if not signature["setup"].get("code"):
        signature["setup"].pop("code", None)  # full runs: the keys they were cached under before
    # Keyed by what is trained, not by the row's name: the same configuration in two tables
    # (quality's "fedmoco MoCo" and global_queue_benefit's ceiling) is trained once.
    what = {k: v for k, v in signature.items() if k != "row"}
    key = f"{job.kind}-{job.seed}-" + hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
    work = Path(work_root) / key
    cache = work / "result.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if {k: v for k, v in saved.get("job", {}).items() if k != "row"} == what:
            if job.kind == "federated" and f"emb-std-last{LAST_ROUNDS}" not in saved:
                # cached before the summary had it: read it from the run's own round log
                for log_file in sorted((work / "server").rglob("rounds.jsonl")):
                    saved.update(federation_summary(log_file))
                cache.write_text(json.dumps(saved, indent=1))
            return {**saved, "row": job.row, "read_back": True}
    sig_file = work / "job.json"
    if work.exists() and not (sig_file.exists() and json.loads(sig_file.read_text()) == what):
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    sig_file.write_text(json.dumps(what))
    t0 = time.perf_counter()
    seconds, extra = float("nan"), {}
    root = Path(job.root)
    trained = work / "backbone.pt"  # kept so a failed scoring step does not cost the training
    if trained.exists():
        saved = torch.load(trained, weights_only=False)
        backbone, seconds, extra = saved["backbone"], saved["seconds"], saved["extra"]
    elif job.kind == "raw":
        backbone = None
    elif job.kind == "random":
        backbone = random_backbone(job)
    elif job.kind == "fedmoco":
        backbone, seconds = train_fedmoco(job, work)
    elif job.kind == "lightly":
        backbone, seconds = train_lightly(job, work)
    elif job.kind == "federated":
        backbone, seconds, result = train_federated(job, work)
        extra = federation_summary(result.metrics)
    else:
        raise ValueError(job.kind)
    if job.kind in ("fedmoco", "lightly", "federated") and not trained.exists():
        torch.save({"backbone": backbone, "seconds": seconds, "extra": extra}, trained)
    out = {"row": job.row, "seed": job.seed, **score(backbone, root, job.setup, job.seed),
           "s_per_epoch": seconds, "wall_s": time.perf_counter() - t0, **extra, "job": signature}
    cache.write_text(json.dumps(out, indent=1))
    return out


#: rounds at the end of a federation whose emb-std and global-share the tables average
LAST_ROUNDS = 5


def federation_summary(metrics: Path) -> dict[str, Any]:
    """From rounds.jsonl (when logged): the global-queue size and negatives sent in the last
    round, and the sites' mean emb-std (collapse: towards 0; spread: 1/sqrt(D)) and global
    share of the softmax over the last ``LAST_ROUNDS`` rounds."""
    from fedmoco.metrics import read_jsonl

    rows = [r for r in read_jsonl(metrics) if isinstance(r, dict) and r.get("event", "round") == "round"]
    if not rows:
        return {}
    last = rows[-1]
    out = {k: last[k] for k in ("queue-size", "global-queue-size", "queue-sent", "keys-received") if k in last}
    for key in ("emb-std", "global-share"):
        vals = [float(r[key]) for r in rows[-LAST_ROUNDS:] if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
        if vals:
            out[f"{key}-last{LAST_ROUNDS}"] = statistics.mean(vals)
    return out


def run_jobs(jobs: list[Job], work_root: Path, n_jobs: int) -> list[dict[str, Any]]:
    """Every job, ``n_jobs`` at a time in spawned processes (1: in this process), in order."""
    results: list[dict[str, Any]] = []

    def report(r: dict[str, Any]) -> None:
        print(f"  {r['row']:<44} seed {r['seed']}: kNN {r['knn']:5.1f}%  probe {r['probe']:5.1f}%  "
              f"{r['s_per_epoch']:.1f} s/epoch  ({r['wall_s']:.0f} s)", flush=True)

    if n_jobs <= 1:
        for job in jobs:
            results.append(run_job(job, str(work_root)))
            report(results[-1])
        return results
    with ProcessPoolExecutor(n_jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_job, job, str(work_root)) for job in jobs]
        for f in futures:
            results.append(f.result())
            report(results[-1])
    return results


# -- tables ------------------------------------------------------------------------------

def mean_std(values: list[float]) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def table(results: list[dict[str, Any]], rows: list[str], time_col: str | None = "s/epoch",
          extra: dict[str, tuple[str, str]] | None = None) -> list[str]:
    """Markdown table of kNN and probe (mean ± std over seeds) per row; ``extra`` adds columns
    header -> (result key, format of the mean), "–" where no seed has the key."""
    from common import markdown_table

    extra = extra or {}
    header = (["row", "kNN top-1 (%)", "linear probe top-1 (%)", "seeds"] + ([time_col] if time_col else [])
              + list(extra))
    body = []
    for row in rows:
        rs = [r for r in results if r["row"] == row]
        if not rs:
            continue
        line = [row, mean_std([r["knn"] for r in rs]), mean_std([r["probe"] for r in rs]), len(rs)]
        if time_col:
            line.append(mean_std([r["s_per_epoch"] for r in rs]) if rs[0]["s_per_epoch"] == rs[0]["s_per_epoch"]
                        else "–")
        for key, fmt in extra.values():
            vals = [r[key] for r in rs if r.get(key) is not None]
            line.append(fmt.format(statistics.mean(vals)) if vals else "–")
        body.append(line)
    return markdown_table(header, body) if body else []  # no row measured (--rows): no empty header


def summary(results: list[dict[str, Any]], row: str, key: str) -> float | None:
    vals = [r[key] for r in results if r["row"] == row and r[key] == r[key]]
    return statistics.mean(vals) if vals else None


def task_args(p: argparse.ArgumentParser) -> None:
    """Options shared with global_queue_benefit.py."""
    p.add_argument("--quick", action="store_true", help="smaller task, fewer epochs, 1 seed (the make bench mode)")
    p.add_argument("--seeds", type=int, help="seeds per row (default 3; 1 with --quick)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="run only seeds FIRST..SEEDS-1: spreads one table over several processes or machines "
                        "sharing --work; a later run with the defaults builds the whole table from the cache")
    p.add_argument("--epochs", type=int,
                   help=f"passes over the pool (= rounds when federated); default {Setup.epochs}, 3 quick")
    p.add_argument("--jobs", type=int, default=1, help="configurations run in parallel processes (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per run (default 1)")
    p.add_argument("--norm", default="group", choices=["group", "split-batch", "batch"])
    p.add_argument("--lr", type=float, default=Setup.lr, help=f"for batch 256, scaled linearly (default {Setup.lr})")
    p.add_argument("--crop-scale-min", type=float,
                   help=f"images option crop_scale_min for every row (default {RECIPE['crop_scale_min']})")
    p.add_argument("--pool-per-class", type=int,
                   help=f"pretraining images per class (default {TaskSize().pool}; {QUICK.pool} quick)")
    p.add_argument("--fed-lr", type=float,
                   help="the federated rows' client lr per 256 (default: --lr). FedAvg of N sites' updates moves "
                        "the model about as one step of an N-times larger batch, so the linear scaling rule "
                        "suggests N x --lr (benchmarks/notes/global_queue_benefit.md)")
    p.add_argument("--batch-size", type=int, default=Setup.batch_size)
    p.add_argument("--queue-size", type=int, default=Setup.queue_size, help="K")
    p.add_argument("--work", type=Path, default=Path("/tmp/fedmoco-bench"),
                   help="where the task and per-run results are cached (default /tmp/fedmoco-bench)")
    add_device_arg(p)


def task_setup(args: argparse.Namespace) -> tuple[Path, Setup, int, TaskSize]:
    check_device(args.device)
    size = QUICK if args.quick else TaskSize()
    if args.pool_per_class:
        size = replace(size, pool=args.pool_per_class)
    seeds = args.seeds or (1 if args.quick else 3)
    setup = Setup(epochs=args.epochs or (3 if args.quick else Setup.epochs), norm=args.norm, workers=args.workers,
                  threads=args.threads, device=args.device, lr=args.lr,
                  batch_size=args.batch_size, queue_size=args.queue_size,
                  code=code_fingerprint() if args.quick else "")
    if args.crop_scale_min is not None:
        for recipe in (RECIPE, NO_NUISANCE, FLIP_ON):
            recipe["crop_scale_min"] = args.crop_scale_min
    root = make_task(args.work / f"glyphs-v{VERSION}-{size.pool}-{size.eval_train}-{size.eval_test}", size)
    return root, setup, seeds, size


def code_fingerprint() -> str:
    """sha1 (12 hex digits) of the Python sources a glyph run executes: the engine, the
    federation, the images domain and these benchmark scripts."""
    h = hashlib.sha1()
    files = [p for folder in ("fedmoco", "clients", "server", "domains/images") for p in (ROOT / folder).rglob("*.py")]
    files += [ROOT / "benchmarks" / n for n in ("quality.py", "labelled_task.py", "global_queue_benefit.py")]
    for path in sorted(files):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def seed_range(args: argparse.Namespace, seeds: int) -> range:
    """The seeds this process runs (``--first-seed``)."""
    if not 0 <= args.first_seed < seeds:
        raise SystemExit(f"--first-seed {args.first_seed}: must be in 0..{seeds - 1}")
    return range(args.first_seed, seeds)


def read_back_note(results: list[dict[str, Any]]) -> str:
    """``; N of M runs read back ...`` when some results came from an earlier run's cache (the
    total then covers only what was trained now: a 60-run table read '5 s'), else ``""``."""
    n = sum(bool(r.get("read_back")) for r in results)
    return (f"; {n} of {len(results)} runs read back from earlier runs' results (--work), not trained now"
            if n else "")


def fresh_folder(folder: Path) -> Path:
    """``folder``, emptied: the timing pair must be trained (and timed) again on every run. Its
    results were read back from the last run's cache, so every full suite after the first
    re-reported old timings, whatever the code now did (found by an audit)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    task_args(p)
    p.add_argument("--rows", help=f"comma-separated row ids to run (default: all): {', '.join(ROW_IDS)}")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.md")
    p.add_argument("--timing-work", type=Path, metavar="DIR",
                   help="also time fedmoco's and lightly's first seed side by side, the only two jobs running, "
                        "cached under DIR (the table's s/epoch comes from whatever else shared the cores)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    root, setup, seeds, size = task_setup(args)

    fed_setup = replace(setup, lr=args.fed_lr) if args.fed_lr else setup

    def jobs_for(row: str, kind: str, **kw) -> list[Job]:
        return [Job(row=row, kind=kind, seed=s, root=str(root), setup=fed_setup if kind == "federated" else setup,
                    **kw) for s in seed_range(args, seeds)]

    main_rows = {
        "raw pixels": jobs_for("raw pixels", "raw")[:1],  # deterministic: one seed says it all
        "random init": jobs_for("random init", "random"),
        "lightly MoCo": jobs_for("lightly MoCo", "lightly"),
        "fedmoco MoCo": jobs_for("fedmoco MoCo", "fedmoco"),
        "fedmoco federated, IID, 4 sites": jobs_for("fedmoco federated, IID, 4 sites", "federated", split="iid"),
        "fedmoco federated, Dirichlet 0.5, 4 sites": jobs_for("fedmoco federated, Dirichlet 0.5, 4 sites",
                                                              "federated", split="dirichlet"),
    }
    recipe_rows = {
        "fedmoco MoCo, no offset/ramp/noise": jobs_for("fedmoco MoCo, no offset/ramp/noise", "fedmoco",
                                                       options=dict(NO_NUISANCE)),
        "fedmoco MoCo, flip on (images default)": jobs_for("fedmoco MoCo, flip on (images default)", "fedmoco",
                                                           options=dict(FLIP_ON)),
    }
    wanted = set(args.rows.split(",")) if args.rows else None
    unknown = (wanted or set()) - set(ROW_IDS)
    if unknown:
        p.error(f"--rows: unknown row id(s) {sorted(unknown)}; choose from {', '.join(ROW_IDS)}")
    chosen = {k: v for k, v in {**main_rows, **recipe_rows}.items()
              if wanted is None or ROW_IDS_BY_NAME[k] in wanted}
    # Slowest first, so parallel workers finish together.
    order = sorted((j for js in chosen.values() for j in js),
                   key=lambda j: {"federated": 0, "lightly": 1, "fedmoco": 1}.get(j.kind, 2))
    results = run_jobs(order, args.work / "runs" / ("quick" if args.quick else "full"), args.jobs)
    pair: list[dict[str, Any]] = []
    if args.timing_work:
        load_before = "load average %.1f / %.1f (1 / 5 min) on %d CPUs" % (*os.getloadavg()[:2], os.cpu_count() or 0)
        pair = run_jobs([jobs_for("fedmoco MoCo", "fedmoco")[0], jobs_for("lightly MoCo", "lightly")[0]],
                        fresh_folder(args.timing_work / "runs" / ("quick" if args.quick else "full")), 2)

    cmd = "python benchmarks/quality.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    fed, lig = summary(results, "fedmoco MoCo", "knn"), summary(results, "lightly MoCo", "knn")
    fed_t, lig_t = summary(results, "fedmoco MoCo", "s_per_epoch"), summary(results, "lightly MoCo", "s_per_epoch")
    lines = [
        "# Quality at equal budget: fedmoco vs lightly, centralized vs federated (glyphs task)",
        "",
        f"Command: `{cmd}`",
        "",
        machine_line(setup.device) + f"; {args.jobs} job(s) in parallel, {setup.threads} torch thread(s) and "
        f"{setup.workers} loader worker(s) each; total {time.perf_counter() - start:.0f} s" + read_back_note(results),
        "",
        f"- Task: benchmarks/labelled_task.py, 8 glyph classes, 32 px grayscale; pool {size.pool * 8} unlabelled "
        f"images, kNN/probe fitted on {size.eval_train * 8} and scored on {size.eval_test * 8} held-out images.",
        f"- Budget: {setup.epochs} passes over the pool (federated: {setup.epochs} rounds x 1 local epoch"
        + (f", client lr {fed_setup.scaled_lr:g}" if fed_setup is not setup else "") + "), "
        f"batch {setup.batch_size}, K = {setup.queue_size}, m = {setup.momentum}, T = {setup.temperature}, "
        f"SGD lr {setup.scaled_lr:g} (cosine, no warm-up), weight decay {setup.weight_decay}, tiny CNN with "
        f"{setup.norm} norm, MLP head {setup.hidden_dim} -> {setup.dim}; seeds {args.first_seed}..{seeds - 1} (mean ± std).",
        f"- Evaluation: weighted kNN (k = {setup.knn_k}, T = 0.1) and a linear probe ({setup.probe_epochs} epochs) "
        "on frozen backbone features. Chance is 12.5%.",
        "- s/epoch: wall time of one pass over the pool including loader start; federated rows: one round's "
        "local training summed over the 4 sites (run one after another in one process).",
        "",
        *table(results, list(main_rows)),
        "",
    ]
    if any(r["row"] in recipe_rows for r in results):
        lines += ["## Views: the shortcut-resistant recipe and the flip option", "",
                  *table(results, ["fedmoco MoCo", *recipe_rows], time_col=None), ""]
    pair_t = {r["row"]: r["s_per_epoch"] for r in pair}
    if pair:
        lines += ["## Wall time per epoch, timed side by side", "",
                  f"`--timing-work {args.timing_work}`: seed {pair[0]['seed']} of fedmoco's and lightly's MoCo trained "
                  "again in two processes started together, one core each, nothing else of this benchmark running "
                  f"({load_before} when they started).", "",
                  *table(pair, ["fedmoco MoCo", "lightly MoCo"]), "",
                  f"fedmoco / lightly: {pair_t['fedmoco MoCo'] / pair_t['lightly MoCo']:.2f}x.", ""]
    write_report(args.out, lines)
    emit_json({"bench": "quality", "quick": bool(args.quick), "seeds": seeds, "epochs": setup.epochs,
               **{f"{k}_knn": summary(results, row, "knn") for k, row in (
                   ("raw", "raw pixels"), ("random", "random init"), ("lightly", "lightly MoCo"),
                   ("fedmoco", "fedmoco MoCo"), ("fed_iid", "fedmoco federated, IID, 4 sites"),
                   ("fed_dirichlet", "fedmoco federated, Dirichlet 0.5, 4 sites"),
                   ("no_nuisance", "fedmoco MoCo, no offset/ramp/noise"),
                   ("flip_on", "fedmoco MoCo, flip on (images default)"))},
               "fedmoco_probe": summary(results, "fedmoco MoCo", "probe"),
               "lightly_probe": summary(results, "lightly MoCo", "probe"),
               "fedmoco_minus_lightly_knn": None if fed is None or lig is None else fed - lig,
               "fedmoco_s_per_epoch": fed_t, "lightly_s_per_epoch": lig_t,
               "pair_fedmoco_s_per_epoch": pair_t.get("fedmoco MoCo"),
               "pair_lightly_s_per_epoch": pair_t.get("lightly MoCo")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
