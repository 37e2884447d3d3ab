"""Privacy audit at a realistic size: a canary membership attack against the (epsilon, delta) bound.

``fedmoco.audit.membership_audit`` on a site of ``--images`` embeddings (synthetic clusters
in D = 128, cluster resultant length 0.5, as in ``prototype_signal.py``), for DP prototypes
(q = 1, C = 8 public seeded centres as by default, with the release's noisy-norm threshold and without it,
which audits the raw noisy sums) and per-record keys (their default q = 0.05, max-keys 512),
over ``--rounds`` releases planned for (epsilon, delta). Two canaries: an outlier (a
direction no image is near: alone in its bucket, the worst case for the sums) and an
in-distribution one (an image like the others). The attacker knows the canary's embedding
and all other images; it scores each round by the largest cosine of a released vector with
the canary and adds the scores over rounds.

    python benchmarks/privacy_audit.py          # 4,000 images, 10 rounds, 500 trials per world
    python benchmarks/privacy_audit.py --quick

Writes benchmarks/results/privacy_audit.md (or --out) and one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from common import command_line, device_name, emit_json, machine_lines, markdown_table, write_report  # noqa: E402
from fedmoco.audit import auc_standard_error, membership_audit  # noqa: E402
from fedmoco.privacy import seeded_centres  # noqa: E402
from prototype_signal import DEFAULT_C, synthetic  # noqa: E402
from clients.task import RUN_DEFAULTS  # noqa: E402

DELTA = 1e-5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1,000 images, 3 rounds, 200 trials")
    p.add_argument("--device", default="cpu", type=device_name, help="accepted for the suite; the release maths runs on the CPU")
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--trials", type=int, default=500)
    p.add_argument("--centres", type=int, default=DEFAULT_C, help="C (default: run_config prototype-centres)")
    p.add_argument("--first-share", type=float, default=RUN_DEFAULTS["prototype-first-share"],
                   help="prototypes: the first release's share of the budget, as the ledger plans it")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "privacy_audit.md")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.trials = 1000, 3, 200
    t0 = time.perf_counter()
    dim = 128
    data = synthetic(args.images, dim, 16, 0.5, seed=1)
    centres = seeded_centres(args.centres, dim, seed=7)
    outlier = seeded_centres(1, dim, seed=12345)[0]
    canaries = {"outlier": outlier, "in-distribution": synthetic(1, dim, 16, 0.5, seed=1)[0]}
    configs = [("prototypes", 1.0, 0.5, None), ("prototypes", 1.0, 0.0, None), ("keys", 0.05, 0.5, 512)]
    rows, results = [], []
    for eps in (1.5, 8.0):
        for mode, q, min_cos, max_keys in configs:
            for canary_name, canary in canaries.items():
                r = membership_audit(mode, data, canary, epsilon=eps, delta=DELTA, rounds=args.rounds,
                                     sample_rate=q, trials=args.trials, centres=centres, min_cosine=min_cos,
                                     max_keys=max_keys, first_share=args.first_share, seed=11)
                se = auc_standard_error(r.auc, r.trials, r.trials)
                label = mode if mode == "keys" else f"prototypes (threshold {min_cos})"
                results.append({**r.to_dict(), "canary": canary_name, "min_cosine": min_cos})
                rows.append([label, canary_name, f"{r.epsilon:.3g}", f"{r.noise_multiplier:.3g}", q,
                             f"{r.auc:.3f} ± {se:.3f}", f"{r.auc_bound:.3f}", f"{r.empirical_epsilon:.2f}",
                             "yes" if r.within_bound else "**NO**"])
    seconds = time.perf_counter() - t0
    lines = [
        "# Privacy audit: canary membership attack vs the (epsilon, delta) bound",
        "",
        f"Command: `{command_line('privacy_audit.py', argv)}` ({seconds:.0f} s)",
        "",
        f"A site of {args.images} embeddings (D = {dim}, 16 clusters, resultant 0.5), {args.rounds} releases "
        f"planned for (epsilon, delta = {DELTA:g}), {args.trials} trials per world (canary in / out), "
        f"C = {args.centres} seeded centres; prototypes on the ledger's schedule (the first release gets "
        f"{args.first_share:g} times the privacy of each later one; `z` is the first release's). "
        "Adjacency as each mechanism is stated: prototypes add/remove the "
        "canary; keys replace one image by the canary. `AUC bound`: the largest AUC any test can reach "
        "against an (epsilon, delta)-DP mechanism; `eps shown`: the 95 % Clopper-Pearson lower bound on "
        "epsilon the attack demonstrates. `within`: AUC <= bound + 3 standard errors.",
        "",
        *markdown_table(["release", "canary", "eps", "z", "q", "attack AUC", "AUC bound", "eps shown",
                         "within"], rows),
        "",
        "Machine:",
        *machine_lines(),
    ]
    write_report(args.out, lines)
    emit_json({"bench": "privacy_audit", "seconds": seconds, "all_within_bound": all(r["within_bound"] for r in results),
               "max_auc": max(r["auc"] for r in results), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
