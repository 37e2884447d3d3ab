"""Centralized pretraining: data + model + Trainer + an atomic checkpoint every epoch."""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmoco.atomic import atomic_write_json, remove_stale_temps
from fedmoco.checkpoint import (ARCHITECTURE_FIELDS, FORMAT, VERSION, atomic_save, check_compatible, load_checkpoint,
                                rng_state, set_rng_state)
from fedmoco.config import PRESET_FIELDS, MoCoConfig, TrainConfig
from fedmoco.data import DataConfig, Normalization, build_pretrain_data, format_skipped
from fedmoco.errors import CheckpointError, ConfigError
from fedmoco.metrics import JsonlLogger, keep_records, read_jsonl
from fedmoco.moco import MoCo
from fedmoco.train import Trainer, make_loader

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class PretrainResult:
    checkpoint: Path
    metrics: Path
    epochs_done: int
    final_loss: float
    skipped_scan: int
    skipped_load: int
    resumed_from: int = 0  # epochs done before this call
    already_done: bool = False  # a resumed run that had nothing left to train


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_checkpoint(model: MoCo, *, data: dict[str, Any], train_cfg: TrainConfig | None = None,
                    trainer: Trainer | None = None, epoch: int = 0, extra: dict[str, Any] | None = None) -> dict:
    """The checkpoint dictionary shared by pretraining and the federation server.

    ``data`` holds ``domain``, ``image_size``, ``options`` and ``normalization`` (a dict),
    everything fine-tuning needs to feed the encoder what it was trained on.
    """
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "moco_config": model.cfg.to_dict(),
        "data": data,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": epoch,
        "rng": rng_state(),
    }
    if train_cfg is not None:
        ckpt["train_config"] = train_cfg.to_dict()
    if trainer is not None:
        ckpt["trainer"] = trainer.state_dict()
    if extra:
        ckpt.update(extra)
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: Path | str = "checkpoint") -> MoCo:
    """Rebuild the MoCo model stored in ``ckpt`` (CPU)."""
    try:
        model = MoCo(MoCoConfig.from_dict(ckpt["moco_config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, ConfigError, TypeError, ValueError, AttributeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: model does not load ({first})") from None
    # NaN weights (a diverged or damaged run) gave knn and linear-probe a scikit-learn traceback
    # and finetune a "lower --lr" hint about its own loss (found by an audit).
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf values (first: {bad[0]}); "
                              "the run that wrote it diverged or the file was damaged")
    return model


LOCK_FILE = ".pretrain.lock"


def _lock_out(out: Path):
    """An exclusive lock on ``out`` for this run (the open lock file; released when it is closed
    or the process ends, however it ends). Two runs started together into one --out both passed
    the "checkpoint exists" check and interleaved their logs and checkpoints."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ConfigError(f"{out}: another fedmoco pretrain is writing there; wait for it, or choose another --out") \
            from None
    return fh


def pretrain(domain: str, data_dir: Path | str, out_dir: Path | str, *, moco_overrides: dict[str, Any],
             train_cfg: TrainConfig, data_cfg: DataConfig, moco_version: str = "v2",
             device: torch.device, resume: bool = False, progress: bool = True,
             explicit: frozenset[str] | None = None) -> PretrainResult:
    """:func:`_pretrain` while holding the lock on ``out_dir`` (:func:`_lock_out`), released when
    it returns or raises: a kept traceback (a notebook's failed call) must not hold it."""
    out = Path(out_dir)
    created = not out.exists()
    lock = _lock_out(out)
    try:
        return _pretrain(domain, data_dir, out_dir, moco_overrides=moco_overrides, train_cfg=train_cfg,
                         data_cfg=data_cfg, moco_version=moco_version, device=device, resume=resume,
                         progress=progress, explicit=explicit)
    except BaseException:
        # A run refused before it wrote anything (a missing data folder, an empty one) leaves no
        # folder behind: a new --out held only the lock file, and looked like a run.
        if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            (out / LOCK_FILE).unlink(missing_ok=True)
            out.rmdir()
        raise
    finally:
        lock.close()


def _pretrain(domain: str, data_dir: Path | str, out_dir: Path | str, *, moco_overrides: dict[str, Any],
              train_cfg: TrainConfig, data_cfg: DataConfig, moco_version: str, device: torch.device,
              resume: bool, progress: bool, explicit: frozenset[str] | None) -> PretrainResult:
    """Train MoCo on ``data_dir`` and checkpoint into ``out_dir`` after every epoch.

    ``moco_overrides`` holds only the options the user set; with ``resume`` the rest come
    from the checkpoint, and a set option that contradicts it raises CheckpointError.
    ``explicit`` names the settings the user gave (``domain``, ``image_size`` and
    TrainConfig fields; None: all of them): on resume the others come from the checkpoint
    (see :func:`resumed_settings`). A resumed run whose epochs are all done trains nothing
    and returns with ``already_done`` set.
    """
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    saved = None
    if resume:
        if not ckpt_path.exists() and out.is_dir():  # stopped in its first epoch: nothing to resume
            raise CheckpointError(f"{ckpt_path}: no epoch of the run in {out} has finished, so there is nothing "
                                  "to resume; run the same command without --resume")
        saved = load_checkpoint(ckpt_path)
        missing = [k for k in ("epoch", "train_config", "trainer", "rng") if k not in saved]
        if missing or not isinstance(saved["train_config"].get("epochs"), int):
            raise CheckpointError(f"{ckpt_path}: holds no pretraining state to resume "
                                  f"({', '.join(missing) or 'train_config epochs'} missing): --resume continues "
                                  "a run of fedmoco pretrain")
        named = moco_version if explicit is not None and "moco" in explicit else None  # a preset the user gave
        domain, train_cfg, data_cfg = resumed_settings(saved, ckpt_path, domain, train_cfg, data_cfg, explicit,
                                                       moco_overrides, named)
        check_compatible(ckpt_path, saved["moco_config"], {**saved["moco_config"], **moco_overrides})
        if int(saved["epoch"]) >= train_cfg.epochs:
            return PretrainResult(checkpoint=ckpt_path, metrics=out / METRICS, epochs_done=int(saved["epoch"]),
                                  final_loss=_last_epoch_loss(out / METRICS), skipped_scan=0, skipped_load=0,
                                  already_done=True)
    elif ckpt_path.exists():
        raise ConfigError(f"{ckpt_path}: a checkpoint already exists; pass --resume to continue it "
                          "or choose another --out")
    if train_cfg.warmup_epochs > train_cfg.epochs:
        raise ConfigError(f"--warmup-epochs {train_cfg.warmup_epochs:g} is longer than the run (--epochs "
                          f"{train_cfg.epochs}): the learning rate would never reach --lr")

    data = build_pretrain_data(domain, data_dir, data_cfg)
    if saved is not None:
        moco_cfg = MoCoConfig.from_dict({**saved["moco_config"], **moco_overrides})
        check_compatible(ckpt_path, saved["moco_config"], {**moco_cfg.to_dict(), "in_channels": data.in_channels})
        moco_cfg.in_channels = data.in_channels
    else:
        small = moco_overrides.pop("small_input", None)
        if small is None:
            small = data_cfg.image_size <= 64
        moco_cfg = MoCoConfig.preset(moco_version, **moco_overrides, small_input=small, in_channels=data.in_channels)
    if data.skipped:
        log.warning("%s", format_skipped(data.skipped))
    log.info("data: %s", data.description or f"{len(data.dataset)} samples")
    before = saved["data"].get("samples") if saved is not None else None
    if before is not None and before != len(data.dataset):
        log.warning("%s now gives %d samples, %d when the run began: the run goes on with the data as it is now "
                    "and its own normalisation", data_dir, len(data.dataset), before)

    seed_everything(train_cfg.seed)
    model = MoCo(moco_cfg)
    steps_per_epoch = len(make_loader(data.dataset, train_cfg, device))
    if train_cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, train_cfg.max_steps_per_epoch)
    logger = JsonlLogger(out / METRICS)
    trainer = Trainer(model, train_cfg, device, total_steps=steps_per_epoch * train_cfg.epochs,
                      steps_per_epoch=steps_per_epoch, logger=logger, progress=progress)
    start_epoch = 0
    if saved is not None:
        replan = train_cfg.epochs != int(saved["train_config"]["epochs"])
        try:  # a checkpoint edited or written by another tool: one line, not a traceback
            model.load_state_dict(saved["model"])
            _load_trainer(trainer, saved["trainer"], replan=replan)
            set_rng_state(saved["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            first = (str(exc).splitlines() or [""])[0][:200]
            raise CheckpointError(f"{ckpt_path}: its training state does not load ({type(exc).__name__}: "
                                  f"{first})") from None
        start_epoch = int(saved["epoch"])
        if replan:
            log.info("extending the run from %d to %d epochs: the cosine schedule is re-planned over %d steps",
                     saved["train_config"]["epochs"], train_cfg.epochs, trainer.total_steps)
        log.info("resumed %s at epoch %d (step %d, queue %d keys)", ckpt_path, start_epoch,
                 trainer.global_step, len(model.queue))
    # A fresh run (global step 0) starts its log afresh: an earlier attempt stopped before
    # its first checkpoint must not leave its steps in front of this run's.
    _truncate_metrics(out / METRICS, trainer.global_step)
    remove_stale_temps(ckpt_path)
    out.mkdir(parents=True, exist_ok=True)
    data_meta = {"domain": domain, "image_size": data_cfg.image_size, "options": dict(data_cfg.options),
                 "normalization": data.normalization.to_dict(), "samples": len(data.dataset)}
    atomic_write_json(out / "config.json", {"moco": moco_cfg.to_dict(), "train": train_cfg.to_dict(), "data": data_meta})

    summary = None
    skipped_load = 0
    # One loader for all epochs: its workers persist, and Trainer.train_epoch reshuffles it
    # with the epoch's seed (fedmoco.train.EpochShuffle), so a resumed epoch keeps its order.
    loader = make_loader(data.dataset, train_cfg, device, seed=train_cfg.seed)
    for epoch in range(start_epoch, train_cfg.epochs):
        summary = trainer.train_epoch(loader, epoch=epoch, desc=f"epoch {epoch + 1}/{train_cfg.epochs}")
        skipped_load += summary.skipped
        if summary.steps == 0:  # saved anyway, it was an untrained encoder under a run's name, exit 0
            raise ConfigError(f"{data_dir}: epoch {epoch + 1} had no batch of 2 or more readable images "
                              f"({len(data.dataset)} samples, {summary.skipped} unreadable): a MoCo step "
                              "contrasts at least 2 images, so nothing was trained")
        logger.log({"event": "epoch", "epoch": epoch, "step_end": trainer.global_step, **summary.to_dict()})
        atomic_save(make_checkpoint(model, data=data_meta, train_cfg=train_cfg, trainer=trainer,
                                    epoch=epoch + 1), ckpt_path)
        log.info("epoch %d/%d: loss %.4f, pos %.3f, neg %.3f, emb std %.4f, %d images in %.1fs%s",
                 epoch + 1, train_cfg.epochs, summary.loss, summary.pos_mean, summary.neg_mean,
                 summary.emb_std, summary.images, summary.seconds,
                 f", {summary.skipped} unreadable samples skipped" if summary.skipped else "")
    return PretrainResult(
        checkpoint=ckpt_path,
        metrics=out / METRICS,
        epochs_done=train_cfg.epochs,
        final_loss=summary.loss if summary else float("nan"),
        skipped_scan=sum(data.skipped.values()),
        skipped_load=skipped_load,
        resumed_from=start_epoch,
    )


#: TrainConfig fields that say how a run executes, not what it computes: a resumed run
#: takes them from the command line, whatever the checkpoint says (``batch_augment`` makes
#: the same views per batch instead of per sample, fedmoco.gpu_augment).
RUNTIME_FIELDS = frozenset({"num_workers", "amp", "channels_last", "log_every", "extra", "batch_augment",
                            "pin_threads"})


def resumed_settings(saved: dict[str, Any], path: Path, domain: str, train_cfg: TrainConfig,
                     data_cfg: DataConfig, explicit: frozenset[str] | None,
                     moco_overrides: dict[str, Any] | None = None,
                     moco_version: str | None = None) -> tuple[str, TrainConfig, DataConfig]:
    """The (domain, TrainConfig, DataConfig) of a resumed run.

    Settings the user did not give come from the checkpoint. ``epochs`` may grow (never
    below the epochs already done); runtime fields (:data:`RUNTIME_FIELDS`) follow the
    request; any other given setting that differs from the checkpoint is a CheckpointError
    naming each conflict, since the run's schedule and data were planned with it. So is a
    given MoCo option (``moco_overrides``; the architecture's are :func:`check_compatible`'s)
    or preset (``moco_version``, when the user named one) that differs from the run's: a
    temperature changed mid-run was applied silently, a preset ignored silently.
    """
    given = (lambda name: True) if explicit is None else (lambda name: name in explicit)
    s_data, s_train = saved["data"], TrainConfig.from_dict(saved["train_config"])
    conflicts = _moco_conflicts(saved.get("moco_config", {}), moco_overrides or {}, moco_version)
    if given("domain") and domain != s_data["domain"]:
        conflicts.append(f"--domain {domain} (the run's: {s_data['domain']})")
    if given("image_size") and data_cfg.image_size != s_data["image_size"]:
        conflicts.append(f"--image-size {data_cfg.image_size} (the run's: {s_data['image_size']})")
    merged: dict[str, Any] = {}
    for name, old in s_train.to_dict().items():
        new = getattr(train_cfg, name)
        if name in RUNTIME_FIELDS or (name == "epochs" and given(name)):
            merged[name] = new
        else:
            if given(name) and new != old:
                conflicts.append(f"--{name.replace('_', '-')} {new} (the run's: {old})")
            merged[name] = old
    if conflicts:
        raise CheckpointError(f"{path}: a resumed run keeps its settings; conflicting: {'; '.join(conflicts)}. "
                              "Drop these options, or choose another --out for a new run")
    done = int(saved["epoch"])
    if merged["epochs"] < done:
        raise ConfigError(f"--epochs {merged['epochs']}: the run in {path.parent} has already done {done} epochs")
    train = TrainConfig.from_dict(merged)
    # replace(): --no-cache, the cache folder and -q of this invocation still apply on resume.
    # The run keeps its normalisation: estimated again from a folder that changed since, it
    # moved a satellite run's inputs mid-run (and the checkpoint then named only the new one).
    norm = s_data.get("normalization")
    data = replace(data_cfg, image_size=s_data["image_size"], seed=train.seed,
                   options={**s_data.get("options", {}), **data_cfg.options},
                   normalization=Normalization.from_dict(norm) if norm else data_cfg.normalization)
    return s_data["domain"], train, data


def _moco_conflicts(saved: dict[str, Any], overrides: dict[str, Any], version: str | None) -> list[str]:
    """The given MoCo options and preset that differ from the run's config ``saved``, as
    ``--flag value (the run's: old)``; architecture fields are left to check_compatible."""
    out = [f"--{name.replace('_', '-')} {new} (the run's: {saved.get(name)})"
           for name, new in overrides.items() if name not in ARCHITECTURE_FIELDS and saved.get(name) != new]
    if version is not None:
        preset = MoCoConfig.preset(version, **overrides).to_dict()
        differ = [k for k in PRESET_FIELDS if k not in overrides and preset[k] != saved.get(k)]
        if differ:
            out.append(f"--moco {version} ({', '.join(f'{k} {preset[k]!r}' for k in differ)}; the run's: "
                       f"{', '.join(f'{k} {saved.get(k)!r}' for k in differ)})")
    return out


def _load_trainer(trainer: Trainer, state: dict[str, Any], *, replan: bool) -> None:
    """Restore optimizer, scaler and step; the LR schedule too unless ``replan``.

    A run extended on resume re-plans its cosine decay over the new length: the fresh
    scheduler is stepped to the saved step, so the LR is what an uninterrupted run of the
    new length would use from here on (the saved scheduler would end at the old length).
    """
    if not replan:
        trainer.load_state_dict(state)
        return
    step = int(state["global_step"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        for _ in range(step):
            trainer.scheduler.step()
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    trainer.load_optimizer_state(state["optimizer"])  # momentum buffers, but the re-planned LR
    for group, lr in zip(trainer.optimizer.param_groups, lrs):
        group["lr"] = lr
    trainer.load_scaler_state(state["scaler"])
    trainer.global_step = step


def _last_epoch_loss(metrics: Path) -> float:
    """Loss of the last epoch record in ``metrics`` (NaN when there is none)."""
    if not metrics.exists():
        return float("nan")
    losses = [r["loss"] for r in read_jsonl(metrics) if r.get("event") == "epoch" and "loss" in r]
    return float(losses[-1]) if losses else float("nan")


def _truncate_metrics(path: Path, global_step: int) -> None:
    """Drop records logged after the checkpoint, so a resumed run does not log steps twice.

    Step records carry ``step``; epoch records carry ``step_end``, the step count after them.
    """
    keep_records(path, lambda r: r.get("step", r.get("step_end", 0) - 1) < global_step)
