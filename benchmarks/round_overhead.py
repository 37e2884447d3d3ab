"""What a deployment round spends outside training, split into Flower's share and ours.

In deployment a SuperNode starts a new ``flwr-clientapp`` process for every message; that
process imports the ClientApp, handles one message and exits (docs/federation.md, "Round
overhead"). So every round pays, before any training step:

* Flower: starting Python and importing Flower (measured as ``flwr-clientapp --help``),
  and the SuperNode's polling: it asks the SuperLink for work every 3 s when idle and checks
  for the ClientApp's reply every 0.5 s (``flwr/supernode/start_client_internal.py``, 1.42);
* torch: ``import torch``, which any PyTorch ClientApp pays (reported, not counted as ours);
* ours: ``import clients.app`` beyond torch + Flower, the site's domain module, the data
  scan (index built on the first round, read from the index cache afterwards), restoring the
  site's state (from ``Context.state`` and from ``state-dir``) and building the model.

Each import is timed in a fresh process (medians over ``--repeats``), as a round sees it.
The data, cache and state live in a temporary folder: a small generated medical archive and
a 4-band satellite folder.

    python benchmarks/round_overhead.py [--quick] [--repeats 3] [--device cpu]

Writes benchmarks/results/round_overhead.md (or --out); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_device_arg, check_device, command_line, emit_json, machine_lines, write_report  # noqa: E402

#: Modules a site must not import unless it uses them (tests/clients/test_lazy_imports.py).
WATCHED = ("rasterio", "pydicom", "monai", "matplotlib", "opacus", "torchvision", "torch._dynamo", "scipy", "sklearn")
#: The SuperNode's idle poll and reply check in Flower 1.42 (start_client_internal.py).
SUPERNODE_IDLE_POLL_S = 3.0
SUPERNODE_REPLY_POLL_S = 0.5


# -- child: runs in a fresh process, prints one JSON line -----------------------------------
def _child(domain: str, data: Path, state_dir: Path) -> None:
    t0 = time.perf_counter()
    import flwr.app  # noqa: F401
    import flwr.clientapp  # noqa: F401
    import torch  # noqa: F401

    t1 = time.perf_counter()
    import clients.app  # noqa: F401

    t2 = time.perf_counter()
    from fedmoco.data import DataConfig, build_pretrain_data, domain_module

    domain_module(domain)
    t3 = time.perf_counter()
    built = build_pretrain_data(domain, data, DataConfig(image_size=64))
    t4 = time.perf_counter()

    from flwr.app import RecordDict

    from clients.state import load_site_state, save_site_state
    from clients.task import RUN_DEFAULTS, moco_config
    from fedmoco.moco import MoCo

    mcfg = moco_config({**RUN_DEFAULTS, "in-channels": built.in_channels})
    model = MoCo(mcfg)
    t5 = time.perf_counter()
    context_state = RecordDict()
    save_site_state(context_state, model, {}, rounds_done=1, last_round=1, state_dir=state_dir,
                    model_config=mcfg.to_dict())
    t6 = time.perf_counter()
    saved = load_site_state(context_state, None, server_round=2, model_config=mcfg.to_dict())
    model.load_state_dict(saved.model)
    t7 = time.perf_counter()
    disk = load_site_state(RecordDict(), state_dir, server_round=2, model_config=mcfg.to_dict())
    assert disk.model is not None, "state-dir restore found nothing"
    t8 = time.perf_counter()
    # The round's first two batches through the site's own loader (run defaults: views per batch
    # from the cache): what the first costs beyond the second is paid once per process (lazy
    # imports, cache mapping), so it is part of the fixed cost of a round, not of training.
    from clients.task import train_config
    from fedmoco.train import make_loader

    loader = make_loader(built.dataset, train_config(RUN_DEFAULTS), torch.device("cpu"))
    tb0 = time.perf_counter()
    next(iter(loader))
    tb1 = time.perf_counter()
    next(iter(loader))  # a new pass: the small demo folders hold one batch
    tb2 = time.perf_counter()
    imported = [m for m in WATCHED if m in sys.modules]
    # A site releasing DP prototypes: its ledger file (first round: plan the releases with the
    # accountant; later rounds: follow the plan), this round's noise and metrics, and the
    # release mechanism's import (what clients.app._release does before it encodes).
    from clients.ledger import locked_ledger
    from fedmoco.ledger import SiteLedger

    with locked_ledger(state_dir / "privacy-ledger.json") as box:
        ledger = box["ledger"] = box["ledger"] or SiteLedger("prototypes", 1.5, 1e-5, 50)
        ledger.record(ledger.next_noise(1.0, 2.0), 1.0)
    ledger.to_metrics(ledger.next_noise(1.0) is None)
    from fedmoco.privacy import release_prototypes  # noqa: F401

    t9 = time.perf_counter()
    print(json.dumps({
        "torch_flwr_import_s": t1 - t0, "app_import_s": t2 - t1, "domain_import_s": t3 - t2,
        "data_build_s": t4 - t3, "model_build_s": t5 - t4, "state_save_s": t6 - t5,
        "restore_context_s": t7 - t6, "restore_disk_s": t8 - t7, "ledger_s": t9 - t8,
        "first_batch_s": tb1 - tb0, "second_batch_s": tb2 - tb1,
        "first_batch_once_s": max(0.0, (tb1 - tb0) - (tb2 - tb1)),
        "imported": imported, "imported_after_ledger": [m for m in WATCHED if m in sys.modules],
    }))


def _run_child(domain: str, data: Path, state_dir: Path, cache: Path) -> dict:
    env = {**os.environ, "FEDMOCO_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", domain, str(data), str(state_dir)],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True, cwd=ROOT)
    return time.perf_counter() - t


def _median(values: list[float]) -> float:
    return statistics.median(values)


def measure(repeats: int, work: Path) -> dict:
    """Medians over ``repeats`` fresh processes per site kind (first run: cold index)."""
    from domains.medical.demo import make_demo_archive as make_medical
    from domains.satellite.demo import make_demo_archive as make_satellite

    clientapp = shutil.which("flwr-clientapp") or str(Path(sys.executable).with_name("flwr-clientapp"))
    out: dict = {
        "python_start_s": _median([_wall([sys.executable, "-c", "pass"]) for _ in range(repeats)]),
        "flwr_clientapp_help_s": _median([_wall([clientapp, "--help"]) for _ in range(repeats)]),
    }
    folders = {"medical": make_medical(work / "medical", n_patients=2, n_slices=4),
               "satellite": make_satellite(work / "satellite", bands=4)}
    for domain, data in folders.items():
        cache, state = work / f"cache-{domain}", work / f"state-{domain}"
        cold = _run_child(domain, data, state, cache)  # builds the index cache
        warm = [_run_child(domain, data, state, cache) for _ in range(repeats)]
        row = {k: _median([w[k] for w in warm]) for k in warm[0] if not k.startswith("imported")}
        row["data_build_cold_s"] = cold["data_build_s"]
        row["ledger_first_s"] = cold["ledger_s"]
        row["imported"] = warm[0]["imported"]
        row["imported_after_ledger"] = sorted(set(warm[0]["imported_after_ledger"]) - set(warm[0]["imported"]))
        row["imported_after_first_ledger"] = sorted(set(cold["imported_after_ledger"]) - set(cold["imported"]))
        row["our_share_s"] = (row["app_import_s"] + row["domain_import_s"] + row["data_build_s"]
                              + row["model_build_s"] + row["restore_context_s"] + row["first_batch_once_s"])
        row["our_share_dp_s"] = row["our_share_s"] + row["ledger_s"]
        out[domain] = row
    return out


def report(res: dict, argv: list[str] | None, load: tuple[float, float, float]) -> list[str]:
    flower = res["flwr_clientapp_help_s"]
    lines = ["# Fixed cost of a deployment round (outside training)", "",
             f"Command: `{command_line('round_overhead.py', argv)}`", "",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min, shared machine)", "",
             *machine_lines(), "",
             "Every figure is a median over fresh processes, as each round is a fresh `flwr-clientapp`.", "",
             "## Flower's share (per message)", "",
             f"- Python start: {res['python_start_s']:.2f} s; `flwr-clientapp --help` (start + Flower import): "
             f"{flower:.2f} s",
             f"- SuperNode polling (Flower 1.42 source): asks for work every {SUPERNODE_IDLE_POLL_S:g} s when idle "
             f"(0-{SUPERNODE_IDLE_POLL_S:g} s, mean {SUPERNODE_IDLE_POLL_S / 2:g} s, before a round's message is "
             f"picked up), then checks for the reply every {SUPERNODE_REPLY_POLL_S:g} s",
             "", "## Per site kind", "",
             "| | medical | satellite |", "|---|---|---|"]
    keys = [("torch_flwr_import_s", "import torch + flwr (framework, not ours)"),
            ("app_import_s", "import clients.app (beyond torch + flwr)"),
            ("domain_import_s", "import the site's domain"),
            ("data_build_cold_s", "data scan, first round (index built)"),
            ("data_build_s", "data scan, later rounds (index cache)"),
            ("model_build_s", "build the model"),
            ("restore_context_s", "restore state from Context.state"),
            ("restore_disk_s", "restore state from state-dir (restarted run)"),
            ("first_batch_s", "first training batch (views per batch from the cache)"),
            ("second_batch_s", "second training batch"),
            ("first_batch_once_s", "first batch's one-time cost (first - second)"),
            ("our_share_s", "**our share per round** (app + domain + cached scan + model + restore + "
                            "first batch's one-time cost)"),
            ("ledger_first_s", "privacy ledger, a site's first round: plan its releases (the accountant: "
                               "Opacus), record, metrics, import the mechanism"),
            ("ledger_s", "privacy ledger, later rounds: follow the plan in the ledger file, record, metrics, "
                         "import the mechanism"),
            ("our_share_dp_s", "**our share, site releasing DP summaries**")]
    for key, label in keys:
        lines.append(f"| {label} | {res['medical'][key]:.2f} s | {res['satellite'][key]:.2f} s |")
    lines.append(f"| heavy modules imported (after two batches, before the ledger) | {', '.join(res['medical']['imported']) or 'none'} | "
                 f"{', '.join(res['satellite']['imported']) or 'none'} |")
    for key, label in [("imported_after_first_ledger", "imported by the ledger, first round"),
                       ("imported_after_ledger", "imported by the ledger, later rounds")]:
        lines.append(f"| {label} | {', '.join(res['medical'][key]) or 'none'} | "
                     f"{', '.join(res['satellite'][key]) or 'none'} |")
    lines += ["", "A domain package loads its submodules on first use, and a site training from its caches "
              "makes both views per batch (`batch_augment=auto`, CPU included), so a later round imports "
              "neither MONAI (its package import loads all of MONAI: networks, torchvision, scipy, "
              "scikit-learn; 3-7 s) nor torchvision (its models and torch._dynamo; 2-4 s) nor pydicom (the "
              "index cache and the sample cache need no decoder). A medical site's first round imports "
              "pydicom to fill the caches; a satellite site imports rasterio to scan its rasters, and reads "
              "its band statistics from the memo (`fedmoco.cache.read_memo`) instead of ~256 GDAL windows. "
              "Still paid where used: MONAI or torchvision when `batch_augment=off` (or elastic deformation) "
              "and the per-sample pipelines run, torchvision for a ResNet encoder (`arch=resnet*`; the run "
              "default is the tiny encoder). A site that releases DP summaries loads Opacus once per plan: its "
              "ledger plans the releases still to come with the accountant and keeps, in the ledger file, each "
              "release's noise and the epsilon after it, so a later round reads them instead of accounting "
              "(`fedmoco.ledger.SiteLedger.next_noise`); a new budget, delta, number of releases or sample "
              "rate makes a new plan."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm repeat instead of --repeats")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "round_overhead.md")
    add_device_arg(parser)
    args = parser.parse_args(argv)
    check_device(args.device)  # the overhead is on the CPU whatever the site's device
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="round-overhead-") as tmp:
        res = measure(1 if args.quick else max(args.repeats, 1), Path(tmp))
    write_report(args.out, report(res, argv, load))
    emit_json({"bench": "round_overhead", "our_share_s": max(res["medical"]["our_share_s"],
                                                             res["satellite"]["our_share_s"]),
               "our_share_medical_s": res["medical"]["our_share_s"],
               "our_share_satellite_s": res["satellite"]["our_share_s"],
               "our_share_dp_s": max(res["medical"]["our_share_dp_s"], res["satellite"]["our_share_dp_s"]),
               "ledger_first_round_s": max(res["medical"]["ledger_first_s"], res["satellite"]["ledger_first_s"]),
               "flower_process_s": res["flwr_clientapp_help_s"],
               "torch_import_s": res["medical"]["torch_flwr_import_s"],
               "supernode_idle_poll_s": SUPERNODE_IDLE_POLL_S, "load_avg_1min": load[0]})
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit(main())
