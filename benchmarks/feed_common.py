"""Shared by feed_medical.py and feed_satellite.py: how fast a site's data feed makes MoCo pairs.

Three CPU figures, each in ONE process on ONE intra-op thread, so they are per core:

* ``baseline``: today's path, no cache: read + decode + two per-sample views (``dataset[i]``);
* ``cached``: the same per-sample views, bases read from the decoded-sample cache;
* ``batched``: cached bases + both views per batch (``fedmoco.gpu_augment``) on the CPU, as
  DataLoader workers make them with ``batch_augment=on``.

With ``--device cuda`` also: the feed on the GPU (cached bases through a DataLoader with
workers, pinned, copied, both views made on the GPU; synchronised) against the MoCo
ResNet-18 training step at the same image size, which is what the feed must keep up with,
and fedmoco's training loop end to end (make_loader + Trainer), all in steady state
(:func:`steady_windows`). feed_satellite.py also takes the feed apart stage by stage.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from common import markdown_table
from fedmoco.data import collate_views, one_thread


class Repeat(Dataset):
    """``dataset`` repeated to at least ``n`` items (small demo archives, big GPU batches)."""

    def __init__(self, dataset: Dataset, n: int) -> None:
        self.dataset, self.n = dataset, max(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i % len(self.dataset)]


class RepeatWithViews(Repeat):
    """:class:`Repeat` of a dataset that offers batched views, offering them too (repeated bases)."""

    def batched_views(self):
        found = self.dataset.batched_views()
        return None if found is None else (Repeat(found[0], self.n), found[1])


def per_sample_pass(dataset: Dataset, n: int) -> Callable[[], int]:
    """One pass of ``dataset[i]`` (two views each) over ``n`` indices; returns pairs made."""
    def run() -> int:
        done = 0
        for i in range(n):
            done += dataset[i % len(dataset)] is not None
        return done

    return run


def batched_pass(bases: Dataset, views: torch.nn.Module, n: int, batch: int,
                 split: dict[str, float] | None = None) -> Callable[[], int]:
    """One pass of cached bases collated and turned into two views per batch; returns pairs made.

    Full batches only, as training draws them (``drop_last``, fedmoco/train.py): the pass makes
    ``batch * ceil(n / batch)`` pairs, wrapping round the ``n`` samples, rather than ending on a
    short batch that training never sees (a batch of 8 pays a batch of 32's fixed costs).
    ``split``, when given, accumulates the seconds spent in "read + collate" and in "views"."""
    total = batch * math.ceil(n / batch)

    def run() -> int:
        done = 0
        for start in range(0, total, batch):
            t0 = time.perf_counter()
            stacked, _ = collate_views([bases[i % len(bases)] for i in range(start, start + batch)])
            t1 = time.perf_counter()
            with torch.no_grad():
                q, _ = views(stacked)
            done += q.shape[0]
            if split is not None:
                split["read + collate"] = split.get("read + collate", 0.0) + t1 - t0
                split["views"] = split.get("views", 0.0) + time.perf_counter() - t1
        return done

    return run


def interleaved_rates(passes: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[float, float, float]]:
    """(median, min, max) pairs/s of each pass on one intra-op thread, after one warm-up pass
    each (fills the caches, page cache, lazy imports). The passes take turns, round by round:
    on a shared machine the load then drifts over all of them alike, and their ratios (the
    figures to read) hold even when the absolute rates move by tens of percent."""
    rates: dict[str, list[float]] = {name: [] for name in passes}
    with one_thread():
        for run in passes.values():
            run()
        for _ in range(repeats):
            for name, run in passes.items():
                t0 = time.perf_counter()
                n = run()
                rates[name].append(n / (time.perf_counter() - t0))
    return {name: (statistics.median(r), min(r), max(r)) for name, r in rates.items()}


PREFETCH = 2  # DataLoader's default, which make_loader keeps
PIN_THREADS_TRIED = 4  # the stage table's second pinning row (TrainConfig.pin_threads)


def steady_windows(steps: int, workers: int) -> tuple[int, int]:
    """(warm-up batches, timed batches) for a loader rate that is the steady state's.

    Every worker starts its first batches at once and holds up to PREFETCH of them ready, so
    the first ``workers * PREFETCH`` batches come faster than the loader can keep up (a
    10-batch window after 2 warm-up batches measured that wave: 12.6 million pairs/s for one
    stage on an H200, 2026-11-29). The timed window starts after them and is at least twice
    as long, so what a full queue adds is at most a third of it.
    """
    ahead = max(workers, 1) * PREFETCH
    return ahead + 1, max(steps, 2 * ahead)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(bases: Dataset, views: torch.nn.Module | None, device: torch.device, batch: int, steps: int,
                workers: int, *, pin: bool = True, pin_threads: int = 1) -> float:
    """Pairs/s of cached bases through a DataLoader with ``workers`` (as make_loader builds it),
    copied to ``device`` and made into both views there when ``views`` is given (the views
    module already on ``device``), else only taken from the loader (and pinned if ``pin``, by
    ``pin_threads`` threads: TrainConfig.pin_threads). Steady state: see :func:`steady_windows`."""
    from fedmoco.train import BaseBatch

    warm, timed = steady_windows(steps, workers)
    loader = DataLoader(Repeat(bases, batch * (warm + timed)), batch_size=batch, shuffle=True, num_workers=workers,
                        pin_memory=pin, drop_last=True,
                        collate_fn=lambda b: BaseBatch(collate_views(b)[0], pin_threads),
                        prefetch_factor=PREFETCH if workers else None)
    it = iter(loader)

    def take() -> int:
        b = next(it)
        if views is not None:
            with torch.no_grad():
                views(b.to(device))
        return b[0].shape[0]

    for _ in range(warm):  # the workers' first batches; CUDA kernels load
        take()
    _sync(device)
    t0 = time.perf_counter()
    done = sum(take() for _ in range(timed))
    _sync(device)
    return done / (time.perf_counter() - t0)  # the workers stop with the iterator, on return


def gpu_feed_rate(bases: Dataset, views: torch.nn.Module, device: torch.device, batch: int, steps: int,
                  workers: int) -> float:
    """Pairs/s delivered on the GPU: loader workers read cached bases, pinned, copied, and the
    GPU makes the views (steady state)."""
    return loader_rate(bases, views.to(device), device, batch, steps, workers)


def gpu_feed_stages(bases: Dataset, views: torch.nn.Module, device: torch.device, batch: int, steps: int,
                    workers: int) -> dict[str, float]:
    """Pairs/s of the GPU feed taken apart, to find what it waits for: the loader workers
    alone, then with DataLoader's pinning (its one-thread copy, or ``PIN_THREADS_TRIED``
    threads: TrainConfig.pin_threads), then with the copy to the GPU and the views (from pinned
    memory, or from pageable memory without pinning), and the views alone on a batch already on
    the GPU (with and without TF32 matrix products)."""
    from fedmoco.train import _map_tensors

    views = views.to(device)
    k = PIN_THREADS_TRIED
    stages = {
        "loader workers only (no pinning, no copy)": dict(views=None, pin=False),
        "+ pinning (DataLoader's pin thread, one copy)": dict(views=None),
        f"+ pinning, copied by {k} threads (pin_threads={k})": dict(views=None, pin_threads=k),
        "+ copy to the GPU + views (the feed, as make_loader builds it)": dict(views=views),
        f"the feed with pin_threads={k}": dict(views=views, pin_threads=k),
        "no pinning: copy from pageable memory + views": dict(views=views, pin=False),
    }
    rates = {}
    for name, how in stages.items():
        rates[name] = loader_rate(bases, how.pop("views"), device, batch, steps, workers, **how)
        print(f"stage: {name}: {rates[name]:,.0f} pairs/s", flush=True)  # kept if a time limit cuts the run
    x = _map_tensors(collate_views([bases[i % len(bases)] for i in range(batch)])[0], lambda t: t.to(device))

    def views_alone() -> float:
        with torch.no_grad():
            views(x)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                views(x)
        _sync(device)
        return steps * batch / (time.perf_counter() - t0)

    rates["views alone (batch already on the GPU)"] = views_alone()
    if device.type == "cuda":  # what the views' float32 matrix products would gain on tensor cores
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            rates["views alone, TF32 matrix products"] = views_alone()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    return rates


def trainer_rate(dataset: Dataset, in_channels: int, device: torch.device, batch: int, steps: int,
                 workers: int) -> float:
    """Images/s of fedmoco's own training loop end to end, in steady state: ``make_loader``
    (cached bases, workers, pinning) and ``Trainer.train_epoch`` (views on the device, MoCo
    step), ResNet-18. One epoch; the rate is that of the steps after the warm-up of
    :func:`steady_windows`, from the Trainer's own per-step records. A dataset with too few
    samples is repeated."""
    import tempfile

    from fedmoco.config import MoCoConfig, TrainConfig
    from fedmoco.metrics import JsonlLogger, read_jsonl
    from fedmoco.moco import MoCo
    from fedmoco.train import Trainer, make_loader

    warm, timed = steady_windows(steps, workers)
    if len(dataset) < batch * (warm + timed):  # a small demo archive: repeated, batched views kept
        dataset = RepeatWithViews(dataset, batch * (warm + timed))
    torch.backends.cudnn.benchmark = True
    cfg = TrainConfig(batch_size=batch, num_workers=workers, log_every=1)
    loader = make_loader(dataset, cfg, device)
    model = MoCo(MoCoConfig(arch="resnet18", in_channels=in_channels, queue_size=4096))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        trainer = Trainer(model, cfg, device, total_steps=warm + timed, steps_per_epoch=warm + timed,
                          logger=JsonlLogger(path), progress=False)
        trainer.train_epoch(loader, max_steps=warm + timed)
        records = [r for r in read_jsonl(path) if r["step"] >= warm]
    # steps read together share one rate (their images over their wall time), so each step's
    # seconds are batch / rate, and these add up to the wall time of the steps timed
    seconds = sum(batch / r["images_per_s"] for r in records) if records else float("nan")
    return batch * len(records) / seconds


def gpu_rates(bases: Dataset, views: torch.nn.Module, dataset: Dataset, in_channels: int, image_size: int,
              device: torch.device, batch: int, steps: int, workers: int) -> dict[str, float]:
    """The GPU section's three figures: ``feed`` (:func:`gpu_feed_rate`, pairs/s), ``step``
    (:func:`step_rate`, images/s) and ``trainer`` (:func:`trainer_rate` on ``dataset``,
    images/s), each printed as soon as it is measured, so a time limit keeps it."""
    gpu: dict[str, float] = {}
    for key, measure in (("feed", lambda: gpu_feed_rate(bases, views, device, batch, steps, workers)),
                         ("step", lambda: step_rate(in_channels, image_size, batch, device, steps)),
                         ("trainer", lambda: trainer_rate(dataset, in_channels, device, batch, steps, workers))):
        gpu[key] = measure()
        print(f"gpu {key}: {gpu[key]:,.0f} a second", flush=True)
    return gpu


def step_rate(in_channels: int, image_size: int, batch: int, device: torch.device, steps: int,
              norm: str = "split-batch") -> float:
    """Images/s of fedmoco's MoCo step (ResNet-18, AMP, the Trainer's memory format)."""
    from fedmoco.config import MoCoConfig, TrainConfig
    from fedmoco.moco import MoCo
    from fedmoco.train import Trainer

    torch.backends.cudnn.benchmark = True
    model = MoCo(MoCoConfig(arch="resnet18", in_channels=in_channels, norm=norm, queue_size=4096))
    trainer = Trainer(model, TrainConfig(batch_size=batch), device, total_steps=steps + 3, steps_per_epoch=steps + 3,
                      progress=False)
    x = torch.randn(batch, in_channels, image_size, image_size, device=device)  # the feed is timed apart
    loader = [((x, x.clone()), 0)] * (steps + 3)
    trainer.train_epoch(loader[:3])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train_epoch(loader[3:])
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def profile_lines(bases: Dataset, views: torch.nn.Module, n: int, batch: int, what: str,
                  rows: int = 10) -> list[str]:
    """Report section: where the cached batched path spends its time on one intra-op thread.
    First the split of unprofiled passes between reading + collating the cached bases and
    making the views (ms a pair); then the torch operators of one profiled pass by self CPU
    time, as shares of all operator time (the profiler's own per-call overhead is left out)."""
    from torch.profiler import ProfilerActivity, profile

    split: dict[str, float] = {}
    with one_thread():
        batched_pass(bases, views, n, batch)()  # warm
        timed = batched_pass(bases, views, n, batch, split)
        pairs = sum(timed() for _ in range(3))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            batched_pass(bases, views, n, batch)()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    table = [[f"`{e.key}`", str(e.count), f"{100 * e.self_cpu_time_total / total:.0f}%"] for e in ops[:rows]]
    table.append(["other operators", "", f"{100 * sum(e.self_cpu_time_total for e in ops[rows:]) / total:.0f}%"])
    return ["", f"## Where the time goes: {what}", "",
            "Unprofiled, 3 passes: " + ", ".join(f"{k} {1000 * v / pairs:.2f} ms a pair" for k, v in split.items())
            + ". One profiled pass, torch.profiler self CPU time of each operator as a share of all "
            "operator time:", "",
            *markdown_table(["operator", "calls", "share"], table)]


def fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:,.0f} ({r[1]:,.0f}-{r[2]:,.0f})"


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def add_feed_args(p: argparse.ArgumentParser, name: str) -> None:
    """The options both feed benchmarks share (GPU batch, loader workers, report path)."""
    p.add_argument("--gpu-batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="GPU feed loader workers")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / f"{name}.md")
    p.add_argument("--profile", action="store_true",
                   help="add a table of where the cached batched path spends its time (torch.profiler)")


def rate_rows(labels: tuple[str, ...], rates: dict[str, tuple[float, float, float]],
              keys: tuple[str, ...] = ("base", "cached", "batched")) -> list[list[str]]:
    """Table rows, one per label and key of ``rates`` (the ``interleaved_rates`` of today's
    path ``base`` and the others): pairs/s and the ratio to today's rate."""
    base = rates["base"][0]
    return [[label, fmt(rates[key]), f"{rates[key][0] / base:.1f}x"] for label, key in zip(labels, keys, strict=True)]


def gpu_lines(heading: str, feed_what: str, step_what: str, gpu: dict[str, float]) -> list[str]:
    """The report's GPU section: feed and step rates (pairs/s) and their ratio."""
    return ["", f"## {heading}", "",
            *markdown_table(["what", "pairs/s"], [[feed_what, f"{gpu['feed']:,.0f}"], [step_what, f"{gpu['step']:,.0f}"]]),
            "", f"Feed / step: {gpu['feed'] / gpu['step']:.2f}x (>= 1 means the GPU never waits for data)."]


def feed_record(bench: str, rates: dict[str, tuple[float, float, float]], gpu: dict[str, float],
                **extra: Any) -> dict[str, Any]:
    """The benchmark's JSON headline: per-core rates, the speed-up over today and the GPU figures."""
    record = {"bench": bench, **extra,
              "pairs_per_s_per_core": round(rates["batched"][0], 1),
              "cached_per_sample_pairs_per_s_per_core": round(rates["cached"][0], 1),
              "baseline_pairs_per_s_per_core": round(rates["base"][0], 1),
              "speedup": round(rates["batched"][0] / rates["base"][0], 2)}
    if gpu:
        record |= {"gpu_feed_pairs_per_s": round(gpu["feed"]), "gpu_step_images_per_s": round(gpu["step"]),
                   "feed_over_step": round(gpu["feed"] / gpu["step"], 2)}
    return record
