"""The MoCo training loop, shared by centralized pretraining and the federation's clients.

Kept apart from the data (torchgeo style): a :class:`Trainer` takes any DataLoader of
``(view_q, view_k)`` batches built with :func:`make_loader`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fedmoco.config import TrainConfig
from fedmoco.data import collate_views, one_thread
from fedmoco.encoders import largest_divisor
from fedmoco.errors import TrainingDiverged
from fedmoco.metrics import JsonlLogger
from fedmoco.moco import SCORE_BINS, MoCo, cosine_momentum, score_histogram

log = logging.getLogger(__name__)

# The per-step statistics, in the order the Trainer stacks them.
STAT_NAMES = ("loss", "pos_mean", "neg_mean", "neg_var", "emb_std", "global_share")
# Steps between reads of those statistics on CUDA (see Trainer.read_every).
READ_EVERY_CUDA = 16


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``seed + epoch``: :meth:`set_epoch` before each pass.

    It lets one DataLoader (and its persistent workers) serve every epoch while each epoch,
    and a resumed run's epoch, still gets the order its seed fixes. ``limit``: only the first
    ``limit`` indices of each permutation (an epoch capped at max_steps_per_epoch batches), so
    the epoch ends where training stops instead of leaving prefetched batches that the next
    epoch's start must wait for and throw away.
    """

    def __init__(self, n: int, seed: int, limit: int | None = None) -> None:
        self.n, self.seed, self.epoch = n, int(seed), 0
        self.limit = n if limit is None else max(0, min(int(limit), n))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen)[:self.limit].tolist())

    def __len__(self) -> int:
        return self.limit


def make_loader(dataset: Dataset, cfg: TrainConfig, device: torch.device, *, shuffle: bool = True,
                seed: int | None = None) -> DataLoader:
    """A DataLoader of ``((view_q, view_k), n_dropped)`` batches (see ``collate_views``).

    Full batches only when the data allows (drop_last), because split BN and the queue
    behave best with constant batch size; pinned memory when training on CUDA. Workers are
    persistent: reuse the loader across epochs (``set_loader_epoch``) rather than paying a
    worker start per epoch. When the dataset offers batched views (``fedmoco.gpu_augment``)
    and ``cfg.batch_augment`` allows it, the loader yields raw cached batches and
    :class:`Trainer` makes the two views on the device.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")
    seed = cfg.seed if seed is None else seed
    workers = cfg.num_workers
    collate = collate_views
    batched = batched_views_for(dataset, cfg, device)
    if batched is not None:
        dataset, collate = batched
    return DataLoader(
        dataset,
        batch_size=min(cfg.batch_size, n),
        sampler=EpochShuffle(n, seed, limit=cfg.max_steps_per_epoch and cfg.max_steps_per_epoch * cfg.batch_size)
        if shuffle else None,
        drop_last=n >= cfg.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        collate_fn=collate,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Give the loader's shuffle the order of ``epoch`` (no-op for an unshuffled loader)."""
    if isinstance(getattr(loader, "sampler", None), EpochShuffle):
        loader.sampler.set_epoch(epoch)


def batched_views_for(dataset: Dataset, cfg: TrainConfig, device: torch.device):
    """(base dataset, collate) when the two views are made per batch, else None.

    Datasets that keep a decoded-sample cache expose ``batched_views()`` -> (dataset of
    cached base samples, BatchViews module) or None. On CUDA the collate only stacks and the
    Trainer runs the module on the device; on CPU it runs inside the collate, in the workers.
    ``auto`` batches wherever the dataset offers it, CPU included: per core it is faster than
    the per-sample pipelines (benchmarks/results/feed_*.md), and a fresh round's process then
    never imports MONAI or torchvision (benchmarks/results/round_overhead.md).
    """
    mode = cfg.batch_augment
    use = mode in ("auto", "on")
    offer = getattr(dataset, "batched_views", None)
    if not use or offer is None:
        return None
    found = offer()
    if found is None:
        return None
    base, views = found
    if device.type == "cuda":
        return base, BaseCollate(views, pin_threads=cfg.pin_threads)
    return base, CpuViewsCollate(views)


class BaseCollate:
    """Stack cached base samples; the Trainer turns them into views on the device.
    ``pin_threads``: see :class:`BaseBatch`."""

    def __init__(self, views: torch.nn.Module, pin_threads: int = 1) -> None:
        self.views = views
        self.pin_threads = pin_threads

    def __call__(self, batch: list[Any]) -> tuple[Any, int]:
        stacked, dropped = collate_views(batch)
        return (BaseBatch(stacked, self.pin_threads) if stacked is not None else None), dropped


class CpuViewsCollate(BaseCollate):
    """Stack cached base samples and make both views here (in the DataLoader worker)."""

    def __call__(self, batch: list[Any]) -> tuple[Any, int]:
        stacked, dropped = collate_views(batch)
        if stacked is None:
            return None, dropped
        with torch.no_grad(), one_thread():
            return self.views(stacked), dropped


class BaseBatch:
    """A batch of cached base samples still to be augmented (see :class:`BaseCollate`).
    DataLoader's pin thread calls :meth:`pin_memory`; with ``pin_threads`` > 1 each tensor of
    at least PIN_PARALLEL_BYTES is copied into pinned memory by that many threads."""

    def __init__(self, data: Any, pin_threads: int = 1) -> None:
        self.data = data
        self.pin_threads = pin_threads

    def __getitem__(self, i: int) -> Any:  # batch[0].shape[0] is the batch size, as for views
        first = self.data[0] if isinstance(self.data, (tuple, list)) else self.data
        if i != 0:
            raise IndexError(i)
        return first

    def pin_memory(self) -> "BaseBatch":
        return BaseBatch(_map_tensors(self.data, lambda t: pin_tensor(t, self.pin_threads)), self.pin_threads)

    def to(self, device: torch.device) -> Any:
        return _map_tensors(self.data, lambda t: t.to(device, non_blocking=True))


PIN_PARALLEL_BYTES = 32 << 20  # smaller tensors: one plain copy


def pin_tensor(t: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """``t.pin_memory()``, copied by ``threads`` threads when ``t`` is contiguous and large.
    (DataLoader's pin thread runs with one intra-op thread, so its copy of a 334 MB satellite
    batch is one thread's memcpy.)"""
    if threads <= 1 or t.nbytes < PIN_PARALLEL_BYTES or not t.is_contiguous():
        return t.pin_memory()
    return parallel_copy_(torch.empty(t.shape, dtype=t.dtype, pin_memory=True), t, threads)


_copy_pools: dict[int, ThreadPoolExecutor] = {}
_copy_pools_lock = threading.Lock()


def parallel_copy_(dst: torch.Tensor, src: torch.Tensor, threads: int) -> torch.Tensor:
    """``dst.copy_(src)`` for contiguous CPU tensors of one shape and dtype, as ``threads``
    byte ranges copied by the threads of a pool. Returns ``dst``.

    numpy's copy is a memcpy that releases the GIL and starts no OpenMP team; a torch copy
    per thread would start one each, and torch.set_num_threads to prevent that also sets the
    thread count of threads started later, the training loop's own included.
    """
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"parallel_copy_: {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} {dst.dtype}")
    if not (dst.is_contiguous() and src.is_contiguous()) or dst.device.type != "cpu" or src.device.type != "cpu":
        raise ValueError("parallel_copy_: both tensors must be contiguous and on the CPU")
    d, s = (t.reshape(-1).view(torch.uint8).numpy() for t in (dst, src))  # views of the same bytes
    with _copy_pools_lock:
        pool = _copy_pools.get(threads)
        if pool is None:
            pool = _copy_pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="fedmoco-pin")
    cuts = [len(d) * i // threads for i in range(threads + 1)]
    for job in [pool.submit(np.copyto, d[a:b], s[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]:
        job.result()
    return dst


def _map_tensors(data: Any, fn) -> Any:
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, (tuple, list)):
        return type(data)(_map_tensors(d, fn) for d in data)
    if isinstance(data, dict):
        return {k: _map_tensors(v, fn) for k, v in data.items()}
    return data


def guarded_size(n: int, splits: int) -> int:
    """The largest batch size m <= ``n`` that split BN can divide into at least
    ``max(2, min(splits // 2, m // 2))`` equal sub-batches (0 when none).

    A prime batch (31 = 32 minus one unreadable image) would otherwise fall back to one
    whole-batch BN and reintroduce the leak split BN exists to prevent; dropping one image
    instead (31 -> 30, 6 sub-batches of 5) keeps the guard on for every step.
    """
    for m in range(n, 1, -1):
        # A batch smaller than the splits may use fewer (a 3-image batch: 3 sub-batches of 1).
        if largest_divisor(m, splits) >= max(2, min(splits // 2, m // 2)):
            return m
    return 0


def build_optimizer(model: MoCo, cfg: TrainConfig, *, fused: bool = False) -> torch.optim.SGD:
    """SGD with momentum over the trainable parameters (query encoder and predictor).

    ``fused`` (the Trainer's choice on CUDA): one kernel for all parameters, and AMP's
    GradScaler hands it the inf check as a tensor instead of reading it on the host
    every step (an unfused optimizer makes the scaler sync with the GPU once per step).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.scaled_lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                           fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, steps_per_epoch: int):
    """Linear warm-up for ``warmup_epochs``, then cosine decay to 0 at ``total_steps``."""
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1))
    if warmup == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


@dataclass
class EpochSummary:
    """Means over the steps of one epoch (or one federated round's local epochs)."""

    loss: float = float("nan")
    steps: int = 0
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0
    pos_mean: float = float("nan")
    neg_mean: float = float("nan")
    neg_var: float = float("nan")
    emb_std: float = float("nan")
    global_share: float = float("nan")  # softmax mass on the global negatives (0 without them)
    pos_hist: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    neg_hist: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    """Runs MoCo steps on a device with AMP/channels_last on CUDA, logging JSON lines.

    ``total_steps`` is the length of the whole optimisation (all epochs, or all federated
    rounds times local epochs) so the LR and momentum schedules span it.
    """

    def __init__(self, model: MoCo, cfg: TrainConfig, device: torch.device, *, total_steps: int,
                 steps_per_epoch: int, logger: JsonlLogger | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.device = device
        self.use_amp = cfg.amp and device.type == "cuda"
        # channels_last only pays off with plain BatchNorm: split BN's reshape and GroupNorm
        # run faster in NCHW (H100, ResNet-18 at 224 px: split BN 4869 vs 3023 images/s,
        # GroupNorm 4036 vs 3296; benchmarks/results/moco_step_h100.md).
        self.channels_last = cfg.channels_last and device.type == "cuda" and model.cfg.norm == "batch"
        self.model = model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.fused = device.type == "cuda"
        self.optimizer = build_optimizer(model, cfg, fused=self.fused)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps, steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.total_steps = total_steps
        self.global_step = 0
        self.logger = logger or JsonlLogger(None)
        self.progress = progress
        self.splits = model.cfg.norm_splits if model.cfg.norm == "split-batch" else 0
        # Steps between reads of the loss and statistics. A read waits for the device to
        # finish every queued kernel, so on a GPU it happens every few steps (the host keeps
        # queueing the next steps meanwhile); on a CPU there is nothing to overlap.
        self.read_every = READ_EVERY_CUDA if device.type == "cuda" else 1
        if model.cfg.norm == "batch":
            log.warning("norm=batch on one device: query and key batches share batch statistics, which "
                        "lets MoCo match pairs by them (MoCo v1, Sec. 3.3); use split-batch or group")

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule and loss-scale state, every tensor on the CPU: checkpoints and a
        site's saved state then load on a machine without this one's GPU (``torch.load``
        without ``map_location`` too)."""
        return {
            "optimizer": _map_tensors(self.optimizer.state_dict(), lambda t: t.detach().cpu()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "global_step": self.global_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_scaler_state(state["scaler"])
        self.global_step = int(state["global_step"])

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        """AMP's loss scale from ``state``. A scaler that was off (a CPU run, or ``--no-amp``)
        saved ``{}``, which an enabled one refuses: this one then starts from its defaults."""
        if state:
            self.scaler.load_state_dict(state)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Momentum buffers and hyper-parameters from ``state``; the kernel choice (``fused``)
        stays this device's, since a state saved on another device carries that one's. Each
        buffer takes its parameter's memory layout: a state saved in NCHW (a CPU run) meets
        channels_last parameters on CUDA, and the fused CUDA kernel requires equal strides."""
        self.optimizer.load_state_dict(state)
        for group in self.optimizer.param_groups:
            group["fused"] = self.fused or None
        for p, st in self.optimizer.state.items():
            buf = st.get("momentum_buffer")
            if isinstance(buf, torch.Tensor) and buf.stride() != p.stride():
                st["momentum_buffer"] = torch.empty_like(p).copy_(buf)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _guard(self, x_q: torch.Tensor, x_k: torch.Tensor):
        """Trim a short batch so split BN still divides it (see :func:`guarded_size`);
        (None, None) when too few images are left to keep the guard."""
        if not self.splits:
            return x_q, x_k
        n = x_q.shape[0]
        m = guarded_size(n, self.splits)
        if m < 2:
            return None, None
        if m < n:
            log.debug("batch of %d trimmed to %d so split BN keeps %d sub-batches", n, m,
                      largest_divisor(m, self.splits))
            x_q, x_k = x_q[:m], x_k[:m]
        return x_q, x_k

    def train_epoch(self, loader: DataLoader, *, epoch: int = 0, extra_negatives: torch.Tensor | None = None,
                    extra_centres: torch.Tensor | None = None, max_steps: int | None = None,
                    desc: str | None = None) -> EpochSummary:
        """One pass over ``loader`` (at most ``max_steps`` steps). Returns its means.
        ``extra_negatives`` (M, D) and ``extra_centres`` (C, D): see :class:`fedmoco.moco.MoCo`."""
        self.model.train()
        own_centres = extra_centres is not None and extra_centres is extra_negatives
        if extra_negatives is not None:
            extra_negatives = extra_negatives.to(self.device)
        if extra_centres is not None:  # the negatives as their own centres stay one tensor (MoCo._cancel_mask)
            extra_centres = extra_negatives if own_centres else extra_centres.to(self.device)
        set_loader_epoch(loader, epoch)
        collate = getattr(loader, "collate_fn", None)
        if type(collate) is BaseCollate:  # views made here, on this device (CpuViewsCollate's run in the workers)
            collate.views.to(self.device)
        max_steps = max_steps or self.cfg.max_steps_per_epoch
        total = min(len(loader), max_steps) if max_steps else len(loader)
        summary = EpochSummary()
        sums = dict.fromkeys(STAT_NAMES, 0.0)
        pos_hist = torch.zeros(SCORE_BINS, device=self.device)
        neg_hist = torch.zeros(SCORE_BINS, device=self.device)
        pending: list[tuple[dict[str, Any], torch.Tensor]] = []  # steps whose statistics are unread
        start = time.perf_counter()
        bar = tqdm(total=total, desc=desc or f"epoch {epoch}", disable=not self.progress, leave=False,
                   unit="step", dynamic_ncols=True)
        for batch, dropped in loader:
            if summary.steps >= total:
                break
            summary.skipped += dropped
            if batch is None or batch[0].shape[0] < 2:
                continue  # a batch with <2 readable images has no negatives to contrast
            t0 = time.perf_counter()
            if isinstance(batch, BaseBatch):  # cached base samples: both views made on the device
                with torch.no_grad():
                    batch = loader.collate_fn.views(batch.to(self.device))
            x_q, x_k = self._guard(self._to_device(batch[0]), self._to_device(batch[1]))
            if x_q is None:
                continue
            if self.model.cfg.momentum_schedule == "cosine":
                self.model.momentum = cosine_momentum(self.model.cfg.momentum, self.global_step, self.total_steps)
            with torch.autocast(self.device.type, enabled=self.use_amp):
                out = self.model(x_q, x_k, extra_negatives, extra_centres)
            loss = out.loss
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses: read before the scheduler moves it
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            pos_hist += score_histogram(out.pos_scores)
            neg_hist += score_histogram(out.neg_scores)
            values = torch.stack([loss.detach().float()] + [out.stats[k] for k in STAT_NAMES[1:]])  # (6,)
            pending.append(({"epoch": epoch, "step": self.global_step, "images": x_q.shape[0], "t0": t0,
                             "lr": lr, "momentum": self.model.momentum}, values))
            summary.steps += 1
            summary.images += x_q.shape[0]
            self.global_step += 1
            if len(pending) >= self.read_every:
                self._read(pending, sums, bar)
        self._read(pending, sums, bar)
        summary.pos_hist = [int(v) for v in pos_hist.tolist()]
        summary.neg_hist = [int(v) for v in neg_hist.tolist()]
        bar.close()
        summary.seconds = time.perf_counter() - start
        if summary.steps:
            for key, total_value in sums.items():
                setattr(summary, key, total_value / summary.steps)
        return summary

    def _read(self, pending: list[tuple[dict[str, Any], torch.Tensor]], sums: dict[str, float], bar) -> None:
        """Read the statistics of the ``pending`` steps in one device-to-host copy, check the
        loss, add them to ``sums``, log every ``log_every``-th step and empty ``pending``.

        Each record's ``images_per_s`` is that of the steps read together: their images over
        the wall time from the first one's start to this read (one step on a CPU).
        """
        if not pending:
            return
        rows = torch.stack([values for _, values in pending]).tolist()  # the one sync
        seconds = time.perf_counter() - pending[0][0]["t0"]
        rate = sum(meta["images"] for meta, _ in pending) / seconds if seconds > 0 else float("nan")
        for (meta, _), row in zip(pending, rows):
            stats = dict(zip(STAT_NAMES, row))
            if not math.isfinite(stats["loss"]):
                # The decoded-sample cache has no checksum (see docs/engine.md): damaged bytes in it
                # read as NaN pixels, and the advice pointed away from it (found by an audit).
                raise TrainingDiverged(f"loss became {stats['loss']} at step {meta['step']}; lower --lr, "
                                       "or look for extreme values in the data or the augmentation options "
                                       "(if it trains with --no-cache, the decoded-sample cache is damaged: "
                                       "fedmoco cache --clear)")
            for key in sums:
                sums[key] += stats[key]
            record = {"epoch": meta["epoch"], "step": meta["step"], **stats, "lr": meta["lr"],
                      "momentum": meta["momentum"], "images_per_s": rate}
            if (meta["step"] + 1) % self.cfg.log_every == 0:
                self.logger.log(record)
        bar.set_postfix(loss=f"{rows[-1][0]:.3f}", img_s=f"{rate:.0f}")
        bar.update(len(pending))
        pending.clear()
