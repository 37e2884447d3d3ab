"""The evaluation commands of ``fedmoco``: finetune, knn and linear-probe.

cli.py registers the parsers and dispatches here; everything they share (checkpoint, input
pipeline recorded at pretraining, label table, grouped splits, random-init baseline) lives here.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# numpy and torch are imported in the commands: this module also builds the finetune parser,
# and `fedmoco --help` should not wait for torch.
from fedmoco.errors import CheckpointError, ConfigError, DataError, NoUsableData, TrainingDiverged

log = logging.getLogger("fedmoco")


def add_finetune_parser(sub, add_eval) -> argparse.ArgumentParser:
    """``fedmoco finetune``: the options of linear-probe plus the fine-tuning protocol's."""
    p = add_eval(sub, "finetune", "fine-tune a checkpoint's encoder end to end on labelled data, vs random init")
    p.set_defaults(batch_size=32)
    for action in p._actions:  # the shared options' help, where finetune's defaults differ
        if action.dest == "out":
            action.help = "where results, model and plots go (default: CHECKPOINT_DIR/finetune)"
        elif action.dest == "batch_size":
            action.help = "default 32"
    p.add_argument("--epochs", type=int, default=20, help="maximum epochs per run (default 20)")
    p.add_argument("--label-fraction", type=float, nargs="+", default=[1.0], metavar="F",
                   help="share(s) of the labelled training pool to train on, e.g. 0.01 0.1 1.0 (default 1.0)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and fraction (default 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the head (default 1e-3)")
    p.add_argument("--backbone-lr-mult", type=float, default=0.1, help="backbone LR = lr x this (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-frozen-epochs", type=int, default=1, help="first epochs train the head only (default 1)")
    p.add_argument("--class-weighting", choices=["balanced", "none"], default="balanced")
    p.add_argument("--patience", type=int, default=5, help="early stopping on validation AUROC (default 5)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="grouped validation share (default 0.2)")
    p.add_argument("--split-seed", type=int, help="seed of the test/validation splits (default: --seed)")
    p.add_argument("--multi-label", action="store_true", help="labels CSV columns are independent 0/1 labels")
    p.add_argument("--operating-point", default="youden", help="youden | specificity=0.9 (chosen on validation)")
    p.add_argument("--positive-class", help="binary tasks: the class whose sensitivity is reported (default: "
                                            "the class that is not normal/negative/healthy/..., else the second "
                                            "in sorted order)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: none)")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    return p


@dataclass
class EvalInputs:
    ckpt: dict[str, Any]
    model: Any
    data: Any
    test: Any | None
    domain: str
    data_meta: dict[str, Any]


def load_inputs(args: argparse.Namespace, *, multi_label: bool = False) -> EvalInputs:
    """Checkpoint, its recorded input pipeline, and the labelled --data (and --test) sets."""
    from fedmoco.checkpoint import load_checkpoint
    from fedmoco.cli import parse_options
    from fedmoco.data import DataConfig, Normalization, recorded_pipeline
    from fedmoco.labels import build_labelled_set, check_classes, check_disjoint, load_label_table
    from fedmoco.pretrain import model_from_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint)
    meta = ckpt["data"]
    domain, options, norm = recorded_pipeline(meta, args.domain, parse_options(args.data_option),
                                              model.cfg.in_channels, args.checkpoint)
    cfg = DataConfig(image_size=meta["image_size"], seed=getattr(args, "split_seed", args.seed), options=options)
    columns = getattr(args, "label_column", None)

    def load(root: Path, labels: Path | None, norm: Normalization | None):
        table = load_label_table(root, labels, domain, multi_label=multi_label, label_columns=columns)
        try:
            data = build_labelled_set(domain, root, table, cfg, norm)
        except DataError as exc:
            if args.domain is None and isinstance(exc, NoUsableData):  # nothing read: perhaps another kind of data
                raise DataError(f"{exc} (read as {domain} data, the checkpoint's domain; --domain reads it as "
                                "another)") from None
            raise
        if data.in_channels != model.cfg.in_channels:
            hint = ("; select the encoder's bands with --data-option bands=... (1-based indices or names, "
                    "docs/satellite.md)" if domain == "satellite" else "")
            raise CheckpointError(f"{args.checkpoint}: the encoder was trained on {meta['domain']} data with "
                                  f"{model.cfg.in_channels} channel(s) but {root} read as {domain} gives "
                                  f"{data.in_channels}{hint}")
        return data

    if args.test_labels and not args.test:
        raise ConfigError(f"--test-labels {args.test_labels}: labels for a test folder, but no --test was given")
    data = load(args.data, args.labels, norm)
    check_classes(data, args.data)
    test = None
    if args.test:
        # The statistics of --data, estimated there when the checkpoint has none: the test set
        # goes through the pipeline that model.pt records, and its own statistics stay out of
        # its score.
        test = load(args.test, args.test_labels, data.normalization)
        if test.names != data.names:
            _align_test_classes(test, data, args)
        check_disjoint(data, test, args.data, args.test)
    data_meta = {"domain": domain, "image_size": cfg.image_size, "options": options,
                 "normalization": data.normalization.to_dict()}
    return EvalInputs(ckpt, model, data, test, domain, data_meta)


def _writable_folder(out: Path) -> None:
    """Create ``out`` (and its parents) or raise ConfigError saying why it cannot hold results."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot be a results folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: this user cannot write there")


def cmd_finetune(args: argparse.Namespace) -> int:
    from fedmoco.device import select_device
    from fedmoco.finetune import (FinetuneConfig, ProtocolConfig, config_dict, make_split, prepare_samples,
                                  run_protocol, save_finetuned, write_report)

    if args.split_seed is None:
        args.split_seed = args.seed
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         backbone_lr_mult=args.backbone_lr_mult, weight_decay=args.weight_decay,
                         warmup_frozen_epochs=args.warmup_frozen_epochs, class_weighting=args.class_weighting,
                         patience=args.patience, workers=args.workers, amp=not args.no_amp)
    protocol = ProtocolConfig(label_fractions=args.label_fraction, seeds=args.seeds, test_fraction=args.test_fraction,
                              val_fraction=args.val_fraction, split_seed=args.split_seed,
                              operating_point=args.operating_point, bootstrap=args.bootstrap)
    device = select_device(args.device)
    inputs = load_inputs(args, multi_label=args.multi_label)
    out = args.out or args.checkpoint.parent / "finetune"
    _writable_folder(out)  # before hours of training, not after (and after the checkpoint loaded)
    data = inputs.data
    if args.positive_class is not None:
        if data.multi_label or args.positive_class not in data.names or len(data.names) != 2:
            raise ConfigError(f"--positive-class {args.positive_class!r}: not one of the two classes {data.names}")
        protocol.positive = data.names.index(args.positive_class)
    elif len(data.names) == 2 and not data.multi_label:
        protocol.positive = default_positive(data.names)
        log.info("positive class: %s (set --positive-class to choose)", data.names[protocol.positive])
    progress = not args.quiet
    samples = prepare_samples(data, workers=args.workers, progress=progress)
    test_samples = prepare_samples(inputs.test, workers=args.workers, progress=progress) if inputs.test else None
    split = make_split(samples, protocol, test_samples)
    log.info("device: %s; %d labelled samples: %d training pool, %d validation, %d test (grouped by %s)",
             device, len(samples.targets), len(split.train), len(split.val),
             len(test_samples.targets) if test_samples else len(split.test), data.group_source)
    result = run_protocol(inputs.model.encoder_q.backbone, inputs.ckpt["moco_config"], data, samples, split,
                          test_samples=test_samples, cfg=cfg, protocol=protocol, device=device, progress=progress)
    extra = {"checkpoint": str(args.checkpoint), "domain": inputs.domain,
             "positive_class": data.names[protocol.positive] if protocol.positive is not None else None,
             "split": {"grouped_by": data.group_source, "n_pool": int(len(split.train)), "n_val": int(len(split.val)),
                       "n_test": int(len(test_samples.targets) if test_samples else len(split.test)),
                       "unlabelled_samples_left_out": data.unlabelled_files,
                       "skipped_unreadable": samples.skipped + (test_samples.skipped if test_samples else 0),
                       "skipped_files": _skipped_files(inputs)},
             "config": config_dict(cfg, protocol), "device": str(device)}
    result["warnings"] = [*result["warnings"], *_skip_notes(inputs, args)]
    # An earlier run's model.pt must not sit beside this run's results.json if the run stops
    # between the two writes: it goes first (a stop then leaves results without a model).
    (out / "model.pt").unlink(missing_ok=True)
    report = write_report(out, result, data, protocol, extra)
    model_path = save_finetuned(out / "model.pt", result["models"]["pretrained"], names=data.names,
                                multi_label=data.multi_label, thresholds=report["thresholds"],
                                moco_config=inputs.ckpt["moco_config"], data_meta=inputs.data_meta)
    _print_summary(report, data.names)
    for w in report["warnings"]:
        print(f"warning:    {w}")
    print(f"results:    {out / 'results.json'}\nmodel:      {model_path}")
    print("plots:      " + ", ".join(report["plots"].values()))
    return 0


def _align_test_classes(test: Any, data: Any, args: argparse.Namespace) -> None:
    """Number a --test set's classes as --data's. A test set may lack some of the training
    classes (their metrics are then null, as for a split that lacks a class); a class the
    training data does not have cannot be predicted, and is refused with its name."""
    source = args.test_labels or f"{args.test} (class folders)"
    unknown = [n for n in test.names if n not in data.names]
    if test.multi_label or unknown:
        hint = ("; --data is labelled by --labels but --test by its sub-folders: give --test-labels"
                if args.labels and not args.test_labels else "")
        listed = unknown[:5] + (["..."] if len(unknown) > 5 else [])
        what = (f"{len(unknown)} class(es) {listed} are not among {args.data}'s classes"
                if unknown and not test.multi_label else f"labels {test.names} differ from {args.data}'s")
        shown = data.names if len(data.names) <= 8 else [*data.names[:8], f"... ({len(data.names)} in all)"]
        raise DataError(f"{source}: {what} {shown}{hint}")
    import numpy as np

    missing = [n for n in data.names if n not in test.names]
    log.warning("%s: no test sample of class(es) %s; their per-class metrics are null", source, missing)
    index = np.asarray([data.names.index(n) for n in test.names], dtype=np.int64)
    test.targets, test.names = index[test.targets], list(data.names)


def _skip_notes(inputs: EvalInputs, args: argparse.Namespace) -> list[str]:
    """Report lines for the files of --data and --test that could not be read."""
    from fedmoco.labels import skipped_note

    pairs = [(inputs.data, args.data), *([(inputs.test, args.test)] if inputs.test is not None else [])]
    return [note for data, root in pairs if (note := skipped_note(data, root))]


def _skipped_files(inputs: EvalInputs) -> dict[str, int]:
    """Files not read under --data and --test together, by reason."""
    both = inputs.data.skipped_files + (inputs.test.skipped_files if inputs.test is not None else Counter())
    return dict(both)


# Class names that mean "no finding": in a binary task the other class is the positive one.
NEGATIVE_NAMES = {"normal", "negative", "healthy", "benign", "control", "absent", "none", "no", "false", "0",
                  "no_finding", "no finding", "nofinding", "background", "other"}


def default_positive(names: list[str]) -> int:
    """Index of the positive class of a binary task: the class that is not a "no finding"
    name (normal, negative, healthy, ...) when exactly one is; else the second in sorted order."""
    negative = [n.strip().lower().replace("-", "_") in NEGATIVE_NAMES for n in names]
    if sum(negative) == 1:
        return negative.index(False)
    return 1


def _fmt(report: dict[str, Any], key: str, signed: bool = False) -> str:
    v = report.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{key} n/a"
    f = "+.3f" if signed else ".3f"
    ci = report.get("ci95", {}).get(key)
    ci_txt = f" [{ci[0]:{f}}, {ci[1]:{f}}]" if ci and all(c is not None and math.isfinite(c) for c in ci) else ""
    return f"{key} {v:{f}}{ci_txt}"


def _print_summary(report: dict[str, Any], names: list[str]) -> None:
    if report["multi_label"] or len(names) <= 2:
        keys = ["auroc", "sensitivity", "specificity", "accuracy"]
    else:  # one-vs-rest sensitivity at thresholds beside arg-max accuracy misleads: arg-max measures
        keys = ["auroc", "accuracy", "balanced_accuracy", "macro_f1", "kappa"]
    keys += ["top5"] if "top5" in report else []
    frac = report["label_fraction"]
    for label, r in (("pretrained ", report), ("random init", report["random_init"])):
        print(f"finetune {label}: " + ", ".join(_fmt(r, k) for k in keys) +
              f" (label fraction {frac:g}, n_test {r['n_test']}, {len(names)} {'labels' if report['multi_label'] else 'classes'})")
    gain = report.get("gain", {})
    if "auroc" in gain:
        # the paired interval: both encoders scored on the same resampled patients
        p_no = gain.get("p_no_gain", {}).get("auroc")
        print("finetune gain       : " + ", ".join(_fmt(gain, k, signed=True) for k in keys if k in gain)
              + (f" (paired bootstrap; share of draws with no AUROC gain {p_no:.3f})" if p_no is not None and math.isfinite(p_no) else ""))
        from fedmoco.finetune import seeds_ahead

        wins, seeds = seeds_ahead(gain)
        if seeds > 1:
            print(f"finetune gain       : AUROC higher in {wins} of {seeds} seeds ("
                  + ", ".join(f"seed {s} {g['auroc']:+.3f}" for s, g in gain["per_seed"].items()) + ")")


# ------------------------------------------------------------------------------ frozen encoders


def cmd_frozen(args: argparse.Namespace) -> int:
    """``knn`` and ``linear-probe`` on frozen backbone features, pretrained and random init."""
    import numpy as np
    import torch

    from fedmoco.atomic import atomic_write_json
    from fedmoco.device import select_device
    from fedmoco.diagnostics import plot_confusion_png
    from fedmoco.evaluate import ProbeConfig, effective_k, extract_features, frozen_report, knn_predict, linear_probe
    from fedmoco.finetune import check_classes_present, fresh_backbone, prepare_samples
    from fedmoco.splits import grouped_split

    device = select_device(args.device)
    inputs = load_inputs(args)
    data, progress = inputs.data, not args.quiet
    if data.multi_label:
        raise ConfigError(f"{args.labels}: {args.command} takes one label column; use fedmoco finetune for multi-label")
    samples = prepare_samples(data, workers=args.workers, progress=progress)
    test_samples = prepare_samples(inputs.test, workers=args.workers, progress=progress) if inputs.test else None
    if test_samples is None:
        tr, te = grouped_split(samples.targets, samples.groups, args.test_fraction, args.seed)
        if not len(tr) or not len(te):
            raise DataError(f"{args.data}: too few samples to split off a test set; pass --test")
    # a class the classifier never saw cannot be predicted: said here as finetune says it
    seen = tr if test_samples is None else np.arange(len(samples.targets))
    warnings = [w for w in [check_classes_present(samples.targets, seen, data.names, "training", False)] if w]
    warnings += _skip_notes(inputs, args)
    out = args.out or args.checkpoint.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    n_cls = len(data.names)
    results: dict[str, Any] = {}
    for init in ("pretrained", "random_init"):
        backbone = (inputs.model.encoder_q.backbone if init == "pretrained"
                    else fresh_backbone(inputs.ckpt["moco_config"], args.seed))

        def feats(s):
            f, rows, _ = extract_features(backbone, s.dataset, device=device, batch_size=args.batch_size,
                                          num_workers=0, progress=progress)
            lookup = {int(r): i for i, r in enumerate(s.rows)}
            return f, torch.as_tensor(s.targets[[lookup[int(r)] for r in rows]])

        f, y = feats(samples)
        if test_samples is None:
            train_f, train_y, test_f, test_y = f[tr], y[tr], f[te], y[te]
        else:
            (train_f, train_y), (test_f, test_y) = (f, y), feats(test_samples)
        for where, fs in ((args.data, f), (args.test, test_f)):
            if not bool(fs.isfinite().all()):  # finite weights can still overflow on extreme pixel values
                raise DataError(f"{where}: the {init.replace('_', ' ')} encoder gives NaN or inf features for "
                                f"{int((~fs.isfinite().all(1)).sum())} of {len(fs)} images; check their values "
                                "and the checkpoint's normalisation")
        if args.command == "knn":
            k, note = effective_k(args.k, len(train_y))
            if note and init == "pretrained":
                log.warning("%s", note)
            votes = knn_predict(train_f, train_y, test_f, n_cls, k=k, temperature=args.t)
            probs = votes / votes.sum(1, keepdim=True)
            extra = {"k": k, "k_requested": args.k, "t": args.t}
        else:
            cfg = ProbeConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
            clf = linear_probe(train_f, train_y, n_cls, cfg, progress=progress)
            with torch.no_grad():
                probs = clf(test_f).softmax(1)
            if not bool(probs.isfinite().all()):  # scikit-learn's metrics raised a traceback on NaN
                raise TrainingDiverged(f"linear-probe: the classifier on the {init.replace('_', ' ')} features "
                                       f"diverged (NaN or inf outputs) at --lr {args.lr:g}; lower --lr")
            extra = {"epochs": args.epochs, "lr": args.lr}
            if init == "pretrained":
                from fedmoco.checkpoint import atomic_save
                atomic_save({"format": "fedmoco-linear-probe", "version": 1, "classes": data.names,
                             "state_dict": clf.state_dict(), "moco_config": inputs.ckpt["moco_config"],
                             "data": inputs.data_meta}, out / "linear-probe.pt")
        results[init] = {**frozen_report(probs, test_y, n_cls), **extra, "n_train": len(train_y)}
    report = {"method": args.command, **results["pretrained"], "random_init": results["random_init"],
              "classes": data.names, "grouped_by": data.group_source, "checkpoint": str(args.checkpoint),
              "warnings": warnings}
    atomic_write_json(out / f"{args.command}.json", report)
    png = plot_confusion_png(np.asarray(report["confusion"]), data.names, out / f"{args.command}_confusion.png",
                             f"{args.command}: accuracy {report['accuracy']:.3f}")
    for label, r in (("", report), (" random init", report["random_init"])):
        top5 = f"  top-5 {r['top5']:.2%}" if "top5" in r else ""
        multi = (f"  balanced accuracy {r['balanced_accuracy']:.2%}  macro-F1 {r['macro_f1']:.3f}  "
                 f"kappa {r['kappa']:.3f}") if n_cls > 2 else ""
        print(f"{args.command}{label}: top-1 {r['accuracy']:.2%}{top5}  AUROC {r['auroc']:.3f}{multi}  "
              f"({r['n_train']} train / {r['n_test']} test, {n_cls} classes)")
    for w in warnings:
        print(f"warning: {w}")
    print(f"results: {out / (args.command + '.json')}\nconfusion matrix: {png}")
    if args.command == "linear-probe":
        print(f"classifier: {out / 'linear-probe.pt'}")
    return 0
