"""Server memory over many rounds: the real FedMoCo ServerApp code, 20 simulated sites.

The ServerApp's ``run_federation`` (strategy, validation, global queue, round checkpoints,
JSON-lines metrics) runs against ``server.inprocess.InProcessGrid`` whose 20 sites answer
instantly with replies of the real shape: the global weights plus a small random update,
a Poisson-sized batch of unit keys, and the full metric record. No training happens, so
the process's memory is the server's: what it holds between rounds and what one round's
replies cost while they are aggregated. Resident memory (VmRSS) is read after every round
by the strategy (``server-rss-mb`` in rounds.jsonl).

    python benchmarks/federation_server_memory.py [--sites 20] [--rounds 20] [--arch tiny resnet18]

Writes benchmarks/results/federation_server_memory.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import add_device_arg, check_device, command_line, emit_json, machine_lines, write_report  # noqa: E402
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402

from clients.task import RUN_DEFAULTS  # noqa: E402
from server.app import run_federation  # noqa: E402
from server.inprocess import InProcessGrid, make_context  # noqa: E402
from server.strategy import current_rss_mb  # noqa: E402


#: Headline figures per encoder, filled in by measure() for the JSON line.
HEADLINE: dict = {}


class SyntheticSite:
    """Answers a train message like a site would, without training: w + N(0, step^2), keys, metrics."""

    def __init__(self, seed: int, dim: int, mean_keys: int, step: float = 1e-3) -> None:
        self.rng = np.random.default_rng(seed)
        self.dim, self.mean_keys, self.step = dim, mean_keys, step

    def __call__(self, msg: Message, ctx) -> Message:
        arrays = ArrayRecord({k: Array((a.numpy() + self.rng.normal(0, self.step, a.shape)).astype(a.numpy().dtype))
                              for k, a in msg.content["arrays"].items()})
        n = int(self.rng.poisson(self.mean_keys))
        keys = self.rng.normal(size=(n, self.dim)).astype(np.float32)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True) + 1e-12
        r = int(msg.content["config"]["server-round"])
        metrics = {"num-examples": int(self.rng.integers(50, 500)), "train-loss": float(self.rng.uniform(4, 8)),
                   "pos-mean": 0.8, "neg-mean": 0.1, "neg-var": 0.05, "emb-std": 0.08, "global-share": 0.05,
                   "seconds": 1.0, "skipped": 0, "dp-keys-epsilon": 0.5 * r, "dp-keys-delta": 1e-5, "dp-keys-releases": float(r),
                   "dp-keys-exhausted": 0.0, "dp-keys-budget": 8.0, "dp-status": 0.0}
        content = RecordDict({"arrays": arrays, "keys": ArrayRecord({"keys": Array(keys)}),
                              "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)


def measure(arch: str, sites: int, rounds: int, keys_per_site: int, queue_size: int) -> list[str]:
    """Run the federation once; the markdown section describing it."""
    with tempfile.TemporaryDirectory(prefix="fedmoco-mem-") as tmp:
        run = {**RUN_DEFAULTS, "arch": arch, "num-server-rounds": rounds, "min-nodes": sites,
               "out-dir": str(Path(tmp) / "server"), "global-queue-size": queue_size,
               "max-keys": 4 * keys_per_site, "plots": False, "resume": False,
               "key-release": "keys"}  # the sites release keys: under "none" the server refuses any
        grid = InProcessGrid({1000 + i: (SyntheticSite(i, run["dim"], keys_per_site), make_context(1000 + i, {}, run))
                              for i in range(sites)})
        rss_start = current_rss_mb()
        t0 = time.perf_counter()
        result = run_federation(grid, run)
        seconds = time.perf_counter() - t0
        records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
        ckpt_mb = result.state.stat().st_size / 2**20
        del grid

    rss = np.array([r["server-rss-mb"] for r in records])
    weights_mb = records[0]["sites"][0]["weights"] / 2**20
    # RSS swings by tens of MB from round to round (the allocator returning a round's replies
    # or not), so a line fit is meaningless; compare the peaks of two later windows instead.
    # A server that kept one reply per round would grow by weights_mb per round.
    q = max(len(rss) // 4, 1)
    early, late = rss[q:2 * q], rss[-q:]
    growth = float(late.max() - early.max())
    span = len(rss) - 2 * q + 1 if len(rss) >= 2 * q else 1
    verdict = "flat" if growth < weights_mb * span / 2 else "GROWING"
    HEADLINE[f"{arch}_rss_growth_mb"] = growth
    HEADLINE[f"{arch}_peak_rss_mb"] = float(rss.max())
    HEADLINE[f"{arch}_flat"] = verdict == "flat"
    lines = [
        f"## {arch} encoder, {sites} sites, {rounds} rounds",
        "",
        f"{weights_mb:.2f} MB of weights per reply, ~{keys_per_site} keys per site and round, global queue of "
        f"{queue_size} keys. {rss_start:.0f} MB resident before the run (Python, torch, Flower imported, and "
        "any earlier section of this benchmark).",
        "",
        "| round | RSS (MB) | global queue (keys) | accepted |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['round']} | {r['server-rss-mb']:.1f} | {r['queue-size']} | {r['accepted']} |" for r in records]
    lines += [
        "",
        f"- RSS after round 1: {rss[0]:.1f} MB; peak {rss.max():.1f} MB; after round {len(rss)}: {rss[-1]:.1f} MB.",
        f"- Peak RSS over rounds {q + 1}-{2 * q}: {early.max():.1f} MB; over rounds {len(rss) - q + 1}-{len(rss)}: "
        f"{late.max():.1f} MB ({growth:+.1f} MB). Keeping one {weights_mb:.2f} MB reply per round would add "
        f"{weights_mb * span:.0f} MB between those windows: {verdict}.",
        f"- Round checkpoint: {ckpt_mb:.1f} MB on disk. {rounds} rounds took {seconds:.1f} s "
        f"({seconds / rounds:.2f} s per round, of which the synthetic sites' replies are a part).",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=20)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--arch", nargs="+", default=["tiny"], choices=["tiny", "resnet18", "resnet50"])
    p.add_argument("--keys-per-site", type=int, default=200, help="mean keys a site sends per round")
    p.add_argument("--global-queue-size", type=int, default=8192)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federation_server_memory.md")
    p.add_argument("--quick", action="store_true", help="8 sites, 8 rounds")
    add_device_arg(p)  # the server aggregates on the CPU; accepted for the suite
    args = p.parse_args(argv)
    check_device(args.device)
    if args.quick:
        args.sites, args.rounds = min(args.sites, 8), min(args.rounds, 8)
    torch.set_num_threads(1)
    lines = [
        "# Server memory over rounds",
        "",
        f"`{command_line('federation_server_memory.py', argv)}`:",
        "",
        *machine_lines(),
        "",
        "The real ServerApp code (`run_federation`: FedMoCo, reply validation, global key queue, atomic "
        "round checkpoint, JSON-lines log) against in-process sites that reply instantly with real-shaped "
        "replies (no training), so the memory measured is the server's. Resident memory (VmRSS) is read "
        "after each round. The in-process grid also holds one round's messages and replies, as a "
        "SuperLink-connected ServerApp holds the replies it aggregates.",
        "",
    ]
    for arch in args.arch:
        lines += measure(arch, args.sites, args.rounds, args.keys_per_site, args.global_queue_size)
    write_report(args.out, lines)
    emit_json({"bench": "federation_server_memory", "sites": args.sites, "rounds": args.rounds, **HEADLINE})
    return 0


if __name__ == "__main__":
    sys.exit(main())
