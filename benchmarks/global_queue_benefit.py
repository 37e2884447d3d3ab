"""Does the global queue help? The aggregated encoder with and without global negatives.

Issue 8, item 7. The glyphs task (benchmarks/labelled_task.py) is split over 4 sites with
Dirichlet(0.5) label skew: each site sees mostly a few glyph classes, so its local queue
lacks negatives of the others, which is the case the global queue is meant for
(``--split classes``: the extreme of it, each site holds 2 whole classes and no other). Every
federated row runs the real ServerApp strategy and ClientApp in one process
(``server.inprocess``), same rounds, seeds and hyper-parameters as benchmarks/quality.py,
and differs only in what the sites release and get back as extra negatives:

- no global negatives (run_config ``key-release=none``);
- DP prototypes (``key-release=prototypes``, the per-centre noisy sums of fedmoco.privacy)
  at node_config ``dp-epsilon`` = 1.5, 8 and inf (no noise: a control, never private), with
  false-negative cancellation (each query skips the prototypes of its key's own bucket of
  the server's public centres), and at 8 without it (the control for the cancellation);
- per-record DP keys at epsilon = 8 (``key-release=keys``), and every image's exact key each
  round (epsilon = inf, sample rate 1: the upper bound of any key release, a control);
- centralized MoCo on the union of the sites' images, as the ceiling.

The aggregated encoder is scored by kNN and linear probe on the held-out labelled folders.

    python benchmarks/global_queue_benefit.py --quick
    python benchmarks/global_queue_benefit.py --seeds 3 --jobs 8 --device cuda

Writes benchmarks/results/global_queue_benefit.md (or --out) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import emit_json, machine_line, write_report  # noqa: E402
from quality import (LAST_ROUNDS, Job, read_back_note, run_jobs, seed_range, summary, table, task_args,  # noqa: E402
                     task_setup)

DELTA = 1e-5
#: --split -> how the report describes it
SPLITS = {"dirichlet": "Dirichlet(0.5) label skew", "classes": "whole classes, 2 per site, none shared",
          "iid": "IID (each site a random quarter, no skew: the control for what skew changes)"}

#: row -> (run_config overrides, node_config overrides for every site)
PROTO = {"key-release": "prototypes", "cancel-false-negatives": True}
SETTINGS: dict[str, tuple[dict, dict]] = {
    # Same job as quality.py's "fedmoco federated, Dirichlet 0.5" row (key-release=none is the
    # benchmark's run_config default there), so the two tables share one set of runs.
    "no global negatives": ({}, {}),
    "DP prototypes, eps=1.5": (PROTO, {"dp-epsilon": 1.5, "dp-delta": DELTA}),
    "DP prototypes, eps=8": (PROTO, {"dp-epsilon": 8.0, "dp-delta": DELTA}),
    "DP prototypes, eps=inf (no noise, control)": (PROTO, {"dp-epsilon": float("inf"), "dp-delta": DELTA}),
    # The control for false-negative cancellation: every prototype counts as a negative,
    # including the one of the query's own bucket (the previous table's behaviour).
    "DP prototypes, eps=8, no cancellation": ({**PROTO, "cancel-false-negatives": False},
                                              {"dp-epsilon": 8.0, "dp-delta": DELTA}),
    "per-record DP keys, eps=8": ({"key-release": "keys", "cancel-false-negatives": True},
                                  {"dp-epsilon": 8.0, "dp-delta": DELTA}),
    # The upper bound of any key release: every image's key each round, exact (a shared key
    # dictionary as in FedCA). If this does not help either, no DP mechanism for keys can.
    "keys of every image, eps=inf (no noise, no sampling: a control)": (
        {"key-release": "keys", "key-sample-rate": 1.0, "cancel-false-negatives": True},
        {"dp-epsilon": float("inf"), "dp-delta": DELTA}),
}
CEILING = "centralized MoCo on the union (ceiling)"
#: short names of the rows in the JSON line
SHORT = dict(zip([*SETTINGS, CEILING], ["none", "proto_eps1.5", "proto_eps8", "proto_epsinf", "proto_eps8_nocancel",
                                        "keys_eps8", "keys_epsinf_all", "centralized"], strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    task_args(p)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "global_queue_benefit.md")
    p.add_argument("--split", default="dirichlet", choices=list(SPLITS),
                   help="label skew over the 4 sites: Dirichlet(0.5) (default), disjoint classes (2 per site), "
                        "or none (iid)")
    p.add_argument("--rows", help="comma-separated short row names to run (default: all): " + ", ".join(SHORT.values()))
    p.add_argument("--run-config", default="", metavar="'K=V ...'",
                   help="run_config overrides for every federated row, on top of the row's own "
                        "(e.g. 'queue-sample=64 global-queue-max-age=1')")
    args = p.parse_args(argv)
    start = time.perf_counter()
    wanted = set(args.rows.split(",")) if args.rows else set(SHORT.values())
    if wanted - set(SHORT.values()):
        p.error(f"--rows: unknown row(s) {sorted(wanted - set(SHORT.values()))}; choose from {', '.join(SHORT.values())}")
    from fedmoco.errors import ConfigError
    from server.simulation import parse_overrides

    try:
        overrides = parse_overrides(args.run_config)
    except ConfigError as exc:
        p.error(str(exc))
    root, setup, seeds, size = task_setup(args)
    fed_setup = replace(setup, lr=args.fed_lr) if args.fed_lr else setup

    from clients.task import RUN_DEFAULTS

    if "key-release" not in RUN_DEFAULTS:
        print("this checkout has no run_config key-release (DP prototypes, issue 8) yet", file=sys.stderr)
        return 2
    # Seed-major order: a run cut short still leaves every row with the same seeds done.
    jobs = []
    for s in seed_range(args, seeds):
        jobs += [Job(row=row, kind="federated", seed=s, root=str(root), setup=fed_setup, split=args.split,
                     run_extra={**run_extra, **overrides}, node_extra=node_extra)
                 for row, (run_extra, node_extra) in SETTINGS.items() if SHORT[row] in wanted]
        if SHORT[CEILING] in wanted:
            jobs.append(Job(row=CEILING, kind="fedmoco", seed=s, root=str(root), setup=setup))
    results = run_jobs(jobs, args.work / "runs" / ("quick" if args.quick else "full"), args.jobs)

    none_knn = summary(results, "no global negatives", "knn")
    releases = [row for row in SETTINGS if row != "no global negatives" and SHORT[row] in wanted]
    # the best *release* against none
    best = max(releases, key=lambda row: summary(results, row, "knn") or float("-inf")) if releases else None
    cmd = "python benchmarks/global_queue_benefit.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    knn = {row: summary(results, row, "knn") for row in [*SETTINGS, CEILING]}
    lines = [
        "# Does the global queue help? (issue 8, item 7)",
        "",
        f"Command: `{cmd}`",
        "",
        machine_line(setup.device) + f"; {args.jobs} job(s) in parallel; total {time.perf_counter() - start:.0f} s"
        + read_back_note(results),
        "",
        f"- Task: glyphs (benchmarks/labelled_task.py), 8 classes, pool {size.pool * 8} images split over 4 sites "
        f"by {SPLITS[args.split]} (a new split per seed); kNN/probe fitted on {size.eval_train * 8} and scored "
        f"on {size.eval_test * 8} held-out images. Chance is 12.5%.",
        f"- Federation: {setup.epochs} rounds x {overrides.get('local-epochs', 1)} local epoch(s), "
        f"batch {setup.batch_size}, client lr "
        f"{fed_setup.scaled_lr:g} ({fed_setup.lr:g} per 256), local K = {setup.queue_size}, "
        f"m = {setup.momentum}, T = {setup.temperature}, tiny CNN ({setup.norm} norm); the run_config defaults "
        "for the release (prototype sample rate, centres, queue sample); delta = 1e-5 per site, spent over all "
        "rounds. The ceiling trains on all pool images in one place with the same budget.",
        f"- Seeds {args.first_seed}..{seeds - 1}, mean ± std."
        + (f" Every federated row with run_config `{args.run_config}` on top of its own." if overrides else ""),
        "",
        *table(results, [row for row in [*SETTINGS, CEILING] if SHORT[row] in wanted], time_col=None,
               extra={f"emb-std, last {LAST_ROUNDS} rounds": (f"emb-std-last{LAST_ROUNDS}", "{:.3f}"),
                      f"global share, last {LAST_ROUNDS} rounds": (f"global-share-last{LAST_ROUNDS}", "{:.2f}")}),
        "",
        "emb-std: the sites' mean std of their normalised query embeddings per dimension (1/sqrt(128) = 0.088 "
        "when spread over the sphere, 0 when collapsed to one point); global share: the mean share of the InfoNCE "
        "softmax that fell on the global negatives (`global-share`); both averaged over the seeds.",
        "",
    ]
    write_report(args.out, lines)
    emit_json({"bench": "global_queue_benefit", "quick": bool(args.quick), "seeds": seeds,
               "rounds": setup.epochs, "fed_lr": fed_setup.lr, "best_federated": SHORT[best] if best else None,
               "best_minus_none_knn": None if none_knn is None or best is None or knn[best] is None
               else knn[best] - none_knn,
               **{f"{SHORT[row]}_knn": v for row, v in knn.items()},
               **{f"{SHORT[row]}_probe": summary(results, row, "probe") for row in knn}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
