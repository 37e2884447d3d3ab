"""The ``fedmoco`` command: pretrain, finetune, knn, linear-probe, plot, make-demo-data, cache, ...

User errors (FedmocoError) print one line naming the path or option, with no traceback,
and exit with status 2.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import logging
import math
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from fedmoco.config import NORMS, check_image_size
from fedmoco.errors import ConfigError, FedmocoError, os_error_line
from fedmoco.appsign import add_sign_app_parser, cmd_sign_app
from fedmoco.eval_cli import add_finetune_parser
from fedmoco.keys import add_keygen_parser, cmd_keygen
from fedmoco.site_check import add_check_site_parser, cmd_check_site

log = logging.getLogger("fedmoco")

# CLI flag -> MoCoConfig field; flags left unset keep the preset's (or checkpoint's) value.
MOCO_FLAGS = {
    "arch": str, "norm": str, "dim": int, "hidden_dim": int, "queue_size": int, "momentum": float,
    "momentum_schedule": str, "temperature": float, "dual_view_weight": float,
    "hard_negative_fraction": float, "pos_extrapolation_alpha": float, "neg_interpolation_alpha": float,
    "mix_level": str, "norm_splits": int,
}


def parse_options(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["a=1", "b=lung"]`` -> ``{"a": 1, "b": "lung"}``; values are Python literals or strings."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--data-option: expected key=value, got {pair!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="MoCo pretraining on a data folder (centralized)")
    p.add_argument("--domain", help="images | medical | satellite (default: images; on --resume: the run's)")
    p.add_argument("--data", required=True, type=Path, help="folder of unlabelled images")
    p.add_argument("--out", type=Path, default=Path("runs/pretrain"), help="run folder (default: runs/pretrain)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt with its settings; a larger --epochs extends the run")
    p.add_argument("--moco", choices=["v1", "v2", "v3"], help="variant preset (default: v2; on --resume: the run's)")
    p.add_argument("--arch", choices=["tiny", "resnet18", "resnet50"])
    p.add_argument("--norm", choices=NORMS)
    p.add_argument("--norm-splits", type=int)
    p.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stem without max-pool (default: on for --image-size <= 64)")
    p.add_argument("--dim", type=int, help="embedding dimension D (default 128)")
    p.add_argument("--hidden-dim", type=int, help="MLP head width (default 2048)")
    p.add_argument("--queue-size", type=int, help="K, negatives in the queue (default 4096)")
    p.add_argument("--momentum", type=float, help="m of the key encoder (default: preset)")
    p.add_argument("--momentum-schedule", choices=["constant", "cosine"])
    p.add_argument("--temperature", type=float, help="T (default: preset)")
    p.add_argument("--dual-view-weight", type=float, help="MoHN key-view loss weight w in [0, 1]")
    p.add_argument("--hard-negative-fraction", type=float, help="MoHN: share of the queue kept, (0, 1]")
    p.add_argument("--pos-extrapolation-alpha", type=float, help="alpha of lambda ~ Beta(a,a)+1 (0: off)")
    p.add_argument("--neg-interpolation-alpha", type=float, help="alpha of lambda ~ Beta(a,a) (0: off)")
    p.add_argument("--mix-level", choices=["feature", "dimension"])
    # Defaults of the options a resumed run takes from its checkpoint: PRETRAIN_DEFAULTS.
    p.add_argument("--image-size", type=int, help="default 64")
    p.add_argument("--data-option", action="append", metavar="KEY=VALUE", help="domain option (repeatable)")
    p.add_argument("--epochs", type=int, help="default 10")
    p.add_argument("--batch-size", type=int, help="default 64")
    p.add_argument("--lr", type=float, help="for batch 256, scaled linearly (default 0.06)")
    p.add_argument("--weight-decay", type=float, help="default 5e-4")
    p.add_argument("--warmup-epochs", type=float, help="default 1")
    p.add_argument("--workers", type=int, default=RUN_FLAG_DEFAULTS["--workers"])
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--device", default=RUN_FLAG_DEFAULTS["--device"], help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--no-cache", action="store_true",
                   help="decode every sample every epoch instead of using the decoded-sample cache")
    p.add_argument("--batch-augment", choices=("auto", "on", "off"), default="auto",
                   help="both views per batch from the cache: auto = on wherever the data offers it (default)")
    p.add_argument("--no-plots", action="store_true")


def _add_eval(sub, name: str, help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="labelled folder (sub-folder per class) or with --labels")
    p.add_argument("--labels", type=Path, help="CSV: path, optional group, label column(s); may cover part of --data")
    p.add_argument("--test", type=Path, help="labelled test folder (default: split --data)")
    p.add_argument("--test-labels", type=Path, help="labels CSV for --test (same columns as --labels)")
    p.add_argument("--label-column", action="append", metavar="NAME",
                   help="label column(s) of --labels (default: every column but path and group)")
    p.add_argument("--test-fraction", type=float, default=0.3, help="held-out share when no --test (default 0.3)")
    p.add_argument("--domain", help="default: the checkpoint's domain")
    p.add_argument("--data-option", action="append", metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="where results and plots go (default: CHECKPOINT_DIR/eval)")
    return p


def with_defaults(parser: argparse.ArgumentParser) -> None:
    """End each option's help with its default, unless the text gives it already or there is
    none to give (None: the option's own rule, such as the checkpoint's value, applies)."""
    for action in parser._actions:
        text = action.help or ""
        if (not action.option_strings or text == argparse.SUPPRESS or "default" in text.lower()
                or action.default is None or action.default is False or action.default == []
                or action.default is argparse.SUPPRESS):  # `is`: a default of 0 is worth showing
            continue
        action.help = f"{text} (default {action.default})".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmoco", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    knn = _add_eval(sub, "knn", "weighted kNN accuracy of a checkpoint's frozen encoder")
    knn.add_argument("--k", type=int, default=200)
    knn.add_argument("--t", type=float, default=0.1, help="kNN temperature (default 0.1)")
    probe = _add_eval(sub, "linear-probe", "linear classifier on a checkpoint's frozen encoder")
    probe.add_argument("--epochs", type=int, default=100)
    probe.add_argument("--lr", type=float, default=0.1)
    probe.add_argument("--weight-decay", type=float, default=0.0)
    add_finetune_parser(sub, _add_eval)
    plot = sub.add_parser("plot", help="PNG plots of a pretraining run or a federation server out-dir")
    plot.add_argument("run", type=Path, help="run folder (metrics.jsonl) or federation out-dir (rounds.jsonl)")
    plot.add_argument("--out", type=Path, help="default: RUN/plots")
    export = sub.add_parser("export", help="write the encoder as torchvision state_dict, TorchScript and JSON")
    export.add_argument("checkpoint", type=Path, help="fedmoco checkpoint (federated encoder.pt or a run's)")
    export.add_argument("--out", type=Path, required=True, help="folder for backbone.pt, encoder.ts, encoder.json")
    embed = sub.add_parser("embed", help="one backbone embedding per image: FILE.npy plus FILE.csv of paths")
    embed.add_argument("checkpoint", type=Path)
    embed.add_argument("--data", type=Path, required=True, help="folder of images (any layout)")
    embed.add_argument("--out", type=Path, required=True, help="FILE: writes FILE.npy and FILE.csv")
    embed.add_argument("--domain", help="default: the checkpoint's domain")
    embed.add_argument("--data-option", action="append", metavar="KEY=VALUE")
    embed.add_argument("--batch-size", type=int, default=128)
    embed.add_argument("--workers", type=int, default=0)
    embed.add_argument("--device", default="auto")
    demo = sub.add_parser("make-demo-data", help="write a generated demo archive")
    demo.add_argument("--domain", default="images", choices=["images", "medical", "satellite"])
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--labelled", action="store_true", help="one sub-folder per class")
    demo.add_argument("--bands", type=int, default=4, choices=[4, 13], help="satellite only (default 4)")
    cache = sub.add_parser("cache", help="show, or remove, the decoded-sample caches of this machine")
    cache.add_argument("--cache-dir", type=Path,
                       help="default: $FEDMOCO_CACHE_DIR, else $XDG_CACHE_HOME/fedmoco, else ~/.cache/fedmoco")
    what = cache.add_mutually_exclusive_group()
    what.add_argument("--clear", action="store_true", help="remove every cache file")
    what.add_argument("--older-than", type=float, metavar="DAYS",
                      help="remove the cache files not used for more than DAYS days")
    add_keygen_parser(sub)
    add_sign_app_parser(sub)
    add_check_site_parser(sub)
    for command in sub.choices.values():  # -q also after the command: `fedmoco pretrain ... -q`
        with_defaults(command)
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars, warnings only")
    return parser


#: pretrain's flags for how a run executes (not kept in the checkpoint): the resume hint repeats
#: the ones given otherwise.
RUN_FLAG_DEFAULTS: dict[str, Any] = {"--workers": 2, "--device": "auto", "--batch-augment": "auto"}
#: pretrain's on/off flags of the same kind: --batch-augment off, --no-cache or --no-amp left out
#: of the hint resumed a run with other views or numerics than it began with (found by an audit).
RUN_SWITCHES = ("--no-cache", "--no-amp", "--no-plots")
#: Defaults of the pretrain options that a resumed run takes from its checkpoint instead.
PRETRAIN_DEFAULTS: dict[str, Any] = {"domain": "images", "image_size": 64, "epochs": 10, "batch_size": 64,
                                     "lr": 0.06, "weight_decay": 5e-4, "warmup_epochs": 1.0, "seed": 0}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedmoco.config import TrainConfig
    from fedmoco.data import DataConfig
    from fedmoco.device import select_device
    from fedmoco.plots import plot_run
    from fedmoco.pretrain import pretrain

    overrides = {k: getattr(args, k) for k in MOCO_FLAGS if getattr(args, k) is not None}
    if args.small_input is not None:
        overrides["small_input"] = args.small_input
    # What the user gave: on --resume the rest comes from the checkpoint, not from defaults.
    explicit = frozenset(k for k in PRETRAIN_DEFAULTS if getattr(args, k) is not None)
    explicit |= {"max_steps_per_epoch"} if args.max_steps_per_epoch is not None else set()
    explicit |= {"moco"} if args.moco is not None else set()
    v = {k: d if getattr(args, k) is None else getattr(args, k) for k, d in PRETRAIN_DEFAULTS.items()}
    device = select_device(args.device)
    train_cfg = TrainConfig(
        epochs=v["epochs"], batch_size=v["batch_size"], lr=v["lr"], weight_decay=v["weight_decay"],
        warmup_epochs=v["warmup_epochs"], num_workers=args.workers, amp=not args.no_amp, seed=v["seed"],
        max_steps_per_epoch=args.max_steps_per_epoch, batch_augment=args.batch_augment,
    )
    check_image_size(v["image_size"])
    data_cfg = DataConfig(image_size=v["image_size"], seed=v["seed"], options=parse_options(args.data_option),
                          cache=not args.no_cache, progress=not args.quiet)
    log.info("device: %s", device)
    result = pretrain(v["domain"], args.data, args.out, moco_overrides=overrides, train_cfg=train_cfg,
                      data_cfg=data_cfg, moco_version=args.moco or "v2", device=device, resume=args.resume,
                      progress=not args.quiet, explicit=explicit)
    if result.already_done:
        print(f"nothing to do: the run in {args.out} has finished all {result.epochs_done} epochs; "
              f"pass --epochs N > {result.epochs_done} with --resume to train further")
        print(f"checkpoint: {result.checkpoint}")
        return 0
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.metrics}")
    if result.skipped_scan or result.skipped_load:
        print(f"skipped:    {result.skipped_scan} files while scanning, {result.skipped_load} samples while loading")
    if not args.no_plots:
        cfg = json.loads((args.out / "config.json").read_text())
        plots = plot_run(result.metrics, args.out / "plots", embedding_dim=cfg["moco"]["dim"])
        print(f"plots:      {', '.join(str(p) for p in plots)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """knn / linear-probe: see fedmoco.eval_cli.cmd_frozen."""
    from fedmoco.eval_cli import cmd_frozen

    return cmd_frozen(args)


def cmd_finetune(args: argparse.Namespace) -> int:
    from fedmoco.eval_cli import cmd_finetune as run

    return run(args)


def cmd_plot(args: argparse.Namespace) -> int:
    from fedmoco.plots import plot_run

    if (args.run / "rounds.jsonl").is_file() and not (args.run / "metrics.jsonl").is_file():
        from fedmoco.federation_plots import plot_federation_dir
        written = plot_federation_dir(args.run, args.out or args.run / "plots")
        what = args.run / "rounds.jsonl"
    else:
        what = args.run / "metrics.jsonl"
        if not what.is_file():
            inside = sorted(p.parent for p in args.run.glob("*/rounds.jsonl"))  # none in a missing folder
            hint = f"; did you mean {inside[0]}?" if inside else ""  # a simulation's --out holds server/
            raise ConfigError(f"{args.run}: neither metrics.jsonl (a pretraining run) nor rounds.jsonl "
                              f"(a federation server out-dir) is there{hint}")
        dim = None
        try:  # the embedding dimension only adds the 1/sqrt(D) reference line
            dim = int(json.loads((args.run / "config.json").read_text())["moco"]["dim"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError):
            log.warning("%s: unreadable, so the plots go without the 1/sqrt(D) line", args.run / "config.json")
        written = plot_run(what, args.out or args.run / "plots", embedding_dim=dim)
    if not written:
        raise ConfigError(f"{what}: no records to plot")
    for p in written:
        print(p)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedmoco.export import export_encoder

    result = export_encoder(args.checkpoint, args.out)
    if result.backbone:
        print(f"torchvision state_dict: {result.backbone}")
    print(f"TorchScript:            {result.torchscript}")
    print(f"description:            {result.info}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from fedmoco.device import select_device
    from fedmoco.embed import embed_folder

    result = embed_folder(args.checkpoint, args.data, args.out, domain=args.domain,
                          options=parse_options(args.data_option), batch_size=args.batch_size,
                          num_workers=args.workers, device=select_device(args.device), progress=not args.quiet)
    print(f"{result.n} embeddings of dimension {result.dim}" +
          (f" ({result.skipped} unreadable samples skipped)" if result.skipped else ""))
    if result.skipped_files:
        from fedmoco.data import format_skipped

        print(f"warning:    {args.data}: {format_skipped(result.skipped_files)} (the log names them)")
    print(f"embeddings: {result.array}\nsamples:    {result.table}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    if args.domain == "images":
        from domains.images import make_demo_images
        path = make_demo_images(args.out, seed=args.seed)
    elif args.domain == "medical":
        from domains.medical.demo import make_demo_archive
        path = make_demo_archive(args.out, seed=args.seed, **({"labelled": True} if args.labelled else {}))
    else:
        from domains.satellite.demo import make_demo_archive
        path = make_demo_archive(args.out, bands=args.bands, seed=args.seed, labelled=args.labelled)
    print(path)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from fedmoco.cache import cache_usage, format_bytes, prune_cache

    if args.clear or args.older_than is not None:
        usage = prune_cache(args.cache_dir, None if args.clear else args.older_than)
        print(f"removed {usage.removed} cache file(s), {format_bytes(usage.freed)}"
              + (f" not used for {args.older_than:g} days" if args.older_than is not None else ""))
    else:
        usage = cache_usage(args.cache_dir)
    print(f"cache folder: {usage.folder}" + ("" if usage.folder.exists() else " (not created yet)"))
    print(f"{len(usage.files)} cache file(s), {format_bytes(usage.bytes)} on disk"
          + (f" ({sum(p.suffix == '.cache' for p in usage.files)} sample caches)" if usage.files else ""))
    return 0


#: Range of numeric options, by argparse dest, wherever a command has them: (rule, test).
NUMBER_RULES: dict[str, tuple[str, Any]] = {
    "batch_size": (">= 1", lambda v: v >= 1),
    "epochs": (">= 1", lambda v: v >= 1),
    "lr": ("a finite number > 0", lambda v: math.isfinite(v) and v > 0),
    "weight_decay": ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
    "warmup_epochs": ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
    "workers": (">= 0", lambda v: v >= 0),
    "max_steps_per_epoch": (">= 1", lambda v: v >= 1),
    "k": (">= 1", lambda v: v >= 1),
    "t": ("a finite number > 0", lambda v: math.isfinite(v) and v > 0),
    "test_fraction": ("in (0, 1)", lambda v: 0 < v < 1),
    "older_than": ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
    # numpy's generators take seeds in [0, 2**32): outside it a traceback, not a run
    "seed": ("a whole number in [0, 2**32)", lambda v: 0 <= v < 2**32),
    "split_seed": ("a whole number in [0, 2**32)", lambda v: 0 <= v < 2**32),
}


#: The config dataclasses' field names (as their errors give them) -> the pretrain flags.
_FIELD_FLAGS = {"queue_size (K)": "--queue-size", "momentum (m)": "--momentum", "temperature (T)": "--temperature",
                "hidden_dim": "--hidden-dim", "dim": "--dim", "arch": "--arch", "norm": "--norm",
                "norm_splits": "--norm-splits", "batch_size": "--batch-size",
                "dual_view_weight": "--dual-view-weight", "hard_negative_fraction": "--hard-negative-fraction",
                "pos_extrapolation_alpha": "--pos-extrapolation-alpha",
                "neg_interpolation_alpha": "--neg-interpolation-alpha", "mix_level": "--mix-level",
                "momentum_schedule": "--momentum-schedule", "moco version": "--moco"}


def _named_by_flag(text: str) -> str:
    """A MoCoConfig error as the user typed it: ``--queue-size must be >= 1``, not the field."""
    for name, flag in _FIELD_FLAGS.items():
        if text.startswith((f"{name} ", f"{name}:")):
            return flag + text[len(name):]
    return text


def check_numbers(args: argparse.Namespace) -> None:
    """ConfigError naming the first numeric option outside its range (:data:`NUMBER_RULES`),
    before any data or checkpoint is read."""
    for dest, (rule, ok) in NUMBER_RULES.items():
        value = getattr(args, dest, None)
        if value is not None and not isinstance(value, bool) and not ok(value):
            raise ConfigError(f"--{dest.replace('_', '-')} must be {rule}, got {value!r}")


def _resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted pretrain run left behind and the command that continues it."""
    return _checkpoint_hint(args) or "no epoch had finished, so no checkpoint was written; run the same command again"


def _checkpoint_hint(args: argparse.Namespace) -> str | None:
    """The pretrain run's checkpoint, what it holds and the command that resumes from it; None
    when no epoch has finished."""
    from fedmoco.checkpoint import load_checkpoint
    from fedmoco.pretrain import CHECKPOINT

    ckpt = args.out / CHECKPOINT
    if not ckpt.is_file():
        return None
    command = ["fedmoco", "pretrain", "--data", str(args.data), "--out", str(args.out)]
    # How the run executes is not in the checkpoint: the options given now go with the command
    # (with --workers 0 a resumed run matches an uninterrupted one bit for bit).
    for flag, default in RUN_FLAG_DEFAULTS.items():
        value = getattr(args, flag[2:].replace("-", "_"), default)
        if value != default:
            command += [flag, str(value)]
    command += [flag for flag in RUN_SWITCHES if getattr(args, flag[2:].replace("-", "_"), False)]
    try:
        saved = load_checkpoint(ckpt)
        planned = saved["train_config"]["epochs"]
        if args.epochs is not None and args.epochs != planned:  # an extension in progress
            command += ["--epochs", str(args.epochs)]
            planned = args.epochs
        done = f"epoch {saved['epoch']} of {planned}"
    except (FedmocoError, KeyError):
        done = "the last finished epoch"
    return f"{ckpt} holds {done}; resume with: {shlex.join(command)} --resume"


COMMANDS = {"pretrain": cmd_pretrain, "knn": cmd_eval, "linear-probe": cmd_eval, "plot": cmd_plot,
            "make-demo-data": cmd_demo_data, "export": cmd_export, "embed": cmd_embed}
COMMANDS["keygen"] = cmd_keygen
COMMANDS["finetune"] = cmd_finetune
COMMANDS["sign-app"] = cmd_sign_app
COMMANDS["check-site"] = cmd_check_site
COMMANDS["cache"] = cmd_cache


class _StderrNow(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is then, as ``logging.lastResort`` does. A
    handler bound to the stream of the first call kept writing there after a caller that runs
    ``main`` in-process (an example, a notebook, a test capturing output) had replaced and
    closed it: every later log line then failed with a "Logging error" traceback."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedmoco`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # A file or folder name that is not UTF-8 reaches Python as lone surrogates; printed to a
    # strict UTF-8 stdout (any UTF-8 locale) it raised UnicodeEncodeError, a traceback (found by
    # an audit). Its own bytes go out instead, as ls prints them; stderr already escapes them.
    if isinstance(sys.stdout, io.TextIOWrapper) and (sys.stdout.encoding or "").lower().replace("-", "") == "utf8":
        sys.stdout.reconfigure(errors="surrogateescape")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", force=True, handlers=[_StderrNow()])
    # SIGTERM (a scheduler's stop, `kill`) ends a run as Ctrl-C does: one line and the resume
    # hint, rather than an exit with no word. Only in the main thread, where signals can be set.
    previous = (signal.signal(signal.SIGTERM, signal.default_int_handler)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        check_numbers(args)
        return COMMANDS[args.command](args)
    except FedmocoError as exc:
        text = _named_by_flag(str(exc)) if args.command == "pretrain" else str(exc)
        print(f"fedmoco {args.command}: error: {text}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that cannot be written, a full disk: the path and the reason
        resume = _checkpoint_hint(args) if args.command == "pretrain" else None
        hint = f"; {resume}" if resume else ""
        print(f"fedmoco {args.command}: error: {os_error_line(exc)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = f"; {_resume_hint(args)}" if args.command == "pretrain" else ""
        print(f"\nfedmoco {args.command}: interrupted{hint}", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
