"""Traffic and time of federated rounds, measured on real Flower runtimes.

1. Simulation runtime (``server.simulation``: simulation SuperLink, ``flwr run``, Ray):
   the medical demo federation (generated DICOM archive per site, tiny encoder).
2. Deployment runtime (``examples/deployment/run_loopback.sh``: TLS SuperLink with
   SuperNode authentication and one SuperNode per site on 127.0.0.1), unless
   ``--no-deployment``.

From each run's ``rounds.jsonl`` (written by the ServerApp):

* bytes per round per site: global weights sent to the site, global negatives (queue
  sample) sent to it, weights and privatised keys it sent back. Array payload bytes
  (numpy ``.npy`` serialisation, as Flower ships them), without gRPC/HTTP framing or TLS;
* the wall time of a round (server: from sending to having every reply) against the sum
  and the maximum of the sites' local training times (``seconds`` in their metrics).

Weights for larger encoders are computed from the model (no run needed).

    python benchmarks/federation_rounds.py [--sites 3] [--rounds 5] [--no-deployment]

Writes benchmarks/results/federation_rounds.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_device_arg, check_device, command_line, emit_json, machine_lines, write_report  # noqa: E402

from clients.task import RUN_DEFAULTS, moco_config, shared_arrays  # noqa: E402
from fedmoco.moco import MoCo  # noqa: E402
from server.launch import free_port  # noqa: E402
from server.simulation import DEMO_CHANNELS, make_demo_sites, run_simulation  # noqa: E402
from server.strategy import array_bytes  # noqa: E402


def kib(n: float) -> str:
    return f"{n / 1024:,.1f}"


def summarise(title: str, command: str, records: list[dict]) -> list[str]:
    lines = [f"## {title}", "", f"`{command}`", "",
             "### Bytes per round per site (KiB, mean over the sites of the round)", "",
             "| round | weights down | negatives down (keys) | weights up | keys up (keys) | total |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        ok = [s for s in r["sites"] if s.get("status") == "accepted"]
        mean = lambda k: statistics.fmean(s.get(k, 0) for s in ok) if ok else 0.0  # noqa: E731
        total = mean("weights") + mean("queue") + mean("up-arrays") + mean("up-keys")
        lines.append(f"| {r['round']} | {kib(mean('weights'))} | {kib(mean('queue'))} ({mean('queue-keys'):.0f}) | "
                     f"{kib(mean('up-arrays'))} | {kib(mean('up-keys'))} ({mean('keys'):.0f}) | {kib(total)} |")
    lines += ["", "### Round wall time against local training", "",
              "| round | round wall (s) | sum of local training (s) | slowest site (s) | wall / sum |",
              "|---:|---:|---:|---:|---:|"]
    for r in records:
        secs = [s["seconds"] for s in r["sites"] if s.get("status") == "accepted"]
        lines.append(f"| {r['round']} | {r['round-seconds']:.1f} | {sum(secs):.1f} | {max(secs):.1f} | "
                     f"{r['round-seconds'] / max(sum(secs), 1e-9):.2f} |")
    walls = [r["round-seconds"] for r in records[1:]] or [records[0]["round-seconds"]]
    sums = [sum(s["seconds"] for s in r["sites"] if s.get("status") == "accepted") for r in records[1:]] or [0.0]
    lines += ["", f"Rounds after the first: mean wall {statistics.fmean(walls):.1f} s against "
              f"{statistics.fmean(sums):.1f} s of summed local training "
              f"(overhead {statistics.fmean(walls) - statistics.fmean(sums) / max(1, len(records[0]['sites'])):.1f} s "
              "over a perfectly parallel round).", ""]
    return lines


def round_headline(name: str, records: list[dict]) -> dict[str, float]:
    """Mean round wall time, summed local training and KiB per site, over the rounds after the first."""
    later = records[1:] or records
    ok = [[s for s in r["sites"] if s.get("status") == "accepted"] for r in later]
    wall = statistics.fmean(r["round-seconds"] for r in later)
    train = statistics.fmean(sum(s["seconds"] for s in sites) for sites in ok)
    keys = ("weights", "queue", "up-arrays", "up-keys")
    traffic = statistics.fmean(sum(site.get(k, 0) for site in sites for k in keys) / len(sites)
                               for sites in ok if sites)
    return {f"{name}_round_s": wall, f"{name}_train_s": train, f"{name}_kib_per_site_round": traffic / 1024}


def weights_table() -> list[str]:
    lines = ["## Weights per message for other encoders (computed)", "",
             "Query encoder backbone + projection head (dim 128, MLP hidden 2048 for the ResNets), float32; "
             "sent down and up once per site and round. Keys and negatives cost 4 * 128 bytes each (+ a "
             "128-byte header per array).", "",
             "| encoder | in channels | shared arrays | MiB per message |", "|---|---:|---:|---:|"]
    for arch, ch, hidden in (("tiny", 1, 512), ("resnet18", 1, 2048), ("resnet18", 4, 2048), ("resnet50", 3, 2048)):
        run = {**RUN_DEFAULTS, "arch": arch, "in-channels": ch, "hidden-dim": hidden, "small-input": arch == "tiny"}
        rec = shared_arrays(MoCo(moco_config(run)))
        lines.append(f"| {arch} | {ch} | {len(rec)} | {array_bytes(rec) / 2**20:.2f} |")
    return lines + [""]


def simulation(args, work: Path) -> tuple[str, list[dict]]:
    data = work / "data"
    make_demo_sites("medical", data, args.sites)
    run = {"domain": "medical", "in-channels": DEMO_CHANNELS["medical"], "num-server-rounds": args.rounds,
           "demo-root": str(data), "out-dir": str(work / "server"), "min-nodes": args.sites, "local-epochs": 2,
           "batch-size": 16, "resume": False, "plots": False, "key-sample-rate": 0.3}
    run_simulation(run, num_supernodes=args.sites, work_dir=work, timeout=900, echo=False)
    records = [json.loads(x) for x in (work / "server" / "rounds.jsonl").read_text().splitlines()]
    return (f"python -m server.simulation --sites {args.sites} --rounds {args.rounds} (medical, tiny encoder, "
            "2 local epochs, batch 16, key-sample-rate 0.3, client-resources-num-cpus=1)"), records


def deployment(args, work: Path) -> tuple[str, list[dict]]:
    env = {**os.environ, "PORT": str(free_port())}
    subprocess.run([str(ROOT / "examples" / "deployment" / "run_loopback.sh"), str(work)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    records = [json.loads(x) for x in (work / "server" / "rounds.jsonl").read_text().splitlines()]
    return "examples/deployment/run_loopback.sh (2 sites, 2 rounds, TLS + SuperNode auth, defaults)", records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-deployment", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federation_rounds.md")
    p.add_argument("--quick", action="store_true", help="2 sites, 3 rounds, no deployment run")
    add_device_arg(p)
    args = p.parse_args(argv)
    check_device(args.device)
    if args.quick:
        args.sites, args.rounds, args.no_deployment = min(args.sites, 2), min(args.rounds, 3), True
    headline: dict = {}
    lines = ["# Federated rounds: traffic and time", "",
             f"`{command_line('federation_rounds.py', argv)}`:", "",
             *machine_lines(), "",
             "The first round of a simulation includes starting Ray and its actors; every round of a deployment "
             "includes starting one fresh ClientApp process per site (Flower's deployment runtime runs each "
             "message in a new process, which imports torch and rebuilds the site's state from Context.state).",
             ""]
    with tempfile.TemporaryDirectory(prefix="fedmoco-rounds-") as tmp:
        command, records = simulation(args, Path(tmp) / "simulation")
        lines += summarise("Simulation runtime (Ray)", command, records)
        headline.update(round_headline("simulation", records))
        if not args.no_deployment:
            command, records = deployment(args, Path(tmp) / "deployment")
            lines += summarise("Deployment runtime on loopback (TLS)", command, records)
            headline.update(round_headline("deployment", records))
    lines += weights_table()
    write_report(args.out, lines)
    emit_json({"bench": "federation_rounds", "sites": args.sites, "rounds": args.rounds, **headline})
    return 0


if __name__ == "__main__":
    sys.exit(main())
