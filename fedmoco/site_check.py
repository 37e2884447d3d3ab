"""``fedmoco check-site``: a dry run a site admin does before joining a federation.

It reads the data folder exactly as the site's ClientApp will (the domain's
``build_pretrain_data``), then trains nothing that is kept: it times a few real MoCo steps of
the configured encoder on this machine's device, data loading included, and reports

* usable images (samples) and the files skipped while scanning, by reason;
* channels, the size the images arrive in (from file headers) and the input size;
* the seconds per step and the time one local epoch is expected to take;
* the privacy settings in the folder's ``fedmoco-site.toml``, checked by the rules a round
  applies (budget, delta against the number of images, ledger outside the data folder), and
  what the ledger has spent so far. node_config, which this dry run cannot see, wins over
  the file key by key.

Nothing is written and nothing leaves the machine.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmoco.config import NORMS, MoCoConfig, TrainConfig, check_image_size
from fedmoco.errors import DataError
from fedmoco.site_settings import SITE_SETTINGS_FILE

if TYPE_CHECKING:
    from fedmoco.data import PretrainData

log = logging.getLogger(__name__)

# torch, the data pipeline and the model are imported where they are used: this module also
# builds the `check-site` parser, and `fedmoco --help` should not wait seconds for torch.

#: The federation's model and batch defaults (clients.task.RUN_DEFAULTS; a test keeps them
#: equal). fedmoco's core may not import clients/, hence the copy.
FEDERATION_DEFAULTS: dict[str, Any] = {"arch": "tiny", "norm": "group", "dim": 128, "hidden-dim": 512,
                                       "small-input": True, "image-size": 64, "batch-size": 32,
                                       "local-queue-size": 1024}


@dataclass
class SiteReport:
    """What ``check-site`` found; times in seconds."""

    domain: str
    data: Path
    usable: int
    skipped: Counter
    channels: int
    image_size: int
    source_sizes: Counter = field(default_factory=Counter)  # (height, width) -> files
    description: str = ""
    device: str = "cpu"
    batch_size: int = 0
    steps_per_epoch: int = 0
    steps_timed: int = 0
    seconds_per_step: float = float("nan")
    skipped_while_timing: int = 0
    steps_trained: int = 0  # of the timed (and warm-up) steps: 0 when no batch had 2 readable images
    privacy: list[str] = field(default_factory=list)  # the settings file's budget and ledger, one fact per line
    cache_dir: str = ""  # where a round's decoded-sample cache goes
    cache_bytes: int = 0  # what it takes there (fedmoco.data.PretrainData.cache_bytes)
    cache_skipped: int = 0  # sources it leaves uncached
    cache_free: int = -1  # free bytes on the cache's volume now (-1: not asked)
    cache_fits: bool = True  # whether cache_bytes leave fedmoco.cache.min_free_bytes() free there
    cache_problem: str = ""  # why a round could not write its cache in cache_dir ("" when it could)

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds_per_step * self.steps_per_epoch

    def lines(self) -> list[str]:
        """The report as printed, one fact per line."""
        from fedmoco.cache import format_bytes
        from fedmoco.data import format_skipped

        sizes = _format_sizes(self.source_sizes)
        out = [
            f"site check: {self.domain} data in {self.data}",
            f"usable images:   {self.usable}" + (f"; {self.description}" if self.description else ""),
            f"skipped files:   {format_skipped(self.skipped) if self.skipped else 'none'}",
            f"channels:        {self.channels}",
            f"image sizes:     {sizes}",
            f"input size:      {self.image_size} x {self.image_size} px (run_config image-size)",
        ]
        if self.steps_timed:
            out += [
                f"time per step:   {self.seconds_per_step:.3f} s on {self.device} (batch {self.batch_size}, "
                f"mean of {_count(self.steps_timed, 'timed step')}, reading, decoding and augmentation included, "
                "as in a round's first pass over the data; with medical and satellite data later passes "
                "read the decoded-sample cache)",
                f"time per epoch:  about {_format_seconds(self.seconds_per_epoch)} "
                f"({_count(self.steps_per_epoch, 'step')} of {self.batch_size} images)",
            ]
        if self.skipped_while_timing:
            out.append(f"unreadable while timing: {self.skipped_while_timing} sample(s) (the usable count above "
                       "reads headers only; these failed to decode); the site log will count them every round")
        if self.cache_bytes and self.cache_problem:
            out.append(f"cache:           this check wrote nothing; a round cannot write its decoded-sample cache "
                       f"there: {self.cache_problem}, so every read decodes its image: point FEDMOCO_CACHE_DIR "
                       "at a folder this user can write")
        elif self.cache_bytes and not self.cache_fits:
            from fedmoco.cache import MIN_FREE_ENV, min_free_bytes

            out.append(f"cache:           this check wrote nothing; a round would need about "
                       f"{format_bytes(self.cache_bytes)} in {self.cache_dir} but only "
                       f"{format_bytes(max(self.cache_free, 0))} is free and {format_bytes(min_free_bytes())} is kept "
                       f"free ({MIN_FREE_ENV}), so every read decodes its image: free disk there, or point "
                       "FEDMOCO_CACHE_DIR at a larger volume")
        elif self.cache_bytes or self.cache_skipped:
            out.append(f"cache:           this check wrote nothing; a round decodes the images once into "
                       f"{self.cache_dir}: about {format_bytes(self.cache_bytes)} on disk (pixels only)"
                       + (f"; {self.cache_skipped} raster(s) over cache_max_gb are read from disk every time"
                          if self.cache_skipped else ""))
        else:
            out.append("cache:           this check wrote nothing; every read decodes its image (no decoded-sample "
                       "cache in this domain, or the cache option is off)")
        return out + self.privacy


def check_site(domain: str, data_dir: Path | str, *, options: dict[str, Any] | None = None, image_size: int = 64,
               model: MoCoConfig | None = None, batch_size: int = 32, device: torch.device | None = None,
               steps: int = 3, workers: int = 0) -> SiteReport:
    """Scan ``data_dir`` as the site's ClientApp will and time ``steps`` MoCo steps of
    ``model`` (default: the federation's default encoder) on ``device`` (default CPU).

    Raises DataError when the folder holds fewer than two usable images (MoCo needs two).
    """
    import torch

    from fedmoco.cache import cache_fits, cache_folder_problem, default_cache_dir, folder_cache_allocated
    from fedmoco.data import (DataConfig, build_pretrain_data, cache_option_off, check_cache_outside, check_data_dir,
                              format_skipped)

    data_dir = Path(data_dir)
    # A dry run writes nothing: DataConfig(cache=False) turns off the decoded-sample cache (a
    # satellite archive's can take up to cache_max_gb and minutes to fill), the header index
    # and the band-statistics memo. So its step time includes decoding, as a round's first pass
    # over the data does; later passes read the cache, unless the site's own options turn it off.
    options = dict(options or {})
    cache_off = cache_option_off(options)
    # as a round checks it, and before the scan: this dry run turns its own cache off
    check_cache_outside(check_data_dir(data_dir), DataConfig(image_size=image_size, options=options))
    data = build_pretrain_data(domain, data_dir, DataConfig(image_size=image_size, options=options, cache=False))
    refused: Counter = Counter()  # image folders: files whose headers a round would refuse
    sizes = source_sizes(data.dataset, refused)
    skipped = data.skipped + refused
    usable = len(data.dataset) - sum(refused.values())  # type: ignore[arg-type]
    if usable < 2:
        raise DataError(f"{data_dir}: {usable} usable image(s); MoCo needs at least 2"
                        + (f" ({format_skipped(skipped)})" if skipped else ""))
    report = SiteReport(domain=domain, data=data_dir, usable=usable, skipped=skipped,
                        channels=data.in_channels, image_size=image_size, source_sizes=sizes,
                        description=data.description, privacy=privacy_lines(data_dir, data),
                        cache_dir=str(options.get("cache_dir") or default_cache_dir()),
                        cache_bytes=0 if cache_off else data.cache_bytes,
                        cache_skipped=0 if cache_off else data.cache_skipped)
    if report.cache_bytes:
        samples = Path(report.cache_dir) / "samples"
        report.cache_problem = cache_folder_problem(samples) or ""
        # A round replaces (or reuses) this folder's caches before it asks for room: what they
        # hold on disk counts as free.
        try:
            if not report.cache_problem:
                held = folder_cache_allocated(data_dir, report.cache_dir)
                report.cache_fits, report.cache_free = cache_fits(samples, report.cache_bytes - held)
        except OSError:  # the volume cannot be asked (a folder this user cannot enter): a round logs why
            pass
    if steps > 0:
        _time_steps(report, data.dataset, model, batch_size, device or torch.device("cpu"), steps, workers)
        if report.steps_trained == 0:
            # Headers alone said 8 usable images of a folder whose 7 truncated PNGs fail to decode:
            # exit 0, where pretrain trains nothing (found by an audit).
            raise DataError(f"{data_dir}: no batch read while timing had 2 readable images "
                            f"({report.skipped_while_timing} sample(s) failed to decode though their headers "
                            "read); a round would train nothing")
    return report


def _fixed_release(data: PretrainData) -> Any:
    """``data``'s release view with the federation's units fixed (which units does not change
    what it reads), a reason string when the site would refuse whatever the federation sets,
    or None when the domain names no release view."""
    from fedmoco.data import Normalization

    if data.release_view is None:
        return None
    return data.release_view(Normalization([0.0] * data.in_channels, [1.0] * data.in_channels))


def release_line(data: PretrainData, fixed: Any) -> str:
    """What a DP release of this site would read (docs/privacy.md, "What one record is"), or
    why it would be refused (dp-status 9), with or without the federation's input-mean/std.
    ``fixed``: :func:`_fixed_release` of ``data``."""
    status = "refused (dp-status 9)"
    if fixed is None:
        return f"release:         {status}: the domain does not say what one record of its data is"
    if isinstance(fixed, str):
        return f"release:         {status} whatever the federation sets: {fixed}"
    n = len(fixed)
    if isinstance(data.release_view(None), str):
        return (f"release:         one item per record, {n} records; {status} unless the federation fixes "
                "run_config input-mean and input-std (this domain normalises with the site's own statistics)")
    return f"release:         one item per record, {n} records"


def privacy_lines(data_dir: Path, data: PretrainData) -> list[str]:
    """The site's privacy settings from ``data_dir/fedmoco-site.toml`` as a round reads them,
    what a release would read from ``data``, and its ledger's spending, one fact per line.
    ConfigError (one line naming the file and key) for anything a round would refuse: an
    unknown key, a bad site name, a bad budget, a delta too large for the records a release reads, a ledger or
    state folder inside the data folder, an unreadable ledger."""
    from fedmoco.ledger import check_site_delta, ledger_was_written, read_ledger
    from fedmoco.site_settings import privacy_settings, site_config, site_name

    path = data_dir / SITE_SETTINGS_FILE
    if not path.is_file():
        return [f"privacy:         no {SITE_SETTINGS_FILE} here: unless node_config sets dp-epsilon and a ledger "
                "(ledger-path or state-dir), this site sends weights and metrics only"]
    own = site_config({}, data_dir)
    site_name(own)  # as each round reads it: a name a round would refuse is one line here too
    p = privacy_settings(own, data_dir)
    lines = [f"privacy:         settings from {path} ({', '.join(own.from_file()) or 'no keys'}); "
             "node_config wins key by key"]
    if p["epsilon"] is None:
        return lines + ["budget:          no dp-epsilon: this site sends weights and metrics only"]
    fixed = _fixed_release(data)
    # as a round: per record a release reads, and not at all where the site would refuse
    records = None if fixed is None or isinstance(fixed, str) else len(fixed)
    if math.isfinite(p["epsilon"]) and records is not None:
        check_site_delta(p["delta"], records, p["delta_label"])
    rounds = f"{p['dp_rounds']} releases" if p["dp_rounds"] else "the run's num-server-rounds (no dp-rounds)"
    lines.append(f"budget:          epsilon {p['epsilon']:g}, delta {p['delta']:g}, planned over {rounds}"
                 + ("" if math.isfinite(p["epsilon"]) else " (inf: no noise, never private; a control only)"))
    lines.append(release_line(data, fixed))
    ledger = p["ledger_path"]
    if math.isinf(p["epsilon"]):  # as a round decides it (clients/app.py _release): before any ledger
        if ledger is not None and ledger_was_written(Path(ledger)):
            return lines + [f"ledger:          {ledger} records this site's budget: a round refuses dp-epsilon=inf "
                            "(dp-status 8) and the site sends weights only"]
        return lines + ["ledger:          none needed: a round releases WITHOUT noise (dp-status 1), writes no "
                        "ledger, and nothing it sends is private"]
    if ledger is None:
        return lines + ["ledger:          none (set ledger-path or state-dir): sharing will be refused "
                        "(dp-status 3) and the site sends weights only"]
    # as a round reads it (through a symbolic link, an older fedmoco's ledger included); a
    # ledger gone while its lock is marked is one line, as a round's refusal (status 7)
    book = read_ledger(Path(ledger).expanduser().resolve())
    if book is None:
        return lines + [f"ledger:          {ledger} (none yet: the first release creates it)"]
    return lines + [f"ledger:          {ledger}: {book.mechanism}, spent epsilon {book.spent():.3g} of "
                    f"{book.epsilon_budget:g} (delta {book.delta:g}) in {book.releases} of "
                    f"{book.planned_releases} planned releases"]


def default_model(channels: int) -> MoCoConfig:
    """The federation's default encoder (:data:`FEDERATION_DEFAULTS`) for ``channels`` inputs."""
    d = FEDERATION_DEFAULTS
    return MoCoConfig(arch=d["arch"], norm=d["norm"], dim=d["dim"], hidden_dim=d["hidden-dim"],
                      small_input=d["small-input"], queue_size=d["local-queue-size"], in_channels=channels)


def _time_steps(report: SiteReport, dataset, model: MoCoConfig | None, batch_size: int, device: torch.device,
                steps: int, workers: int) -> None:
    """Fill the timing fields of ``report``: the first step (allocation, cuDNN autotune) is
    run but not timed; each timed step spans fetching its batch and training on it."""
    import torch

    from fedmoco.moco import MoCo
    from fedmoco.train import Trainer, make_loader

    cfg = model or default_model(report.channels)
    cfg.in_channels = report.channels
    tcfg = TrainConfig(epochs=1, batch_size=max(2, batch_size), num_workers=workers)
    loader = make_loader(dataset, tcfg, device)
    trainer = Trainer(MoCo(cfg), tcfg, device, total_steps=steps + 1, steps_per_epoch=steps + 1, progress=False)
    report.device, report.batch_size, report.steps_per_epoch = str(device), loader.batch_size or 0, len(loader)
    times: list[float] = []
    batches = iter(_cycle(loader))
    for i in range(steps + 1):
        t0 = time.perf_counter()
        summary = trainer.train_epoch(_OneBatch(next(batches), loader.collate_fn), max_steps=1)  # fetch + step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report.skipped_while_timing += summary.skipped
        report.steps_trained += summary.steps
        if i:  # the first step is warm-up
            times.append(time.perf_counter() - t0)
    report.steps_timed = len(times)
    report.seconds_per_step = statistics.fmean(times) if times else float("nan")


class _OneBatch(list):
    """One batch of a loader, as ``Trainer.train_epoch`` takes a loader: with the loader's
    collate, whose batched views the Trainer runs on its device (on a GPU the batch holds
    the cached bases only)."""

    def __init__(self, batch, collate_fn) -> None:
        super().__init__([batch])
        self.collate_fn = collate_fn


def _cycle(loader):
    while True:
        yield from loader


def source_sizes(dataset, skipped: Counter | None = None) -> Counter:
    """(height, width) -> number of files, from file headers where the domain's dataset
    exposes them (images: the files; medical: the DICOM index; satellite: the raster grids).

    Image folders have no index that skips files when it is built (training skips and counts
    them batch by batch), so here each header that a round would refuse is counted in
    ``skipped`` by reason: over the ``max_pixels`` data option (a forged header declaring
    65535 x 65535 pixels is refused before anything is decoded), not an image, unreadable."""
    from PIL import UnidentifiedImageError

    sizes: Counter = Counter()
    if hasattr(dataset, "records"):  # medical: the index holds rows/columns per file
        sizes.update((int(r.rows), int(r.columns)) for r in dataset.records)
    elif hasattr(dataset, "reader") and hasattr(dataset.reader, "sources"):  # satellite
        sizes.update((int(s.grid.height), int(s.grid.width)) for s in dataset.reader.sources)
    elif hasattr(dataset, "header"):  # images: PIL reads only the header here
        for i in range(len(dataset)):
            try:
                sizes[dataset.header(i)] += 1
            except ValueError:
                reason = "declared size over max_pixels"
            except UnidentifiedImageError:
                reason = "not an image"
            except Exception:  # PIL's parsers raise TypeError, OverflowError... on malformed headers
                reason = "unreadable"
            else:
                continue
            log.warning("%s: %s", dataset.files[i], reason)
            if skipped is not None:
                skipped[reason] += 1
    return sizes


def _format_sizes(sizes: Counter) -> str:
    if not sizes:
        return "not known for this domain"
    if len(sizes) <= 3:
        return ", ".join(f"{h} x {w} ({n} file{'s' if n != 1 else ''})" for (h, w), n in sizes.most_common())
    areas = sorted(((h * w, (h, w)) for (h, w), n in sizes.items() for _ in range(n)))
    pick = lambda q: areas[min(int(q * len(areas)), len(areas) - 1)][1]  # noqa: E731
    return (f"{len(sizes)} different sizes over {sum(sizes.values())} files: smallest {pick(0)[0]} x {pick(0)[1]}, "
            f"median {pick(0.5)[0]} x {pick(0.5)[1]}, largest {pick(1.0)[0]} x {pick(1.0)[1]}")


def _count(n: int, noun: str) -> str:
    """``"1 step"``, ``"3 steps"``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _format_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def add_check_site_parser(sub) -> None:
    """Register ``fedmoco check-site`` on the CLI's sub-parsers."""
    d = FEDERATION_DEFAULTS
    p = sub.add_parser("check-site", help="dry run for a site admin: usable images, skipped files by reason, "
                                          "channels, sizes, expected time per epoch")
    p.add_argument("--domain", required=True, help="images | medical | satellite (the federation's domain)")
    p.add_argument("--data", required=True, type=Path, help="the folder node_config data-path will name")
    p.add_argument("--data-option", action="append", metavar="KEY=VALUE", help="domain option (repeatable)")
    p.add_argument("--image-size", type=int, default=d["image-size"],
                   help=f"run_config image-size (default {d['image-size']})")
    p.add_argument("--arch", choices=["tiny", "resnet18", "resnet50"], default=d["arch"],
                   help=f"run_config arch (default {d['arch']})")
    p.add_argument("--norm", choices=NORMS, default=d["norm"],
                   help=f"run_config norm (default {d['norm']})")
    p.add_argument("--batch-size", type=int, default=d["batch-size"],
                   help=f"run_config batch-size (default {d['batch-size']})")
    p.add_argument("--steps", type=int, default=3, help="MoCo steps to time after one warm-up step (0: no timing)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (node_config device)")


def cmd_check_site(args) -> int:
    """``fedmoco check-site``: print the report; exit 0 when the site can train."""
    from fedmoco.cli import parse_options
    from fedmoco.device import select_device
    from fedmoco.errors import ConfigError

    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    check_image_size(args.image_size)
    d = FEDERATION_DEFAULTS
    model = MoCoConfig(arch=args.arch, norm=args.norm, dim=d["dim"], hidden_dim=d["hidden-dim"],
                       small_input=args.image_size <= 64, queue_size=d["local-queue-size"])
    report = check_site(args.domain, args.data, options=parse_options(args.data_option), image_size=args.image_size,
                        model=model, batch_size=args.batch_size, device=select_device(args.device),
                        steps=args.steps, workers=args.workers)
    print("\n".join(report.lines()))
    return 0
