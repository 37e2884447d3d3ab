"""``make demo`` and the examples: a federation on generated data, then a fine-tune report.

The three roles, on one machine and offline:

1. the **site admins**: each site holds its own unlabelled archive (chest CT for the
   hospitals, 4-band GeoTIFF scenes for the satellite sites), generated here;
2. the **coordinator**: a Flower simulation (its own SuperLink) in which the sites pretrain a
   tiny encoder together for a few rounds, sharing weights and metrics, and DP prototypes
   when ``--run-config 'key-release="prototypes"'`` asks for them (each site admin's
   ``fedmoco-site.toml`` gives its site epsilon 8 and a ledger under ``OUT/site-state``, as
   node_config does in the loopback deployment);
3. the **data scientist**: ``fedmoco finetune`` of the aggregated encoder on a small
   labelled set the federation never saw, against the same architecture from random init,
   then ``fedmoco export``.

**All data is synthetic.** The labelled tasks carry a real, learnable signal: one to three
solid lung lesions (20-40 mm, 10-70 HU, in lung at about -850 HU) present or absent per CT
slice, grouped by patient (:func:`domains.medical.demo.make_nodule_archive`); the majority
land-cover class (water, vegetation, bare soil, urban) of 320 m patches with library
reflectance spectra, their natural variants, class textures, illumination and haze, grouped
by scene (:func:`domains.satellite.demo.make_landcover_archive`). docs/examples.md records
whether pretraining beats random init on each.

``python -m examples.demo --domain satellite --out eo-demo`` runs the satellite version;
``--quick`` shrinks everything for CI. It lives in ``examples/``, not in the ``fedmoco`` core,
because it drives the coordinator's simulation (``server.simulation``), which the core never
imports; run it from the repository root.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedmoco.cli import main as cli
from fedmoco.errors import reports_os_errors


@dataclass(frozen=True)
class Task:
    """One example: how its sites' and the labelled data are generated, and the federation's settings."""

    domain: str
    site_name: str
    what: str
    make_site: Callable[..., Path]
    make_labelled: Callable[..., Path]
    data_subdir: str  # where the labelled archive keeps its images (labels.csv sits beside it)
    run_config: dict[str, Any] = field(default_factory=dict)
    # a separate labelled test archive (same layout), or None to hold out groups of the labelled set
    make_test: Callable[..., Path] | None = None


def _medical_site(out: Path, i: int, quick: bool) -> Path:
    from domains.medical.demo import make_nodule_archive
    return make_nodule_archive(out, n_patients=2 if quick else 6, n_slices=4 if quick else 8, seed=10 + i,
                               first_patient=100 * (i + 1), labels=False)


def _medical_labelled(out: Path, quick: bool) -> Path:
    from domains.medical.demo import make_nodule_archive
    return make_nodule_archive(out, n_patients=8 if quick else 16, n_slices=4 if quick else 8, seed=99,
                               first_patient=900)


def _medical_test(out: Path, quick: bool) -> Path:
    # 80 held-out patients (640 slices): the paired group-bootstrap CI of the AUROC gain is
    # about +-0.03 wide, enough to resolve the +0.04 the short federation gives (40 patients:
    # +-0.04; the 5 held-out patients of a split of the labelled set: +-0.15 on each AUROC)
    from domains.medical.demo import make_nodule_archive
    return make_nodule_archive(out, n_patients=4 if quick else 80, n_slices=4 if quick else 8, seed=77,
                               first_patient=2000)


def _satellite_site(out: Path, i: int, quick: bool) -> Path:
    from domains.satellite.demo import make_landcover_archive
    return make_landcover_archive(out, n_scenes=1 if quick else 3, seed=10 + i, first_scene=10 * (i + 1),
                                  labels=False)


def _satellite_labelled(out: Path, quick: bool) -> Path:
    from domains.satellite.demo import make_landcover_archive
    return make_landcover_archive(out, n_scenes=3 if quick else 8, patches=3 if quick else 4, seed=99,
                                  first_scene=900)


def _satellite_test(out: Path, quick: bool) -> Path:
    # 24 held-out scenes (384 patches), where a split of the labelled set held out 3 scenes
    # (48 patches): the paired CI of the gain was then about +-0.03 around a gain of +0.014
    from domains.satellite.demo import make_landcover_archive
    return make_landcover_archive(out, n_scenes=2 if quick else 24, patches=3 if quick else 4, seed=77,
                                  first_scene=2000)


# Short federations on ~100 images per site learn nothing with the long-run defaults: with
# K = 1024 keys the queue holds every image several times (its own positive as a negative)
# and lr 0.06 per 256 images is 0.0075 at batch 32; positive and negative scores stay equal.
# K well below a site's image count and a higher rate learned within the demo's budget
# (centralized check on the same data: docs/examples.md).
_SHORT_RUN = {"local-epochs": 3, "batch-size": 32, "local-queue-size": 64, "lr": 0.2, "key-sample-rate": 0.3}

TASKS: dict[str, Task] = {
    "medical": Task("medical", "hospital", "lung lesion present or absent in a chest CT slice",
                    _medical_site, _medical_labelled, "dicom",
                    # 48 slices per hospital: batches of 16 give 3 steps per local epoch
                    # crops keep >= 80% of the slice, so a lesion is rarely cut out of one view only
                    {**_SHORT_RUN, "in-channels": 1, "image-size": 64, "batch-size": 16,
                     "data-options": "crop_scale=0.8"},
                    make_test=_medical_test),
    "satellite": Task("satellite", "ground-station", "majority land cover of a 4-band patch (4 classes)",
                      _satellite_site, _satellite_labelled, "patches",
                      # a station's 3 scenes hold 48 grid tiles; draw 128 random tiles per local epoch
                      {**_SHORT_RUN, "in-channels": 4, "image-size": 32, "data-options": "samples_per_epoch=128"},
                      make_test=_satellite_test),
}


def make_example_data(domain: str, root: Path, sites: int, *, quick: bool = False) -> tuple[list[Path], Path]:
    """Generate ``root/sites/site-<i>`` (unlabelled, one per site), ``root/labelled`` (images
    plus ``labels.csv`` with path,label,group) and, for tasks with one, the held-out test
    archive ``root/test`` (same layout); returns (site folders, labelled folder)."""
    task = TASKS[domain]
    from server.simulation import write_site_settings

    site_dirs = [task.make_site(root / "sites" / f"site-{i}", i, quick) for i in range(sites)]
    write_site_settings(site_dirs, root / "site-state")  # each admin's budget and ledger (docs/privacy.md)
    if task.make_test is not None:
        task.make_test(root / "test", quick)
    return site_dirs, task.make_labelled(root / "labelled", quick)


def federation_run_config(domain: str, root: Path, sites: int, rounds: int,
                          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run_config of the coordinator's simulation: the example's settings, then ``overrides``."""
    return {"domain": domain, "num-server-rounds": rounds, "demo-root": str((root / "sites").resolve()),
            "out-dir": str((root / "server").resolve()), "min-nodes": sites, "resume": False,
            **TASKS[domain].run_config, **(overrides or {})}


def federate(domain: str, root: Path, sites: int, rounds: int, *, overrides: dict[str, Any] | None = None) -> Path:
    """The coordinator's simulation over ``root/sites/site-<i>``; returns the aggregated encoder."""
    from server.simulation import run_simulation

    run_config = federation_run_config(domain, root, sites, rounds, overrides)
    work = root / "flower"
    work.mkdir(parents=True, exist_ok=True)
    result = run_simulation(run_config, num_supernodes=sites, work_dir=work)
    print(f"federated simulation: {sites} sites, {rounds} rounds in {result.seconds:.0f} s")
    return result.encoder


def finetune_report(encoder: Path, labelled: Path, out: Path, *, domain: str, epochs: int,
                    extra: list[str] | None = None) -> dict[str, Any]:
    """The data scientist's ``fedmoco finetune`` (pretrained vs random init); returns results.json."""
    task = TASKS[domain]
    test = labelled.parent / "test"
    if task.make_test is not None:
        extra = ["--test", str(test / task.data_subdir), "--test-labels", str(test / "labels.csv"), *(extra or [])]
    rc = cli(["-q", "finetune", "--checkpoint", str(encoder), "--data", str(labelled / task.data_subdir),
              "--labels", str(labelled / "labels.csv"), "--epochs", str(epochs), "--out", str(out), *(extra or [])])
    if rc:
        raise SystemExit(rc)
    return json.loads((out / "results.json").read_text())


def summary_lines(results: dict[str, Any], task: Task) -> list[str]:
    """The closing report: pretrained vs random init on the test set, mean ± std over the
    fine-tuning seeds and the group-bootstrap 95% CI of that mean, with the data's nature."""
    rnd = results["random_init"]
    seeds = len(results.get("config", {}).get("protocol", {}).get("seeds", [])) or 1
    lines = [f"task: {task.what} (synthetic data), {results['n_test']} test images, "
             f"{results['n_train']} labelled training images; mean ± std over {seeds} fine-tuning seed(s) [95% CI]"]

    def interval(block: dict[str, Any], key: str) -> list[float] | None:
        # null, not an interval, for a test set of too few groups (fedmoco.diagnostics.MIN_BOOTSTRAP_UNITS)
        ci = block.get("ci95", {}).get(key)
        return ci if ci and all(isinstance(c, (int, float)) and math.isfinite(c) for c in ci) else None

    def cell(r: dict[str, Any], key: str) -> str:
        ci = interval(r, key)
        return (f"{r[key]:.3f} ± {r.get('std', {}).get(key, 0.0):.3f}"
                + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))

    gain = results.get("gain", {})
    for key in ("auroc", "accuracy", "sensitivity", "specificity"):
        if key in results and key in rnd:
            ci = interval(gain, key)
            lines.append(f"  {key:<12} pretrained {cell(results, key)}   random init {cell(rnd, key)}   "
                         f"gain {results[key] - rnd[key]:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
    if "auroc" in gain.get("ci95", {}) and interval(gain, "auroc") is None:
        lines.append("  gain: no bootstrap interval: the test set has too few groups (see results.json warnings)")
    elif "auroc" in gain.get("ci95", {}):
        from fedmoco.finetune import seeds_ahead

        lo = gain["ci95"]["auroc"][0]
        ahead, seeds = seeds_ahead(gain)
        wins = f", and higher in {ahead} of {seeds} fine-tuning seeds" if seeds else ""
        lines.append("  gain: pretrained minus random init on the same test images, with its paired group-bootstrap "
                     f"95% CI; the AUROC gain is {'above' if lo > 0 else 'not clear of'} zero{wins}")
    return lines


def run_config_text(config: dict[str, Any]) -> str:
    """``key=value`` pairs for ``flwr run --run-config`` (strings quoted as TOML wants)."""
    from server.simulation import toml_value
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


@reports_os_errors("python -m examples.demo")  # an output folder that cannot be made: one line, exit 2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.splitlines()[0])
    p.add_argument("--domain", default="medical", choices=sorted(TASKS), help="which demo (default medical)")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    p.add_argument("--sites", type=int, default=3, help="simulated sites (default 3)")
    p.add_argument("--rounds", type=int, help="federated rounds (default 4; 1 with --quick)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default 15; 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (CI smoke test); --rounds and --epochs given explicitly still apply")
    p.add_argument("--run-config", action="append", default=[], metavar="'K=V ...'",
                   help="federation run_config overrides on top of the example's, e.g. 'momentum=0.9 local-epochs=5'; "
                        "may be given several times, later keys win")
    p.add_argument("--data-only", action="store_true",
                   help="only generate the data and print the federation's run config (for a deployment)")
    args = p.parse_args(argv)
    from fedmoco.errors import FedmocoError
    from server.runs import validate_run_config
    from server.simulation import check_simulated_sites, parse_overrides
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 4)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 15)
    root = args.out.resolve()
    try:  # before any work: a typo or a bad value here should not cost a generated archive
        for flag, value in (("--sites", args.sites), ("--rounds", rounds), ("--epochs", epochs)):
            if value < 1:
                raise FedmocoError(f"{flag} must be >= 1, got {value}")
        overrides = parse_overrides(*args.run_config)
        run_config = federation_run_config(args.domain, root, args.sites, rounds, overrides)
        validate_run_config(run_config)
        check_simulated_sites(run_config, args.sites)
    except FedmocoError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _demo(args, root, rounds, epochs, overrides)
    except KeyboardInterrupt:
        print(f"\n{p.prog}: interrupted; run the same command again to start over (the archives are regenerated)",
              file=sys.stderr)
        return 130
    except FedmocoError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the federation ended without an encoder: its log's tail follows
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1


#: Keys the deployment script (examples/deployment/run_loopback.sh) sets itself: printed twice they
#: would be a TOML error in flwr run --run-config.
_DEPLOYMENT_SETS = frozenset({"num-server-rounds", "min-nodes", "out-dir", "demo-root", "resume"})


def _demo(args: argparse.Namespace, root: Path, rounds: int, epochs: int, overrides: dict[str, Any]) -> int:
    """The three roles in turn, as main() checked them; returns the exit status."""
    task = TASKS[args.domain]
    start = time.perf_counter()
    print(f"== site admins: {args.sites} {task.site_name} archives (synthetic) under {root / 'sites'}", flush=True)
    _, labelled = make_example_data(args.domain, root, args.sites, quick=args.quick)
    if args.data_only:
        print(f"labelled set: {labelled / task.data_subdir} with {labelled / 'labels.csv'}")
        # the deployment script sets the rounds, min-nodes and out-dir itself (a key given twice
        # is a TOML error in flwr run --run-config)
        own = {k: v for k, v in overrides.items() if k not in _DEPLOYMENT_SETS}
        print("run config: " + run_config_text({"domain": args.domain, **task.run_config, **own}))
        return 0
    print(f"== coordinator: federated pretraining, {rounds} round(s)", flush=True)
    encoder = federate(args.domain, root, args.sites, rounds, overrides=overrides)
    if not args.quick:
        cli(["-q", "plot", str(root / "server")])
    print(f"== data scientist: fine-tuning on {labelled} ({task.what}), pretrained vs random init", flush=True)
    # three fine-tuning seeds: one seed alone swings the comparison by more than the gain
    extra = ["--bootstrap", "50", "--patience", "2"] if args.quick else ["--seeds", "0", "1", "2"]
    results = finetune_report(encoder, labelled, root / "finetune", domain=args.domain, epochs=epochs, extra=extra)
    cli(["export", str(encoder), "--out", str(root / "export")])
    print()
    print("\n".join(summary_lines(results, task)))
    from server.simulation import queue_summary
    print(queue_summary(root / "server" / "rounds.jsonl", root / "site-state"))
    print(f"report: {root / 'finetune' / 'results.json'} (ROC, confusion matrices, label-efficiency plot beside it)")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; aggregated encoder: {encoder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
